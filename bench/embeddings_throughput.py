"""Embedding sentences/s through the HTTP server at concurrency 1 and 32, beside the same backend called directly.

The direct figures run the encoder's forward pass in this process on batches of 1 and of 32 (the server's batch
bound), with the same tokenization: they are the ceiling the server can reach. Through the server every request
carries one sentence, so at c=32 the dynamic batcher must merge concurrent requests to come close to the batch-32
ceiling. Goal: server c=32 >= 0.9x direct batch 32. Every figure is the best of ``--repeats`` runs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/embeddings_throughput.py [--repeats 3] [--requests 512]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

from loadgen import free_port, running_server

MODEL = "all-minilm-l6-v2"
GOAL = 0.9
_WORDS = (
    "the a small large quiet busy old new river city market garden teacher student engineer doctor child dog "
    "cat bird car train bridge road house window morning evening night summer winter rain wind sun walks runs "
    "reads writes builds opens closes watches finds carries across under near behind through quickly slowly"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences of 10 to 20 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 20))).capitalize() + "." for _ in range(n)]


def direct(texts: list[str], repeats: int, threads: int) -> dict[str, float]:
    """Sentences/s of the server's own backend called in-process, at batch 1 and batch 32."""
    from microserve.catalog.manifest import find_builtin
    from microserve.engines.base import EncoderInput
    from microserve.engines.encoder.model_dir import WordTokenizer, read_layout
    from microserve.engines.encoder.onnx_backend import OnnxForward
    from microserve.engines.encoder.onnx_export import exported_model
    from microserve.settings import Settings
    from microserve.store import ModelStore

    manifest = find_builtin(MODEL)
    assert manifest is not None
    cache = Settings().cache_dir
    path = ModelStore(cache).ensure(manifest)
    layout = read_layout(path)
    tok = WordTokenizer(path)
    forward = OnnxForward(
        exported_model(path, "embedding", cache), "embedding", layout, threads=threads, pad_id=tok.pad_id
    )

    def inputs(batch: list[str]) -> list[EncoderInput]:
        return [EncoderInput([tok.cls_id, *tok.encode(t)[: layout.max_tokens - 2], tok.sep_id]) for t in batch]

    forward(inputs(texts[:32]))
    rates = {}
    for size in (1, 32):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(texts), size):
                forward(inputs(texts[i : i + size]))
            best = min(best, time.perf_counter() - start)
        rates[f"b{size}"] = len(texts) / best
    return rates


async def through_server(url: str, texts: list[str], concurrency: int, repeats: int) -> float:
    """Best sentences/s of closed-loop single-sentence requests from ``concurrency`` workers."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(queue: list[str]) -> None:
            while queue:
                text = queue.pop()
                reply = await client.post(
                    "/v1/embeddings", json={"model": MODEL, "input": text, "encoding_format": "float"}
                )
                if reply.status_code != 200:
                    raise SystemExit(f"request failed: {reply.status_code} {reply.text}")

        await asyncio.gather(*(worker(list(texts[:concurrency])) for _ in range(1)))  # warm connections
        best = float("inf")
        for _ in range(repeats):
            queue = list(texts)
            start = time.perf_counter()
            await asyncio.gather(*(worker(queue) for _ in range(concurrency)))
            best = min(best, time.perf_counter() - start)
    return len(texts) / best


def forward_passes(url: str) -> tuple[int, int]:
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    meta = cards[MODEL]["metadata"]
    return int(meta["forward_passes"]), int(meta["inputs"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    texts = sentences(args.requests)

    ceiling = direct(texts, args.repeats, args.threads)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "microserve", "serve", "--port", str(port), "--parallel", "1"]
    cmd += ["--threads", str(args.threads)]
    served: dict[str, float] = {}
    with running_server("microserve", cmd, url, f"{url}/v1/health/ready", log_path=args.out / "serve-embeddings.log"):
        for c in (1, 32):
            before = forward_passes(url)
            served[f"c{c}"] = asyncio.run(through_server(url, texts, c, args.repeats))
            after = forward_passes(url)
            served[f"c{c}_batch"] = (after[1] - before[1]) / max(1, after[0] - before[0])

    print(f"{MODEL}, ONNX Runtime backend, {args.threads} threads, {args.requests} sentences, best of {args.repeats}")
    print("| path | sentences/s | mean batch | ratio to direct |")
    print("|---|---|---|---|")
    print(f"| direct, batch 1 | {ceiling['b1']:.1f} | 1 | 1.00 |")
    print(f"| direct, batch 32 | {ceiling['b32']:.1f} | 32 | 1.00 |")
    r1 = served["c1"] / ceiling["b1"]
    r32 = served["c32"] / ceiling["b32"]
    print(f"| server, c=1 | {served['c1']:.1f} | {served['c1_batch']:.1f} | {r1:.2f} x direct b=1 |")
    print(f"| server, c=32 | {served['c32']:.1f} | {served['c32_batch']:.1f} | {r32:.2f} x direct b=32 |")
    ok = r32 >= GOAL
    print(f"\nserver c=32 / direct batch 32 = {r32:.2f} (goal {GOAL}): {'ok' if ok else 'BELOW'}")
    (args.out / "embeddings_throughput.json").write_text(json.dumps({"direct": ceiling, "server": served}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
