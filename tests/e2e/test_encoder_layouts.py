"""Encoders lay out their inputs as their own tokenizer does: BERT's ``[CLS] q [SEP] p [SEP]`` with segment ids,
XLM-R's ``<s> q </s></s> p </s>`` without. Scores and embeddings through the server equal sentence-transformers'
``CrossEncoder.predict`` and ``SentenceTransformer.encode`` on the same directories, truncation included."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server
from tiny_encoders import WORDS, build_cross_encoder, build_xlmr_cross_encoder, build_xlmr_embedder

BERT_POSITIONS = 48
XLMR_TOKENS = 40
VOCAB = WORDS.split()


def words(n: int, offset: int = 0) -> str:
    return " ".join(VOCAB[(offset + i) % len(VOCAB)] for i in range(n))


# Short and long queries and passages; the long ones only fit with truncation, where the longer text is cut first.
QUERIES = ["the cat sat on the mat?", words(6, 3), words(30, 1)]
PASSAGES = ["a dog sat on the rug.", "stock market fell sharply.", words(12, 5), words(45, 2), "plants make food."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "bert": build_cross_encoder(root / "bert-reranker", max_positions=BERT_POSITIONS),
        "xlmr": build_xlmr_cross_encoder(root / "xlmr-reranker", max_tokens=XLMR_TOKENS),
        "embedder": build_xlmr_embedder(root / "xlmr-embedder", max_tokens=XLMR_TOKENS),
    }


@pytest.fixture(scope="module")
def bert_server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("bert-layout"),
        "--rerank-model",
        str(folders["bert"]),
        "--embedding-model",
        str(folders["embedder"]),
        "--parallel",
        "1",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def xlmr_server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("xlmr-layout"),
        "--rerank-model",
        str(folders["xlmr"]),
        "--embedding-model",
        "none",
        "--parallel",
        "1",
    )
    yield server
    server.stop()


def reference_scores(folder: Path, limit: int, query: str) -> list[float]:
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), max_length=limit, device="cpu")
    scores = model.predict([(query, p) for p in PASSAGES], activation_fn=torch.nn.Identity(), batch_size=8)
    return [float(x) for x in scores]


@pytest.mark.parametrize(("family", "limit"), [("bert", BERT_POSITIONS), ("xlmr", XLMR_TOKENS)])
def test_ranking_logits_equal_cross_encoder_predict(
    family: str, limit: int, folders: dict[str, Path], bert_server: Server, xlmr_server: Server
) -> None:
    server = bert_server if family == "bert" else xlmr_server
    name = folders[family].name
    for query in QUERIES:
        expected = reference_scores(folders[family], limit, query)
        body = {
            "model": name,
            "query": {"text": query},
            "passages": [{"text": p} for p in PASSAGES],
            "truncate": "END",
        }
        reply = httpx.post(f"{server.v1}/ranking", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        got = {r["index"]: r["logit"] for r in reply.json()["rankings"]}
        for i, value in enumerate(expected):
            assert abs(got[i] - value) < 1e-4, (family, query, PASSAGES[i], got[i], value)
        rerank = httpx.post(
            f"{server.v1}/rerank",
            json={"model": name, "query": query, "documents": PASSAGES, "truncate": "END"},
            timeout=60,
        )
        assert rerank.status_code == 200, rerank.text
        for result in rerank.json()["results"]:
            assert abs(result["relevance_score"] - 1 / (1 + math.exp(-expected[result["index"]]))) < 1e-4


def test_a_pair_over_the_limit_is_refused_without_truncation(folders: dict[str, Path], xlmr_server: Server) -> None:
    body = {"model": folders["xlmr"].name, "query": {"text": QUERIES[2]}, "passages": [{"text": PASSAGES[3]}]}
    refused = httpx.post(f"{xlmr_server.v1}/ranking", json=body, timeout=60)
    assert refused.status_code == 400, refused.text
    assert f"limit of {XLMR_TOKENS} tokens" in refused.json()["error"]["message"]


def test_xlmr_embeddings_equal_sentence_transformers(folders: dict[str, Path], bert_server: Server) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [*QUERIES, *PASSAGES]
    expected = SentenceTransformer(str(folders["embedder"]), device="cpu").encode(texts, normalize_embeddings=True)
    reply = httpx.post(
        f"{bert_server.v1}/embeddings",
        json={"model": folders["embedder"].name, "input": texts, "truncate": "END"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    data = sorted(reply.json()["data"], key=lambda d: d["index"])
    assert len(data) == len(texts)
    for row, want in zip(data, expected, strict=True):
        assert max(abs(a - float(b)) for a, b in zip(row["embedding"], want, strict=True)) < 1e-4
