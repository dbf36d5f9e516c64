"""What a change of adapter set costs a decode step, and the ceiling that puts on a mixed adapter load.

llama.cpp applies LoRA adapters to a whole context, so microserve's scheduler decodes one adapter set per step and
the sets with work take turns (bench/lora_mix.py measures that load through the server). Each time the context's
adapter set changes, llama.cpp re-reserves its compute graph before the next decode. This times decode steps on
the engine alone, the four kinds interleaved round by round:

- ``base x2``: two sequences, no adapter;
- ``same x2``: two sequences, the same adapter every step;
- ``turns x2``: two sequences of a different set every step (base, a, b, c: what four sets with work get);
- ``base x8``: all eight sequences, no adapter (the base-only load's step).

and prints the switch cost (``turns`` over ``same``) and the engine-only ceiling of lora_mix's ratio for four
sets of two: one eight-sequence step against four two-sequence steps, with and without the switches.

    .venv/bin/python bench/adapter_switch.py --repeats 5
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from tiny_lora import write_gguf_lora

from microserve.settings import Settings

SLOTS = 8
PROMPT = 64  # tokens of history per sequence before the timed steps


class Engine:
    """One llama.cpp context laid out as microserve's engine lays it out (one KV stream per slot)."""

    def __init__(self, gguf: Path, loras: list[Path], threads: int, context: int) -> None:
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        self.loras = [L.llama_adapter_lora_init(self.model, str(p).encode()) for p in loras]
        params = L.llama_context_default_params()
        params.n_ctx = SLOTS * context
        params.n_seq_max = SLOTS
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, params)
        self.batch = L.llama_batch_init(512, 0, SLOTS)
        self.pos = [0] * SLOTS
        self.adapter: int | None = None
        for seq in range(SLOTS):
            for _ in range(PROMPT // 16):
                self.decode([seq] * 16, same_seq=True)

    def use(self, adapter: int | None) -> None:
        if adapter is None:
            L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            handles = (L.llama_adapter_lora_p_ctypes * 1)(self.loras[adapter])
            L.llama_set_adapters_lora(self.ctx, handles, 1, (ctypes.c_float * 1)(1.0))

    def decode(self, seqs: list[int], same_seq: bool = False) -> None:
        for n, seq in enumerate(seqs):
            self.batch.token[n] = 200 + self.pos[seq] % 97
            self.batch.pos[n] = self.pos[seq]
            self.batch.n_seq_id[n] = 1
            self.batch.seq_id[n][0] = seq
            self.batch.logits[n] = not same_seq or n == len(seqs) - 1
            self.pos[seq] += 1
        self.batch.n_tokens = len(seqs)
        if L.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        for lora in self.loras:
            L.llama_adapter_lora_free(lora)
        L.llama_model_free(self.model)


def kinds(engine: Engine) -> dict[str, Callable[[int], None]]:
    sets: list[int | None] = [None, 0, 1, 2]

    def base2(step: int) -> None:
        engine.use(None)
        engine.decode([0, 1])

    def same2(step: int) -> None:
        engine.use(0)
        engine.decode([2, 3])

    def turns2(step: int) -> None:
        k = step % 4
        engine.use(sets[k])
        engine.decode([2 * k, 2 * k + 1])

    def base8(step: int) -> None:
        engine.use(None)
        engine.decode(list(range(SLOTS)))

    return {"base x2": base2, "same x2": same2, "turns x2": turns2, "base x8": base8}


def measure(gguf: Path, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        loras = [write_gguf_lora(Path(tmp) / f"lora-{i}", seed=i, base=gguf) for i in range(3)]
        engine = Engine(gguf, loras, args.threads, args.context)
        try:
            timings: dict[str, list[float]] = {}
            table = kinds(engine)
            for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
                order = list(table.items())
                if repeat % 2:
                    order.reverse()
                for name, step in order:
                    step(0)  # into this kind's adapter state before the clock starts
                    started = time.perf_counter()
                    for i in range(1, args.steps + 1):
                        step(i)
                    if repeat:
                        timings.setdefault(name, []).append((time.perf_counter() - started) / args.steps * 1000)
        finally:
            engine.close()
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--gguf", type=Path, action="append", help="GGUF files (default: the model's in the cache)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096, help="tokens per slot, as the server's default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ggufs = args.gguf or sorted((Settings().cache_dir / "models" / args.model).glob("*/*.gguf"))
    if not ggufs:
        print(f"no GGUF of {args.model} in the model cache: start `microserve serve --model {args.model}` once")
        return 1
    L.llama_backend_init()
    # Bound to a local that lives as long as main: llama.cpp keeps calling it.
    quiet: Any = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(quiet, None)
    print(f"{SLOTS} slots x {args.context} tokens, {args.threads} threads, median of {args.repeats} rounds")
    print("| GGUF | base x2 ms | same x2 ms | turns x2 ms | base x8 ms | switch | ceiling | ceiling, no switch |")
    print("|---|---|---|---|---|---|---|---|")
    for gguf in ggufs:
        ms = measure(gguf, args)
        switch = ms["turns x2"] / ms["same x2"]
        with_turns = ms["base x8"] / (4 * ms["turns x2"])
        without = ms["base x8"] / (ms["base x2"] + 3 * ms["same x2"])
        print(
            f"| {gguf.name} | {ms['base x2']:.1f} | {ms['same x2']:.1f} | {ms['turns x2']:.1f} | {ms['base x8']:.1f} "
            f"| {switch:.2f}x | {with_turns:.2f} | {without:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
