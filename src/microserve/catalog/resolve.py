"""From the ``--model`` argument to a verified local artifact."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from microserve.catalog.manifest import Task, find_builtin
from microserve.store import ArtifactError, ModelStore


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model ready to load: its served name, local file, task and template family."""

    name: str
    path: Path
    task: Task
    template_family: str | None
    builtin: bool
    # Text prepended per NIM ``input_type`` for embedding models that were trained with prefixes.
    prefixes: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


def resolve_model(model: str, store: ModelStore, served_name: str | None = None) -> ResolvedModel:
    """A built-in id or alias (placed and verified in the store), or a path to a readable GGUF file.

    Raises ``ArtifactError`` with a one-line reason when the model cannot be used.
    """
    manifest = find_builtin(model)
    if manifest is not None:
        return ResolvedModel(
            name=served_name or manifest.id,
            path=store.ensure(manifest),
            task=manifest.task,
            template_family=manifest.template_family,
            builtin=True,
        )
    path = Path(model).expanduser()
    if not path.exists():
        raise ArtifactError(f"model file not found: {path} (and `{model}` is not a built-in model name)")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ArtifactError(f"model file is not a readable file: {path}")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ArtifactError(f"not a GGUF file: {path}")
    return ResolvedModel(name=served_name or path.stem, path=path, task="chat", template_family=None, builtin=False)


def resolve_encoder(model: str, store: ModelStore, task: Task) -> ResolvedModel:
    """An embedding (``task="embedding"``) or cross-encoder (``task="ranking"``) model: a built-in name, or a
    Hugging Face model directory (``config.json`` plus ``tokenizer.json``), as sentence-transformers saves them.

    Raises ``ArtifactError`` with a one-line reason when the model cannot be used.
    """
    manifest = find_builtin(model)
    if manifest is not None:
        if manifest.task != task:
            raise ArtifactError(f"`{model}` is a {manifest.task} model, not a model for {task}")
        return ResolvedModel(
            name=manifest.id,
            path=store.ensure(manifest),
            task=task,
            template_family=None,
            builtin=True,
            prefixes={str(k): v for k, v in manifest.prefixes.items()},
            aliases=tuple(manifest.aliases),
        )
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ArtifactError(f"{task} model directory not found: {path} (and `{model}` is not a built-in model name)")
    for needed in ("config.json", "tokenizer.json"):
        if not (path / needed).is_file():
            raise ArtifactError(f"{path} has no {needed}; save the model and its fast tokenizer there")
    return ResolvedModel(name=path.resolve().name, path=path, task=task, template_family=None, builtin=False)
