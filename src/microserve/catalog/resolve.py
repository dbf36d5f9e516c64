"""From a model argument to a verified local artifact with the profile chosen for this machine.

A model is named by a catalog id or alias, by a path to a GGUF file, by a Hugging Face file
(``hf://owner/repo/path/file.gguf[@revision]``, also ``hf.co/...`` and ``huggingface.co/...``), by a Hugging Face
model directory (``config.json``, tokenizer and safetensors weights: served by vLLM), or, for embedding and ranking
models, by a sentence-transformers directory. Paths, directories and Hub files have no manifest: one is synthesized
from what the file says (the GGUF header: architecture, context length, chat template; a directory's config.json).

:func:`lookup` finds or synthesizes the manifest once; :func:`resolve` picks the profile and verifies the artifact.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from microserve.catalog.gguf_header import GgufHeader, read_header
from microserve.catalog.manifest import HuggingFaceSource, LocalSource, Manifest, Profile, Task, find_manifest
from microserve.catalog.profiles import select_profile
from microserve.catalog.store import ArtifactError, ModelStore
from microserve.engines.registry import EngineTarget, default_engine, engine_spec
from microserve.hardware import Hardware

_HF = re.compile(
    r"^(?:hf://|hf\.co/|https://huggingface\.co/|huggingface\.co/)(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^@]+?)(?:@(?P<rev>[\w./-]+))?$"
)


@dataclass(frozen=True, slots=True)
class Planned:
    """A model as the user named it, with the manifest it was found as (``builtin``) or synthesized as."""

    spec: str
    manifest: Manifest
    builtin: bool


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model ready to load: its served name, local artifact, task, template family, manifest and profile."""

    name: str
    path: Path
    task: Task
    template_family: str | None
    builtin: bool
    manifest: Manifest
    profile: Profile
    context_length: int | None = None

    @property
    def engine(self) -> str:
        """The engine the profile runs on."""
        return self.profile.engine

    @property
    def prefixes(self) -> Mapping[str, str]:
        """Text prepended per NIM ``input_type`` for embedding models that were trained with prefixes."""
        return {str(k): v for k, v in self.manifest.prefixes.items()}

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other names that select the model (catalog aliases)."""
        return tuple(self.manifest.aliases)

    def target(self) -> EngineTarget:
        """What the engine table needs to build this model's engine."""
        defaults = self.profile.defaults
        return EngineTarget(
            engine=self.profile.engine,
            name=self.name,
            path=self.path,
            task=self.task,
            threads=defaults.threads,
            parallel=defaults.parallel,
            batch_size=defaults.batch_size,
            context_length=defaults.context_length,
        )


def parse_hf_spec(spec: str) -> HuggingFaceSource | None:
    """The Hub file ``spec`` names, or None when it is not a Hub reference."""
    match = _HF.match(spec)
    if match is None:
        return None
    file = match["file"]
    if file.startswith(("resolve/", "blob/")):  # a browser URL: owner/repo/resolve/<rev>/<file>
        rev, _, file = file.split("/", 1)[1].partition("/")
        return HuggingFaceSource(kind="hf", repo=match["repo"], filename=file, revision=match["rev"] or rev)
    return HuggingFaceSource(kind="hf", repo=match["repo"], filename=file, revision=match["rev"] or "main")


def synthesize_manifest(
    name: str, source: LocalSource | HuggingFaceSource, header: GgufHeader | None, size: int = 0
) -> Manifest:
    """A manifest for a GGUF that the catalog does not know, from what its header says; ``size`` (bytes) sets the
    profile's memory need (the weights plus a fifth for context and scratch)."""
    task: Task = "chat" if header is None or header.chat_template else "completion"
    engine = default_engine(task, "gguf")
    return Manifest(
        id=name,
        task=task,
        license="unknown",
        description=f"{source.describe()} (no catalog manifest; read from the GGUF header)",
        context_length=header.context_length if header else None,
        architecture=header.architecture if header else None,
        profiles=[
            Profile(
                id=f"{engine}-cpu" if header is None else f"{engine}-cpu-{header.file_type}".lower(),
                engine=engine,
                device="cpu",
                format="gguf",
                quantization=header.file_type if header else None,
                min_memory_mb=size * 6 // 5 >> 20,
                source=source,
            )
        ],
    )


def _gguf_manifest(model: str) -> Manifest:
    """A manifest synthesized for a GGUF path, a Hub file or a Hugging Face model directory. Raises
    ``ArtifactError``."""
    hub = parse_hf_spec(model)
    if hub is not None:
        # A Hub file's header is read after download, so its plan says ``chat`` until then.
        return synthesize_manifest(f"{hub.repo}/{Path(hub.filename).stem}", hub, None)
    path = Path(model).expanduser()
    if not path.exists():
        raise ArtifactError(f"model file not found: {path} (and `{model}` is not a catalog model name)")
    if path.is_dir():
        return hf_text_manifest(path)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ArtifactError(f"model file is not a readable file: {path}")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ArtifactError(f"not a GGUF file: {path}")
    source = LocalSource(kind="local", path=str(path))
    return synthesize_manifest(path.stem, source, read_header(path), path.stat().st_size)


