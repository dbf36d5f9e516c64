"""Side-by-side benchmark: microserve's vLLM engine against vLLM's own OpenAI server, same weights, same machine.

Both servers run the same Hugging Face directory with the same engine limits (``max_num_seqs``, ``max_model_len``, KV
budget, eager mode, prefix caching on), are up at once and take turns under the same closed-loop load as
``bench/vs_llama_server.py``: for each concurrency and repeat one run of each (the order reversed every repeat), so
that the machine's drift falls on both. What the ratio measures is microserve's layer over the engine (HTTP, request
validation, templating, streaming); the engine underneath is the same.

Loads (``--mode``):

``realistic`` (the default): streamed ``/v1/chat/completions``, temperature 0.8 and top_p 0.95, prompts of mixed
  lengths (log-uniform over ``--prompt-tokens``) and outputs of mixed lengths (``--output-tokens``), EOS ignored so
  that both produce the same lengths; each server gets its own prompts of the same lengths (no shared prefix cache).
``greedy``: streamed ``/v1/completions`` of a ~32-token prompt, ``--max-tokens`` tokens, temperature 0, EOS ignored.

Weights: ``--weights DIR`` serves a Hugging Face directory on both (microserve is given the path); without it, the
built-in ``--model`` with ``--profile`` (default SmolLM2 on ``vllm-cpu-f32``, the F32 weights microserve derives from
the packaged GGUF; the first start derives them, about a minute) and vLLM's server is pointed at that directory in
microserve's store.

vLLM's server is started as ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the ``vllm``
command itself fails under the CPU build, which is not the distribution named vllm). Run from a Python with vLLM and
microserve installed (``make test-vllm`` builds ``.venv-vllm``)::

    .venv-vllm/bin/python bench/vs_vllm.py --repeats 3                       # CPU: vllm-cpu, c = 1,4,8,16
    python bench/vs_vllm.py --weights DIR --concurrency 1,8,32,128 --gpu     # an NVIDIA GPU (bench/gpu.sh)

It prints the table (tok/s, TTFT and ITL p50 of each, and microserve's ratios) and writes ``vs_vllm-<mode>.json`` to
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Runnable both as ``python bench/vs_vllm.py`` and as ``python -m bench.vs_vllm``.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadResult, ServerProcess, free_port, run_load, run_payloads, stop_server
from vs_llama_server import (
    DEFAULT_PROMPT,
    SAMPLING,
    Contender,
    ServerRun,
    Shape,
    _fmt,
    _int_list,
    _int_pair,
    _ratio,
    _result,
    chat_payload,
    cpu_model,
    interleaved_sweep,
    median_run,
    mixed_shapes,
    served_model_id,
    start_named,
    text_of,
    warm_up,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "out"
MICROSERVE = "microserve (vllm engine)"
VLLM = "vllm serve"
GOAL = 0.95


class HfTokenizer:
    """The served directory's own tokenizer, to size prompts in tokens."""

    def __init__(self, weights: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(weights))

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self._tok.encode(text, add_special_tokens=False))


def store_weights(model: str, profile: str) -> Path:
    """Where microserve keeps (or will derive) the Hugging Face directory of a built-in model's vLLM profile."""
    from microserve.catalog.manifest import find_builtin
    from microserve.catalog.store import ModelStore
    from microserve.settings import Settings

    manifest = find_builtin(model)
    if manifest is None:
        raise SystemExit(f"--model {model!r} is not a built-in model; give --weights DIR instead")
    chosen = manifest.profile(profile)
    if chosen is None or chosen.engine != "vllm":
        raise SystemExit(f"{model} has no vLLM profile {profile!r}")
    return ModelStore(Settings().cache_dir).path_for(manifest, chosen)


