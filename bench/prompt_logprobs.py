"""A request that does not score its prompt runs no slower than before prompt scoring existed, and what scoring costs.

Two engine processes on the same GGUF: one on this checkout's code, one on a baseline revision's (``--baseline``,
default the commit prompt scoring was built on), extracted with ``git archive``. They take turns, one request at a
time, so that both see the same machine: each run is a plain greedy request (a ~300-token prompt, prefilled afresh,
32 tokens) and, on this checkout, the same prompt scored with ``prompt_logprobs`` and ``max_tokens`` 0 (what
lm-eval's loglikelihood requests do). The limit checked: the plain request's median time on this checkout is within
1.05x of the baseline's.

    .venv/bin/python bench/prompt_logprobs.py [--model smollm2-135m-instruct] [--reps 9] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "1e5c90b"  # main before prompt scoring
LIMIT = 1.05

WORKER = r"""
import asyncio, json, sys, time
from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.base import GenerationRequest, SamplingParams
from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
from microserve.settings import Settings

async def main(model, threads):
    path = ModelStore(Settings().cache_dir).path_for(find_builtin(model))
    engine = LlamaCppEngine(LlamaCppConfig(path=str(path), model_id=model, parallel=1, threads=threads,
                                           prefix_cache=False))
    await engine.start()
    text = "The history of the lighthouse begins with fires lit on hills to guide sailors home. " * 18
    prompt = engine.encode_prompt(text)
    print(json.dumps({"ready": len(prompt)}), flush=True)
    for line in sys.stdin:
        kind = line.strip()
        if kind == "quit":
            break
        extra = {"prompt_logprobs": 1} if kind == "score" else {}
        params = SamplingParams(max_tokens=0 if kind == "score" else 32, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        async for _ in engine.generate(GenerationRequest(kind, prompt, params, **extra)):
            pass
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
    await engine.shutdown()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


class Worker:
    """An engine in its own process, on the sources at ``src``."""

    def __init__(self, src: Path, model: str, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, model, str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.prompt_tokens = self._read()["ready"]

    def _read(self) -> dict[str, float]:
        assert self.process.stdout is not None
        return json.loads(self.process.stdout.readline())

    def run(self, kind: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(kind + "\n")
        self.process.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=60)


def baseline_sources(revision: str, into: Path) -> Path:
    """The baseline revision's ``src`` tree, unpacked from ``git archive``."""
    archive = subprocess.run(["git", "archive", revision, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Worker(baseline_sources(args.baseline, Path(tmp)), args.model, args.threads)
        new = Worker(ROOT / "src", args.model, args.threads)
        try:
            for worker in (base, new):
                worker.run("plain")  # warm-up
            times: dict[str, list[float]] = {"baseline plain": [], "this plain": [], "this scored": []}
            for i in range(args.reps):
                # Interleaved, the order swapped every repetition, so that drift falls on both.
                order = [("baseline plain", base, "plain"), ("this plain", new, "plain")]
                for name, worker, kind in order if i % 2 == 0 else order[::-1]:
                    times[name].append(worker.run(kind))
                times["this scored"].append(new.run("score"))
        finally:
            base.close()
            new.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["this plain"] / medians["baseline plain"]
    print(f"model {args.model}, prompt {new.prompt_tokens} tokens, {args.reps} repetitions, baseline {args.baseline}")
    print("| request | median s | x baseline plain |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.3f} | {value / medians['baseline plain']:.3f} |")
    verdict = ratio <= LIMIT
    print(f"plain request, this checkout / baseline = {ratio:.3f} (limit {LIMIT}): {'ok' if verdict else 'SLOWER'}")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
