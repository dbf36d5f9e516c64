"""Embedding sentences/s through the HTTP server at concurrency 1 and 32, beside the same backend called directly.

The direct figures run the encoder's forward pass in this process, in the server's configuration (its workers,
each with its share of the threads), on batches of 1 and of 32 (the server's batch bound), with the same
tokenization: they are the ceiling the server can reach. Through the server every request carries one sentence,
so at c=32 the dynamic batcher must merge concurrent requests to come close to the batch-32 ceiling.
Goal: server c=32 >= 0.9x direct batch 32.

A batch pads every row to its longest input. The server fills each pass with queued inputs of like length, so on
inputs of uneven length it can beat a direct call that batches them in the order given; the last direct row sorts
all inputs by length first, the most a caller who holds every input at once can get from the backend.

The client writes its requests on raw keep-alive connections (``loadgen.KeepAliveClient``): it shares the
server's cores, and a heavier client's CPU time would be charged to the server. Direct and served runs alternate
within each repeat, so that the machine's drift (a shared VM's speed moves 10-20% from minute to minute) falls on
both; every figure is the best of ``--repeats``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/embeddings_throughput.py [--repeats 5] [--requests 512] [--words 10 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx

from loadgen import KeepAliveClient, free_port, running_server

MODEL = "all-minilm-l6-v2"
GOAL = 0.9
_WORDS = (
    "the a small large quiet busy old new river city market garden teacher student engineer doctor child dog "
    "cat bird car train bridge road house window morning evening night summer winter rain wind sun walks runs "
    "reads writes builds opens closes watches finds carries across under near behind through quickly slowly"
).split()


def sentences(n: int, seed: int = 0, words: tuple[int, int] = (10, 20)) -> list[str]:
    """``n`` deterministic sentences of ``words[0]`` to ``words[1]`` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words))).capitalize() + "." for _ in range(n)]


class Direct:
    """The server's own backend in its server configuration, called in-process."""

    def __init__(self, threads: int, workers: int | None) -> None:
        from microserve.catalog.manifest import find_builtin
        from microserve.catalog.store import ModelStore
        from microserve.engines.encoder.engine import split_threads
        from microserve.engines.encoder.model_dir import WordTokenizer, read_layout
        from microserve.engines.encoder.onnx_backend import OnnxForward
        from microserve.engines.encoder.onnx_export import exported_model
        from microserve.settings import Settings

        manifest = find_builtin(MODEL)
        assert manifest is not None
        cache = Settings().cache_dir
        path = ModelStore(cache).ensure(manifest)
        self.layout = read_layout(path)
        self.tok = WordTokenizer(path)
        self.workers, self.threads_per_worker = split_threads(threads, workers)
        onnx = exported_model(path, "embedding", cache)
        self.forwards = [
            OnnxForward(onnx, "embedding", self.layout, threads=self.threads_per_worker, pad_id=self.tok.pad_id)
            for _ in range(self.workers)
        ]

    def _inputs(self, batch: list[str]) -> list[Any]:
        from microserve.engines.base import EncoderInput

        layout = self.tok.layout
        room = self.layout.max_tokens - len(layout.single[0]) - len(layout.single[1])
        return [EncoderInput(*layout.lay_out_single(self.tok.encode(t)[:room])) for t in batch]

    def _run(self, forward: Any, share: list[str], size: int) -> None:
        for i in range(0, len(share), size):
            forward(self._inputs(share[i : i + size]))

    def rate(self, texts: list[str], size: int) -> float:
        """Sentences/s at batch ``size``: batch 1 is one request at a time, as at c=1, so one worker; larger
        batches keep every worker busy, each on its share of ``texts``."""
        used = self.forwards[:1] if size == 1 else self.forwards
        shares = [texts[i :: len(used)] for i in range(len(used))]
        pool = [
            threading.Thread(target=self._run, args=job) for job in zip(used, shares, [size] * len(used), strict=True)
        ]
        start = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return len(texts) / (time.perf_counter() - start)


async def through_server(url: str, texts: list[str], concurrency: int) -> float:
    """Sentences/s of closed-loop single-sentence requests from ``concurrency`` workers, each on its own
    keep-alive connection (opened and warmed before the clock starts)."""
    parsed = httpx.URL(url)
    clients = [KeepAliveClient(parsed.host, parsed.port or 80) for _ in range(concurrency)]

    async def worker(client: KeepAliveClient, queue: list[str]) -> None:
        while queue:
            text = queue.pop()
            status, body = await client.post(
                "/v1/embeddings", {"model": MODEL, "input": text, "encoding_format": "float"}
            )
            if status != 200:
                raise SystemExit(f"request failed: {status} {body[:300]!r}")

    try:
        await asyncio.gather(*(worker(c, list(texts[:2])) for c in clients))
        queue = list(texts)
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, queue) for c in clients))
        return len(texts) / (time.perf_counter() - start)
    finally:
        for c in clients:
            await c.close()


