"""LoRA adapters on disk: a directory of adapters, one sub-directory each, checked and made ready for llama.cpp.

An adapter is a sub-directory of the adapter directory named by the adapter (NIM's ``NIM_PEFT_SOURCE`` layout),
holding either one GGUF LoRA file or a Hugging Face PEFT adapter (``adapter_config.json`` and
``adapter_model.safetensors``). PEFT adapters are converted to a GGUF LoRA on first use and the result is cached
under the model cache, keyed by the digest of the adapter's files and the base model, so a changed adapter is
converted again and an unchanged one never is.

Names are not paths: an adapter name is a plain file name, and every path given for an adapter must stay inside
the adapter directory once symlinks are resolved.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from microserve.catalog.folder_lock import locked
from microserve.catalog.peft_gguf import (
    AdapterError,
    AdapterMissing,
    AdapterOutside,
    BaseFacts,
    OutType,
    check_lora,
    convert_peft,
    read_lora,
    read_peft_config,
)

AdapterFormat = Literal["gguf", "peft"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_name(name: str) -> str:
    """``name`` if it can name an adapter: a plain file name of letters, digits, ``.``, ``_`` and ``-``."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise AdapterError(
            f"`{name!s:.80}` is not a valid adapter name: use letters, digits, '.', '_' and '-' "
            "(at most 128, not starting with a punctuation mark)"
        )
    return name


def inside(root: Path, candidate: Path | str) -> Path:
    """``candidate`` (relative to ``root``, or absolute) resolved, if it stays inside ``root``; else AdapterError."""
    text = str(candidate)
    if "\0" in text:
        raise AdapterError("an adapter path may not contain NUL characters")
    base = root.resolve()
    path = Path(text)
    resolved = (path if path.is_absolute() else base / path).resolve()
    if resolved != base and base not in resolved.parents:
        raise AdapterOutside(f"the adapter path `{text:.200}` is outside the adapter directory {base}")
    return resolved


@dataclass(frozen=True, slots=True)
class AdapterSource:
    """One adapter found on disk, before it is checked."""

    name: str
    path: Path  # the adapter's directory (or, loaded by path, its GGUF file)
    format: AdapterFormat
    gguf: Path | None = None  # the GGUF LoRA file of a gguf adapter


def find_adapter(root: Path, name: str, path: Path | str | None = None) -> AdapterSource:
    """The adapter ``name`` at ``path`` (default: ``root/name``), which must lie inside ``root``."""
    check_name(name)
    where = inside(root, path if path is not None else name)
    if where.is_file():
        if where.suffix != ".gguf":
            raise AdapterError(f"{where.name} is not a GGUF LoRA file (.gguf) nor a PEFT adapter directory")
        return AdapterSource(name, where, "gguf", where)
    if not where.is_dir():
        raise AdapterMissing(f"no adapter at {where}")
    # A GGUF LoRA is served as it is; beside a PEFT adapter (as `microserve tune` writes both) it wins, since
    # converting the PEFT files again would give the same file.
    ggufs = sorted(where.glob("*.gguf"))
    if len(ggufs) == 1:
        return AdapterSource(name, where, "gguf", inside(root, ggufs[0]))
    if len(ggufs) > 1:
        raise AdapterError(f"{where} holds {len(ggufs)} GGUF files; an adapter directory holds one")
    if all((where / f).is_file() for f in _PEFT_FILES):
        return AdapterSource(name, where, "peft")
    raise AdapterError(f"{where} holds neither a GGUF LoRA file nor {' and '.join(_PEFT_FILES)}")