def engine_limits(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The same engine limits as microserve flags and as vLLM server flags."""
    ours = ["--parallel", str(args.parallel), "--context-length", str(args.context_length)]
    theirs = ["--max-num-seqs", str(args.parallel), "--max-model-len", str(args.context_length)]
    if args.kv_cache_mb is not None:
        ours += ["--vllm-kv-cache-mb", str(args.kv_cache_mb)]
        theirs += ["--kv-cache-memory-bytes", str(args.kv_cache_mb << 20)]
    if args.gpu_memory_utilization is not None:
        ours += ["--vllm-gpu-memory-utilization", str(args.gpu_memory_utilization)]
        theirs += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.enforce_eager:
        ours.append("--vllm-enforce-eager")
        theirs.append("--enforce-eager")
    return ours, theirs


def print_report(runs: list[ServerRun], concurrencies: list[int]) -> list[dict[str, Any]]:
    """Print both servers' figures and microserve's ratios; return the ratio rows."""
    header = f"{'server':<26}{'c':>5}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}{'ITL p50':>9}{'ITL p90':>9}{'ok':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for c in concurrencies:
        for run in runs:
            res = _result(run, c)
            if res is None:
                continue
            print(
                f"{run.server:<26}{c:>5}{res.tok_s:>9.1f}{_fmt(res.ttft_p50_ms):>10}{_fmt(res.ttft_p90_ms):>10}"
                f"{_fmt(res.itl_p50_ms):>9}{_fmt(res.itl_p90_ms):>9}{f'{res.n_ok}/{res.n_requests}':>9}"
            )
    print("(times in ms)")
    by_name = {run.server: run for run in runs}
    rows = []
    print(f"\n{'c':>5}{'tok/s ratio':>13}{'TTFT p50 ratio':>16}{'ITL p50 ratio':>15}   goal: tok/s >= {GOAL}")
    for c in concurrencies:
        ours, theirs = _result(by_name.get(MICROSERVE), c), _result(by_name.get(VLLM), c)
        if ours is None or theirs is None:
            continue
        row = {
            "concurrency": c,
            "tok_s_ratio": _ratio(ours.tok_s, theirs.tok_s),
            "ttft_p50_ratio": _ratio(ours.ttft_p50_ms, theirs.ttft_p50_ms),
            "itl_p50_ratio": _ratio(ours.itl_p50_ms, theirs.itl_p50_ms),
        }
        rows.append(row)
        met = "met" if (row["tok_s_ratio"] or 0) >= GOAL else "NOT met"
        print(
            f"{c:>5}{_fmt(row['tok_s_ratio'], '.3f'):>13}{_fmt(row['ttft_p50_ratio'], '.3f'):>16}"
            f"{_fmt(row['itl_p50_ratio'], '.3f'):>15}   {met}"
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="a Hugging Face model directory to serve on both")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in model, when no --weights")
    p.add_argument("--profile", default="vllm-cpu-f32", help="its vLLM profile, when no --weights")
    p.add_argument("--mode", choices=["realistic", "greedy"], default="realistic", help="the load (default realistic)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 8, 16], help="comma list (default 1,4,8,16)")
    p.add_argument("--parallel", type=int, help="max_num_seqs on both (default: the highest concurrency)")
    p.add_argument("--context-length", type=int, default=2048, help="max_model_len on both (default 2048)")
    p.add_argument("--kv-cache-mb", type=int, help="KV cache budget on both (default: 1024 on a CPU, unset on a GPU)")
    p.add_argument("--gpu-memory-utilization", type=float, help="on a GPU, the share of memory vLLM may take")
    p.add_argument("--gpu", action="store_true", help="a GPU run: no KV default, torch.compile and CUDA graphs on")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, help="eager mode (default: on a CPU)")
    p.add_argument("--requests-per-worker", type=int, default=4, help="requests = c x this, at least 8 (default 4)")
    p.add_argument("--prompt-tokens", type=_int_pair, default=(32, 1024), help="realistic prompt range (32,1024)")
    p.add_argument("--output-tokens", type=_int_pair, default=(16, 256), help="realistic output range (16,256)")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy: tokens per request (default 64)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="greedy: prompt text")
    p.add_argument("--repeats", type=int, default=1, help="runs per concurrency; the median by tok/s is kept")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for readiness (default 900)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/out)")
    args = p.parse_args(argv)
    args.parallel = args.parallel or max(args.concurrency)
    if args.enforce_eager is None:
        args.enforce_eager = not args.gpu
    if args.kv_cache_mb is None and not args.gpu:
        args.kv_cache_mb = 1024
    return args


def main(argv: list[str] | None = None) -> int:
    """Start both servers, run the interleaved sweep and write the report."""
    args = parse_args(argv)
    realistic = args.mode == "realistic"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ours_limits, theirs_limits = engine_limits(args)

    servers: list[ServerProcess] = []
    contenders: list[Contender] = []
    failed: list[ServerRun] = []
    env_note = {}

    def add(name: str, cmd: list[str], health: str, port: int, fallback_id: str) -> None:
        started_one = start_named(name, cmd, port, health, args, out)
        if isinstance(started_one, ServerRun):
            failed.append(started_one)
            return
        servers.append(started_one)
        contenders.append(Contender(name, started_one, served_model_id(started_one.base_url, fallback_id), None))

    # The CPU build reads its KV budget from this variable and would override the flag on both servers.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        port = free_port()
        ours_cmd = [sys.executable, "-m", "microserve", "serve", "--port", str(port), "--embedding-model", "none"]
        if args.weights is not None:
            weights = args.weights.resolve()
            ours_cmd += ["--model", str(weights)]
            served = weights.name
        else:
            ours_cmd += ["--model", args.model, "--profile", args.profile]
            served = args.model
        # microserve first: without --weights, it derives the directory vLLM's server is then pointed at.
        add(MICROSERVE, ours_cmd + ours_limits, "/v1/health/ready", port, served)
        if args.weights is None:
            weights = store_weights(args.model, args.profile)
        if not (weights / "config.json").is_file():
            raise SystemExit(f"no Hugging Face directory at {weights}")
        env_note["weights"] = str(weights)
        port = free_port()
        theirs_cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights),
            "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port),
            "--disable-log-stats", *theirs_limits,
        ]  # fmt: skip
        add(VLLM, theirs_cmd, "/health", port, served)
        print(f"\nweights {weights}  mode {args.mode}  limits {' '.join(theirs_limits)}", flush=True)

        tokenizer = HfTokenizer(weights) if realistic else None
        for who in contenders:
            try:
                payload = (lambda text, who=who: chat_payload(who.model_id, text, 16, who.extra)) if realistic else None
                warm_up(who, payload, args.prompt, args.max_tokens)
            except Exception as exc:
                print(f"!! {who.name} could not be warmed up: {exc}", file=sys.stderr, flush=True)
                who.error = f"{type(exc).__name__}: {exc}"

        def shapes_for(c: int, repeat: int) -> list[Shape]:
            n = max(8, c * args.requests_per_worker)
            return mixed_shapes(n, 1000 * c + repeat, args.prompt_tokens, args.output_tokens)

        def realistic_load(who: Contender, c: int, repeat: int) -> LoadResult:
            assert tokenizer is not None
            # Own prompts per server, the same lengths: neither profits from a prefix the other was sent.
            rng = random.Random(f"{c}-{repeat}-{who.name}")
            payloads = [
                chat_payload(who.model_id, text_of(s.prompt_tokens, rng, tokenizer), s.max_tokens, who.extra)  # type: ignore[arg-type]
                for s in shapes_for(c, repeat)
            ]
            return asyncio.run(run_payloads(who.server.base_url, "/v1/chat/completions", payloads, c))

        def greedy_load(who: Contender, c: int, repeat: int) -> LoadResult:
            requests = max(8, c * args.requests_per_worker)
            return asyncio.run(run_load(who.server.base_url, who.model_id, args.prompt, c, requests, args.max_tokens))

        interleaved_sweep(contenders, args, realistic_load if realistic else greedy_load)
    finally:
        for server in servers:
            stop_server(server, grace_s=60)

    runs = [median_run(c, args.concurrency) for c in contenders] + failed
    if realistic:
        print(f"\nchat, prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens, outputs "
              f"{args.output_tokens[0]}-{args.output_tokens[1]}, temperature 0.8, top_p 0.95; "
              f"median of {args.repeats} by tok/s")  # fmt: skip
    else:
        print(f"\ngreedy completions, {args.max_tokens} tokens; median of {args.repeats} by tok/s")
    rows = print_report(runs, args.concurrency)
    report = {
        "mode": args.mode,
        **env_note,
        "limits": theirs_limits,
        "concurrency": args.concurrency,
        "requests_per_worker": args.requests_per_worker,
        "repeats": args.repeats,
        "load": (
            {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "sampling": SAMPLING}
            if realistic
            else {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
        ),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "ratios": rows,
        "servers": [
            {
                "server": w.name,
                "error": w.error,
                "median": [x.summary() for x in median_run(w, args.concurrency).results],
                "runs": {c: [x.summary() for x in w.runs.get(c, [])] for c in args.concurrency},
            }
            for w in contenders
        ]
        + [{"server": r.server, "error": r.error} for r in failed],
        "median_tok_s": {
            w.name: {c: statistics.median(x.tok_s for x in w.runs[c]) for c in w.runs} for w in contenders
        },
    }
    path = out / f"vs_vllm-{args.mode}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
