"""Reading a Hugging Face / sentence-transformers model directory: tokenizer, limits and pooling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Pooling = Literal["mean", "cls", "max"]


class ModelDirError(ValueError):
    """The directory is not a model this encoder can serve."""


@dataclass(frozen=True, slots=True)
class DirectoryLayout:
    """What a model directory says about itself, without loading weights."""

    config: dict[str, Any]
    max_tokens: int
    pooling: Pooling
    normalize: bool


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelDirError(f"{path} is not a JSON object")
    return data


def read_layout(path: Path) -> DirectoryLayout:
    """Config, the sequence limit and the pooling of the model in ``path``.

    sentence-transformers records the limit it was trained with in ``sentence_bert_config.json`` and its pooling in
    ``modules.json``; a plain transformers directory falls back to its position table and mean pooling.
    """
    config = _read_json(path / "config.json")
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2  # RoBERTa's table reserves the padding offset
    max_tokens = positions
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = min(positions, int(_read_json(st_config).get("max_seq_length") or positions))
    pooling: Pooling = "mean"
    normalize = True
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                pool = _read_json(path / module.get("path", "") / "config.json")
                if pool.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif pool.get("pooling_mode_max_tokens"):
                    pooling = "max"
                elif not pool.get("pooling_mode_mean_tokens", True):
                    raise ModelDirError(f"{path}: unsupported pooling {pool}")
    # Unit vectors either way: the OpenAI API returns them and cosine similarity then is a dot product.
    return DirectoryLayout(config=config, max_tokens=max_tokens, pooling=pooling, normalize=normalize)


class WordTokenizer:
    """The model's fast tokenizer (``tokenizer.json``), used without its own padding or truncation."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelDirError(f"{path} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.cls_id = self._special("[CLS]", "<s>")
        self.sep_id = self._special("[SEP]", "</s>")
        pad = self._tok.token_to_id("[PAD]")
        if pad is None:
            pad = self._tok.token_to_id("<pad>")
        self.pad_id: int = int(pad or 0)

    def _special(self, *names: str) -> int:
        for name in names:
            found = self._tok.token_to_id(name)
            if found is not None:
                return int(found)
        raise ModelDirError(f"the tokenizer has none of {names}")

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)
