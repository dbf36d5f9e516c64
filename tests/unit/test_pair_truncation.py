"""Pairs are cut the way Hugging Face tokenizers cut them (``longest_first``), so that ranking scores match
sentence-transformers' on inputs over the limit: checked against the tokenizers library itself."""

from __future__ import annotations

import itertools
from pathlib import Path

from microserve.services.ranking import longest_first


def test_longest_first_matches_the_tokenizers_library(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(str(tmp_path))
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    checked = 0
    for first, second, budget in itertools.product(range(1, 14), range(1, 14), range(2, 16)):
        tokenizer.enable_truncation(max_length=budget + 3, strategy="longest_first")
        encoding = tokenizer.encode(" ".join(["a"] * first), " ".join(["b"] * second))
        ids = encoding.ids
        expected = (ids.count(tokenizer.token_to_id("a")), ids.count(tokenizer.token_to_id("b")))
        assert longest_first(first, second, budget) == expected, (first, second, budget)
        checked += 1
    assert checked == 13 * 13 * 14
