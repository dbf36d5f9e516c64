"""Ranking with a real cross-encoder: a tiny randomly initialised BERT built and saved here, served with
``--rerank-model``, and checked against the same weights run in this process by transformers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server
from tiny_encoders import build_cross_encoder

MAX_POSITIONS = 48


def reference_logits(folder: Path, query: str, passages: list[str]) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    batch = tok([query] * len(passages), passages, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return [float(x) for x in model(**batch).logits[:, 0]]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    folder = build_cross_encoder(tmp_path_factory.mktemp("xenc") / "tiny-cross-encoder")
    server = start_server(
        tmp_path_factory.mktemp("rerank"), "--rerank-model", str(folder), "--embedding-model", "none", "--parallel", "1"
    )
    yield server, folder
    server.stop()


QUERY = "the cat sat on the mat?"
PASSAGES = ["a dog sat on the rug.", "stock market fell sharply.", "the cat sat on the mat.", "plants make food."]


def test_models_card_says_cross_encoder(reranker: tuple[Server, Path]) -> None:
    server, _ = reranker
    cards = {m["id"]: m for m in httpx.get(f"{server.v1}/models").json()["data"]}
    assert set(cards) == {"smollm2-135m-instruct", "tiny-cross-encoder"}
    assert cards["tiny-cross-encoder"]["metadata"]["ranker"] == "cross-encoder"
    assert cards["tiny-cross-encoder"]["task"] == "ranking"


def test_nim_ranking_uses_the_cross_encoder_logits(reranker: tuple[Server, Path]) -> None:
    server, folder = reranker
    expected = reference_logits(folder, QUERY, PASSAGES)
    reply = httpx.post(
        f"{server.v1}/ranking",
        json={"model": "tiny-cross-encoder", "query": {"text": QUERY}, "passages": [{"text": p} for p in PASSAGES]},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    rankings = reply.json()["rankings"]
    assert [r["index"] for r in rankings] == sorted(range(len(PASSAGES)), key=lambda i: -expected[i])
    for r in rankings:
        assert abs(r["logit"] - expected[r["index"]]) < 1e-4


def test_rerank_scores_are_sigmoid_of_logits(reranker: tuple[Server, Path]) -> None:
    server, folder = reranker
    expected = reference_logits(folder, QUERY, PASSAGES)
    reply = httpx.post(  # no model named: the served cross-encoder is the ranker
        f"{server.v1}/rerank", json={"query": QUERY, "documents": PASSAGES, "top_n": 2}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "tiny-cross-encoder" and len(body["results"]) == 2
    best = max(range(len(PASSAGES)), key=lambda i: expected[i])
    assert body["results"][0]["index"] == best
    assert body["results"][0]["document"]["text"] == PASSAGES[best]
    for r in body["results"]:
        assert abs(r["relevance_score"] - 1 / (1 + math.exp(-expected[r["index"]]))) < 1e-4


def test_cross_encoder_truncation_and_family_errors(reranker: tuple[Server, Path]) -> None:
    server, _ = reranker
    long = " ".join(["cat"] * 80)
    body = {"model": "tiny-cross-encoder", "query": {"text": QUERY}, "passages": [{"text": long}]}
    refused = httpx.post(f"{server.v1}/ranking", json=body, timeout=60)
    assert refused.status_code == 400 and f"limit of {MAX_POSITIONS} tokens" in refused.json()["error"]["message"]
    cut = httpx.post(f"{server.v1}/ranking", json={**body, "truncate": "END"}, timeout=60)
    assert cut.status_code == 200 and len(cut.json()["rankings"]) == 1
    embed = httpx.post(f"{server.v1}/embeddings", json={"model": "tiny-cross-encoder", "input": "x"}, timeout=60)
    assert embed.status_code == 400 and "cross-encoder" in embed.json()["error"]["message"]