def run_client(work: Coroutine[Any, Any, float]) -> float:
    """Run the client on uvloop (installed with microserve), whose loop costs less CPU than asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


def forward_passes(url: str) -> tuple[int, int]:
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    meta = cards[MODEL]["metadata"]
    return int(meta["forward_passes"]), int(meta["inputs"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument(
        "--words",
        type=int,
        nargs=2,
        default=(10, 20),
        metavar=("MIN", "MAX"),
        help="words per input: short sentences by default; passages (e.g. 80 120) put more work in each request",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--workers", type=int, default=None, help="encoder workers, for the server and the direct call [server default]"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    texts = sentences(args.requests, words=tuple(args.words))

    ceiling = Direct(args.threads, args.workers)
    for forward in ceiling.forwards:
        forward(ceiling._inputs(texts[:32]))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "microserve", "serve", "--port", str(port), "--parallel", "1"]
    cmd += ["--threads", str(args.threads), "--encoder-workers", str(ceiling.workers)]
    by_length = sorted(texts, key=lambda text: len(ceiling.tok.encode(text)))
    best: dict[str, float] = {"b1": 0.0, "b8": 0.0, "b32": 0.0, "s32": 0.0, "c1": 0.0, "c32": 0.0}
    batch: dict[int, float] = {}
    with running_server("microserve", cmd, url, f"{url}/v1/health/ready", log_path=args.out / "serve-embeddings.log"):
        for _ in range(args.repeats):
            # Batch 8 is about what the server's passes carry at c=32; with inputs of uneven length it pads less
            # than batch 32, so it can be the faster direct figure.
            best["b8"] = max(best["b8"], ceiling.rate(texts, 8))
            best["s32"] = max(best["s32"], ceiling.rate(by_length, 32))
            for size in (1, 32):
                best[f"b{size}"] = max(best[f"b{size}"], ceiling.rate(texts, size))
                before = forward_passes(url)
                best[f"c{size}"] = max(best[f"c{size}"], run_client(through_server(url, texts, size)))
                after = forward_passes(url)
                batch[size] = (after[1] - before[1]) / max(1, after[0] - before[0])
    served = {"c1": best["c1"], "c32": best["c32"], "c1_batch": batch[1], "c32_batch": batch[32]}

    print(
        f"{MODEL}, ONNX Runtime backend, {args.threads} threads as {ceiling.workers} worker(s) x "
        f"{ceiling.threads_per_worker}, {args.requests} inputs of {args.words[0]}-{args.words[1]} words, "
        f"best of {args.repeats}"
    )
    print("| path | sentences/s | mean batch | ratio to direct |")
    print("|---|---|---|---|")
    print(f"| direct, batch 1 | {best['b1']:.1f} | 1 | 1.00 |")
    print(f"| direct, batch 8 | {best['b8']:.1f} | 8 | 1.00 |")
    print(f"| direct, batch 32 | {best['b32']:.1f} | 32 | 1.00 |")
    print(f"| direct, batch 32, inputs sorted by length | {best['s32']:.1f} | 32 | 1.00 |")
    r1 = served["c1"] / best["b1"]
    r32 = served["c32"] / best["b32"]
    r_best = served["c32"] / max(best["b8"], best["b32"])
    r_sorted = served["c32"] / best["s32"]
    print(f"| server, c=1 | {served['c1']:.1f} | {served['c1_batch']:.1f} | {r1:.2f} x direct b=1 |")
    print(
        f"| server, c=32 | {served['c32']:.1f} | {served['c32_batch']:.1f} | {r32:.2f} x direct b=32, "
        f"{r_best:.2f} x the faster of b=8 and b=32, {r_sorted:.2f} x length-sorted b=32 |"
    )
    ok = r32 >= GOAL
    print(f"\nserver c=32 / direct batch 32 = {r32:.2f} (goal {GOAL}): {'ok' if ok else 'BELOW'}")
    figures = {"direct": {k: best[k] for k in ("b1", "b8", "b32", "s32")}, "server": served}
    (args.out / "embeddings_throughput.json").write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
