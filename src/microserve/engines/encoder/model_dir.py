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


@dataclass(frozen=True, slots=True)
class InputLayout:
    """Where the model's tokenizer puts special tokens (and which segment ids it gives each part) around one text
    and around a pair, as its post-processor says: ``[CLS] a [SEP] b [SEP]`` with segments 0/1 for BERT,
    ``<s> a </s></s> b </s>`` for RoBERTa and XLM-R."""

    single: tuple[tuple[int, ...], tuple[int, ...]]  # before, after
    single_types: tuple[tuple[int, ...], int, tuple[int, ...]]  # before, each content token, after
    pair: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # before the first, between, after the second
    pair_types: tuple[tuple[int, ...], int, tuple[int, ...], int, tuple[int, ...]]

    @property
    def pair_overhead(self) -> int:
        """Special tokens a pair adds."""
        return sum(len(part) for part in self.pair)

    def lay_out_single(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """Ids and segment ids of one text."""
        (before, after), (t_before, t_text, t_after) = self.single, self.single_types
        return [*before, *ids, *after], [*t_before, *([t_text] * len(ids)), *t_after]

    def lay_out_pair(self, first: list[int], second: list[int]) -> tuple[list[int], list[int]]:
        """Ids and segment ids of a pair."""
        before, between, after = self.pair
        t_before, t_first, t_between, t_second, t_after = self.pair_types
        ids = [*before, *first, *between, *second, *after]
        types = [*t_before, *([t_first] * len(first)), *t_between, *([t_second] * len(second)), *t_after]
        return ids, types


def _split(encoding: Any, lengths: tuple[int, ...]) -> list[tuple[list[int], list[int], int]]:
    """A post-processed encoding cut around its texts: for each gap before, between and after the texts, the
    special tokens there and their segment ids, plus the segment id of the text that follows the gap (-1 last).
    Texts are told apart by their known lengths: special tokens are the ones the mask marks."""
    gaps: list[tuple[list[int], list[int], int]] = [([], [], -1)]
    text, left = 0, lengths[0] if lengths else 0
    for token, type_id, special in zip(encoding.ids, encoding.type_ids, encoding.special_tokens_mask, strict=True):
        if special:
            gaps[-1][0].append(int(token))
            gaps[-1][1].append(int(type_id))
            continue
        if left == 0:
            raise ModelDirError("the tokenizer's post-processor adds tokens it does not mark as special")
        if gaps[-1][2] == -1:
            gaps[-1] = (gaps[-1][0], gaps[-1][1], int(type_id))
        left -= 1
        if left == 0:
            text += 1
            left = lengths[text] if text < len(lengths) else 0
            gaps.append(([], [], -1))
    if text != len(lengths):
        raise ModelDirError("the tokenizer's post-processor drops text tokens")
    return gaps


def probe_layout(tokenizer: Any) -> InputLayout:
    """Read the layout off a ``tokenizers.Tokenizer`` by post-processing two placeholder texts."""
    first = tokenizer.encode("first", add_special_tokens=False)
    second = tokenizer.encode("second", add_special_tokens=False)
    if not first.ids or not second.ids:
        raise ModelDirError("the tokenizer turns plain words into no tokens")
    one = _split(tokenizer.post_process(first, None, add_special_tokens=True), (len(first.ids),))
    two = _split(tokenizer.post_process(first, second, add_special_tokens=True), (len(first.ids), len(second.ids)))
    (s_before, t_before, s_type), (s_after, t_after, _) = one
    (p_before, u_before, a_type), (p_between, u_between, b_type), (p_after, u_after, _) = two
    return InputLayout(
        single=(tuple(s_before), tuple(s_after)),
        single_types=(tuple(t_before), s_type, tuple(t_after)),
        pair=(tuple(p_before), tuple(p_between), tuple(p_after)),
        pair_types=(tuple(u_before), a_type, tuple(u_between), b_type, tuple(u_after)),
    )


class WordTokenizer:
    """The model's fast tokenizer (``tokenizer.json``), used without its own padding or truncation; its
    post-processor tells how inputs are laid out."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelDirError(f"{path} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.layout = probe_layout(self._tok)
        pad = self._tok.token_to_id("[PAD]")
        if pad is None:
            pad = self._tok.token_to_id("<pad>")
        self.pad_id: int = int(pad or 0)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)