def hf_text_manifest(path: Path) -> Manifest:
    """A manifest for a Hugging Face text-generation directory (``config.json``, a tokenizer, ``*.safetensors``), with
    two vLLM profiles: on an NVIDIA GPU, and on vLLM's CPU build (the only engine here that reads such a directory).
    Raises ``ArtifactError`` naming what is missing."""
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ArtifactError(f"{path} has no *.safetensors weights")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ArtifactError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        config = json.loads((path / "config.json").read_text())
        tokenizer_config = _json_or_empty(path / "tokenizer_config.json")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable config.json or tokenizer_config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}/config.json is not a JSON object")
    has_template = bool(tokenizer_config.get("chat_template")) or (path / "chat_template.jinja").is_file()
    task: Task = "chat" if has_template else "completion"
    context = config.get("max_position_embeddings")
    # Weights plus a fifth for activations, before the KV cache (vLLM sizes that from what is left).
    need_mb = _directory_size(path) * 6 // 5 >> 20
    source = LocalSource(kind="local", path=str(path))
    engine = default_engine(task, "safetensors")  # the engine that reads Hugging Face text weights
    return Manifest(
        id=path.resolve().name,
        task=task,
        license="unknown",
        description=f"local:{path} (no catalog manifest; a Hugging Face model directory)",
        context_length=context if isinstance(context, int) and context > 0 else None,
        architecture=str(config.get("model_type") or "") or None,
        profiles=[
            Profile(
                id=f"{engine}-{device}",
                engine=engine,
                device=device,
                format="safetensors",
                min_memory_mb=need_mb,
                source=source,
            )
            for device in ("nvidia", "cpu")
        ],
    )


def _json_or_empty(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _encoder_manifest(model: str, task: Task) -> Manifest:
    """A one-profile manifest for a Hugging Face model directory (``config.json`` plus ``tokenizer.json``) as
    sentence-transformers saves them. Raises ``ArtifactError``."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ArtifactError(f"{task} model directory not found: {path} (and `{model}` is not a catalog model name)")
    for needed in ("config.json", "tokenizer.json"):
        if not (path / needed).is_file():
            raise ArtifactError(f"{path} has no {needed}; save the model and its fast tokenizer there")
    artifact_format = "safetensors" if (path / "model.safetensors").is_file() else "pytorch"
    engine = default_engine(task, artifact_format)
    return Manifest(
        id=path.resolve().name,
        task=task,
        description=f"local:{path} (no catalog manifest; a sentence-transformers directory)",
        profiles=[
            Profile(
                id=f"{engine}-cpu",
                engine=engine,
                device="cpu",
                format=artifact_format,
                min_memory_mb=_directory_size(path) * 3 >> 20,  # weights, their ONNX export and activations
                source=LocalSource(kind="local", path=str(path)),
            )
        ],
    )


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def lookup(model: str, task: Task | None = None, catalog_dir: Path | None = None) -> Planned:
    """The manifest for ``model``: from the catalog, or synthesized for a file.

    ``task`` None asks for a model of any task named in the catalog, or a GGUF path or Hub file; ``embedding`` or
    ``ranking`` asks for an encoder of that task (a catalog name, or a sentence-transformers directory). Raises
    ``ArtifactError`` with a one-line reason when the model cannot be used.
    """
    manifest = find_manifest(model, catalog_dir)
    if manifest is not None:
        if task is not None and manifest.task != task:
            raise ArtifactError(f"`{model}` is a {manifest.task} model, not a model for {task}")
        return Planned(model, manifest, builtin=True)
    synthesized = _gguf_manifest(model) if task is None else _encoder_manifest(model, task)
    return Planned(model, synthesized, builtin=False)


def resolve(
    planned: Planned,
    store: ModelStore,
    *,
    hardware: Hardware,
    served_name: str | None = None,
    profile: str | None = None,
) -> ResolvedModel:
    """Pick the profile of a looked-up model for ``hardware`` (``profile`` forces one), and fetch and verify its
    artifact.

    Raises ``ArtifactError`` or ``ProfileError`` with a one-line reason when the model cannot be used.
    """
    manifest = planned.manifest
    chosen = select_profile(manifest, hardware, profile)
    if manifest.task not in engine_spec(chosen.engine).tasks:
        raise ArtifactError(
            f"profile `{chosen.id}` of {manifest.id} runs on {chosen.engine}, "
            f"which does not serve {manifest.task} models"
        )
    path = store.ensure(manifest, chosen)
    if not planned.builtin and isinstance(chosen.source, HuggingFaceSource):
        # Now the file is here, learn from its header what the plan could not know.
        synthesized = synthesize_manifest(manifest.id, chosen.source, read_header(path))
        manifest = synthesized.model_copy(update={"profiles": manifest.profiles})
    return ResolvedModel(
        name=served_name or manifest.id,
        path=path,
        task=manifest.task,
        template_family=manifest.template_family,
        builtin=planned.builtin,
        manifest=manifest,
        profile=chosen,
        context_length=chosen.defaults.context_length or manifest.context_length,
    )