def fingerprint(source: AdapterSource) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of the adapter's files: a rescan reloads an adapter whose files changed."""
    files = [source.gguf] if source.gguf is not None else [source.path / f for f in _PEFT_FILES]
    out = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        out.append((file.name, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def scan(root: Path) -> tuple[dict[str, AdapterSource], dict[str, str]]:
    """Every adapter sub-directory of ``root``, and for the entries that are not adapters, why not."""
    found: dict[str, AdapterSource] = {}
    refused: dict[str, str] = {}
    if not root.is_dir():
        return found, refused
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # hidden: temporary directories of writers that rename into place
        try:
            found[entry.name] = find_adapter(root, entry.name)
        except AdapterError as exc:
            refused[entry.name] = str(exc)
    return found, refused


@dataclass(frozen=True, slots=True)
class PreparedAdapter:
    """An adapter checked against its base model, in the form its engine loads: a GGUF LoRA file for llama.cpp,
    the PEFT directory itself for vLLM."""

    name: str
    source: AdapterSource
    path: Path  # what the engine loads
    rank: int  # the largest over its weights
    alpha: float  # LoRA's alpha: the update is scaled by alpha / rank

    @property
    def gguf(self) -> Path:
        """The GGUF LoRA file of an adapter prepared for llama.cpp."""
        return self.path


def _digest(paths: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.rsplit("/", 1)[-1].lower())


def check_base_name(trained_for: str | None, base_names: tuple[str, ...], other_models: tuple[str, ...]) -> None:
    """Refuse an adapter whose config names another known model as its base. An unknown name (a local path, a
    private checkpoint) is not refused: the tensor shapes are checked either way."""
    if not trained_for:
        return
    wanted = _normal(trained_for)
    if not wanted or any(_normal(n) == wanted for n in base_names):
        return
    clash = next((n for n in other_models if _normal(n) == wanted), None)
    if clash is not None:
        raise AdapterError(f"the adapter was trained for `{trained_for}`, not for the served base model")


def prepare(
    source: AdapterSource,
    base_path: Path,
    cache_dir: Path,
    *,
    base_names: tuple[str, ...] = (),
    other_models: tuple[str, ...] = (),
    max_rank: int | None = None,
    out_type: OutType = "q8_0",
) -> PreparedAdapter:
    """Check ``source`` against the base model GGUF at ``base_path`` and return it as a GGUF LoRA, converting a
    PEFT adapter into ``cache_dir`` the first time. Blocking (it reads and may write files): call it in a thread.

    Raises AdapterError naming the reason (for this adapter only)."""
    base = BaseFacts.from_gguf(base_path)
    base_names = (*base_names, base.name or "", base_path.stem)
    if source.format == "gguf":
        assert source.gguf is not None
        gguf = source.gguf
        info = read_lora(gguf)
        check_base_name(info.base_model, base_names, other_models)
    else:
        config = read_peft_config(source.path)
        check_base_name(config.base_model, base_names, other_models)
        if max_rank is not None and config.rank > max_rank:
            raise AdapterError(f"the adapter's rank {config.rank} is over the limit of {max_rank}")
        files = [source.path / f for f in _PEFT_FILES]
        key = _digest(files, f"{base.architecture}:{out_type}:{base_path.stat().st_size}")
        gguf = cache_dir / "lora-gguf" / f"{source.name}-{key}.gguf"
        with locked(gguf.parent):  # two servers (or a server and a pull) converting the same adapter
            if gguf.is_file():
                info = read_lora(gguf)
            else:
                info = convert_peft(source.path, gguf, base, out_type=out_type, name=source.name)
    check_lora(info, base, max_rank=max_rank)
    return PreparedAdapter(source.name, source, gguf, info.rank, info.alpha)


def prepare_peft(
    source: AdapterSource,
    *,
    base_names: tuple[str, ...] = (),
    other_models: tuple[str, ...] = (),
    max_rank: int | None = None,
) -> PreparedAdapter:
    """Check ``source`` for an engine that loads PEFT adapters as they are (vLLM): its ``adapter_config.json``, the
    base model it names and its rank; the engine checks the tensors' shapes when it loads them. Blocking (it reads a
    file): call it in a thread.

    Raises AdapterError naming the reason (for this adapter only)."""
    peft_beside = source.path.is_dir() and all((source.path / f).is_file() for f in _PEFT_FILES)
    if source.format != "peft" and not peft_beside:  # `microserve tune` writes both formats side by side
        raise AdapterError(
            "this model runs on vLLM, which loads PEFT adapters (adapter_config.json and adapter_model.safetensors); "
            "this adapter is a GGUF file only"
        )
    config = read_peft_config(source.path)
    check_base_name(config.base_model, base_names, other_models)
    ranks = [config.rank, *config.rank_pattern.values()]
    if max_rank is not None and max(ranks) > max_rank:
        raise AdapterError(f"the adapter's rank {max(ranks)} is over the limit of {max_rank}")
    return PreparedAdapter(source.name, source, source.path, max(ranks), config.alpha)
