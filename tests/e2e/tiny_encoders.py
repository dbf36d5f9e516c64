"""Tiny randomly initialised encoders, built and saved with their tokenizers by the tests that serve them.

BERT models use a WordPiece tokenizer (``[CLS] a [SEP] b [SEP]`` with segment ids 0/1); XLM-R models an XLM-R
tokenizer (a Unigram vocabulary with ``<s> a </s></s> b </s>`` and no segment ids), as the bge-reranker family and
bge-m3 do.
"""

from __future__ import annotations

from pathlib import Path

WORDS = "the a cat dog sat on mat rug stock market fell sharply plants make food sunlight water paris capital france"


def build_cross_encoder(folder: Path, *, max_positions: int = 48) -> Path:
    """A 2-layer BERT sequence classifier with one label and a WordPiece tokenizer over a small vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split(), "?", "."]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids("cat") == vocab.index("cat")
    tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=1,
    )
    BertForSequenceClassification(config).eval().save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    return folder


def _xlmr_tokenizer(max_tokens: int) -> object:
    from transformers import XLMRobertaTokenizer

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -2.0) for w in WORDS.split()]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz?."] + [("\u2581", -3.0), ("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=pieces)
    tokenizer.model_max_length = max_tokens
    return tokenizer


def _xlmr_config(vocab_size: int, max_tokens: int, **extra: object) -> object:
    from transformers import XLMRobertaConfig

    # RoBERTa's position table starts after the padding index: two more rows than tokens.
    return XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_tokens + 2,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **extra,
    )


def build_xlmr_cross_encoder(folder: Path, *, max_tokens: int = 40) -> Path:
    """A 2-layer XLM-R sequence classifier with one label and an XLM-R tokenizer."""
    import torch
    from transformers import XLMRobertaForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _xlmr_tokenizer(max_tokens)
    tokenizer.save_pretrained(str(folder))  # type: ignore[attr-defined]
    torch.manual_seed(1)
    config = _xlmr_config(len(tokenizer), max_tokens, num_labels=1)  # type: ignore[arg-type]
    XLMRobertaForSequenceClassification(config).eval().save_pretrained(str(folder))  # type: ignore[arg-type]
    assert (folder / "tokenizer.json").is_file()
    return folder


def build_xlmr_embedder(folder: Path, *, max_tokens: int = 40) -> Path:
    """A 2-layer XLM-R encoder saved as a sentence-transformers model: mean pooling, ``max_seq_length`` set."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import XLMRobertaModel

    raw = folder.parent / f"{folder.name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    tokenizer = _xlmr_tokenizer(max_tokens)
    tokenizer.save_pretrained(str(raw))  # type: ignore[attr-defined]
    torch.manual_seed(2)
    XLMRobertaModel(_xlmr_config(len(tokenizer), max_tokens)).eval().save_pretrained(str(raw))  # type: ignore[arg-type]
    word = models.Transformer(str(raw), max_seq_length=max_tokens)
    pooling = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pooling]).save(str(folder))
    assert (folder / "tokenizer.json").is_file() and (folder / "modules.json").is_file()
    return folder
