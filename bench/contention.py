"""Speed on a busy machine: microserve and llama-server side by side, quiet and with CPU-bound neighbours.

Both servers run the same GGUF with their default settings (llama-server is built from the pinned llama.cpp by
``bench/peers.py``). For each condition, quiet, one neighbour (a busy loop pinned to CPU 0) and two neighbours (one
pinned to each of CPUs 0 and 1), and each concurrency, every server gets a closed-loop streamed ``/v1/completions``
load for a fixed window of time (64 tokens a request, EOS ignored, greedy), the servers taking turns (who goes
first swaps every repeat) so that the machine's drift falls on all of them alike. A window, not a request count: a
server that collapses under contention would otherwise take many minutes a cell. Throughput counts the tokens
streamed within the window (a finished request's reported usage; a request cut off by the window end, its chunks);
TTFT is over the requests that got a first token. The neighbours are this script's own processes; the machine must
otherwise be quiet (the load average is printed before and after).

The report gives tok/s and TTFT per server, condition and concurrency, each server's throughput under contention
as a fraction of its own quiet throughput, and microserve/llama-server. Extra microserve variants
(``--variant 'name=ARGS'``, where ``ARGS`` may hold ``ENV=VALUE`` words) compare thread policies in the same run.

Run it under the shared CPU lock::

    flock /tmp/microserve-cpu.lock .venv/bin/python bench/contention.py
    flock /tmp/microserve-cpu.lock .venv/bin/python bench/contention.py --model gemma-3-270m \\
        --variant 'spin=GOMP_SPINCOUNT=300000' --variant 'one-thread=--threads 1'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx

from loadgen import ServerProcess, free_port, microserve_cmd, percentile, run_load, start_server, stop_server
from peers import ensure_peers
from vs_llama_server import DEFAULT_PROMPT, resolve_model, served_model_id

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "out" / "contention"
CONDITIONS = {"quiet": (), "1 neighbour": (0,), "2 neighbours": (0, 1)}
LLAMA_SERVER = "llama-server"
MICROSERVE = "microserve"

# A CPU-bound neighbour: a busy loop pinned to one CPU, as another tenant's process would be.
NEIGHBOUR = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@dataclass
class Window:
    """One closed-loop window at a fixed concurrency (latencies in milliseconds)."""

    concurrency: int
    seconds: float
    tokens: int
    requests: int
    errors: int
    ttfts: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ttft_p50_ms(self) -> float:
        return percentile(self.ttfts, 50) * 1e3

    @property
    def ttft_p90_ms(self) -> float:
        return percentile(self.ttfts, 90) * 1e3


async def window_load(
    base_url: str, model: str, prompt: str, concurrency: int, seconds: float, max_tokens: int
) -> Window:
    """``concurrency`` workers stream requests back to back for ``seconds``; what arrived within the window."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    result = Window(concurrency, seconds, 0, 0, 0)
    start = time.perf_counter()
    deadline = start + seconds

    async def one(client: httpx.AsyncClient) -> None:
        sent = time.perf_counter()
        chunks, usage, first = 0, None, None
        try:
            async with client.stream("POST", base_url + "/v1/completions", json=payload) as response:
                if response.status_code != 200:
                    result.errors += 1
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if event.get("usage"):
                        usage = event["usage"].get("completion_tokens")
                    if any(c.get("text") for c in event.get("choices") or []) and time.perf_counter() <= deadline:
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - sent
            result.requests += 1
            result.tokens += usage if usage is not None else chunks
        except asyncio.CancelledError:
            result.tokens += chunks  # cut off by the end of the window: what arrived in it
            raise
        except (httpx.HTTPError, ValueError):
            result.errors += 1
        finally:
            if first is not None:
                result.ttfts.append(first)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            await one(client)

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


@dataclass
class Contender:
    """A started server and its windows by (condition, concurrency)."""

    name: str
    server: ServerProcess
    model_id: str
    runs: dict[tuple[str, int], list[Window]] = field(default_factory=dict)
    error: str | None = None


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """``name=ARGS`` → (name, CLI args, environment); ``ENV=VALUE`` words in ARGS go to the environment."""
    name, _, rest = text.partition("=")
    args: list[str] = []
    env: dict[str, str] = {}
    for word in rest.split():
        key, eq, value = word.partition("=")
        if eq and key.isupper():
            env[key] = value
        else:
            args.append(word)
    return name.strip(), args, env


def start_neighbours(cpus: tuple[int, ...]) -> list[subprocess.Popen[bytes]]:
    """One busy loop per CPU in ``cpus``; they run until stopped."""
    usable = sorted(os.sched_getaffinity(0))
    return [
        subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(usable[cpu % len(usable)])], start_new_session=True)
        for cpu in cpus
    ]


def stop_neighbours(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(timeout=10)


def start(
    name: str,
    cmd: list[str],
    port: int,
    health: str,
    fallback: str,
    args: argparse.Namespace,
    env: dict[str, str] | None = None,
) -> Contender | None:
    """Start a server, find its model id, warm it up; None (with the reason printed) if it cannot serve."""
    base = f"http://127.0.0.1:{port}"
    print(f"== {name}: {' '.join(cmd)}" + (f"  env {env}" if env else ""), flush=True)
    try:
        server = start_server(name, cmd, base, base + health, timeout_s=240, log_path=args.out / f"{name}.log", env=env)
    except Exception as exc:  # the other servers' numbers are still worth having
        print(f"!! {name} did not start: {exc}", file=sys.stderr, flush=True)
        return None
    model_id = served_model_id(base, fallback)
    warm = asyncio.run(run_load(base, model_id, args.prompt, 2, 4, args.max_tokens))
    if warm.n_ok == 0:
        print(f"!! {name} failed its warm-up: {warm.errors[:2]}", file=sys.stderr, flush=True)
        stop_server(server)
        return None
    return Contender(name, server, model_id)


def sweep(contenders: list[Contender], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every condition, concurrency and repeat, the servers taking turns; the load averages seen."""
    loads = []
    for condition in args.conditions:
        neighbours = start_neighbours(CONDITIONS[condition])
        try:
            time.sleep(1.0)  # let the neighbours settle on their CPUs
            for c in args.concurrency:
                for repeat in range(args.repeats):
                    order = contenders if repeat % 2 == 0 else contenders[::-1]
                    for who in order:
                        load = os.getloadavg()[0]
                        result = asyncio.run(
                            window_load(who.server.base_url, who.model_id, args.prompt, c, args.window, args.max_tokens)
                        )
                        who.runs.setdefault((condition, c), []).append(result)
                        loads.append({"condition": condition, "c": c, "server": who.name, "load1": load})
                        print(
                            f"  {condition:<13} c={c:<2} {who.name:<26} {result.tok_s:7.1f} tok/s  "
                            f"ttft p50 {result.ttft_p50_ms:8.1f} ms p90 {result.ttft_p90_ms:8.1f} ms  "
                            f"{result.requests} done, {result.errors} failed  (load1 {load:.2f})",
                            flush=True,
                        )
        finally:
            stop_neighbours(neighbours)
    return loads


def median(runs: list[Window]) -> Window | None:
    ordered = sorted(runs, key=lambda r: r.tok_s)
    return ordered[len(ordered) // 2] if ordered else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def report(contenders: list[Contender], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print the table (markdown) and return its rows."""
    rows = []
    for who in contenders:
        for c in args.concurrency:
            quiet = median(who.runs.get(("quiet", c), []))
            for condition in args.conditions:
                res = median(who.runs.get((condition, c), []))
                if res is None:
                    continue
                peer = next((x for x in contenders if x.name == LLAMA_SERVER), None)
                peer_res = median(peer.runs.get((condition, c), [])) if peer is not None else None
                rows.append(
                    {
                        "server": who.name,
                        "condition": condition,
                        "c": c,
                        "tok_s": res.tok_s,
                        "ttft_p50_ms": res.ttft_p50_ms,
                        "ttft_p90_ms": res.ttft_p90_ms,
                        "done": res.requests,
                        "failed": res.errors,
                        "vs_quiet": res.tok_s / quiet.tok_s if quiet and quiet.tok_s else None,
                        "vs_llama_server": res.tok_s / peer_res.tok_s if peer_res and peer_res.tok_s else None,
                    }
                )
    print("\n| server | condition | c | tok/s | TTFT p50 ms | TTFT p90 ms | done | / own quiet | / llama-server |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in sorted(rows, key=lambda r: (r["c"], list(CONDITIONS).index(r["condition"]), r["server"])):
        print(
            f"| {row['server']} | {row['condition']} | {row['c']} | {_fmt(row['tok_s'])} | "
            f"{_fmt(row['ttft_p50_ms'])} | {_fmt(row['ttft_p90_ms'])} | {row['done']} | "
            f"{_fmt(row['vs_quiet'], '.2f')} | {_fmt(row['vs_llama_server'], '.2f')} |"
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct, gemma-3-270m or a GGUF")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--conditions", type=lambda s: s.split(","), default=list(CONDITIONS))
    p.add_argument("--window", type=float, default=15.0, help="seconds of load per cell (default 15)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="windows per cell; the median by tok/s is kept")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--variant", action="append", default=[], help="an extra microserve: 'name=ARGS'")
    p.add_argument("--no-llama-server", action="store_true", help="compare microserve variants only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    unknown = [c for c in args.conditions if c not in CONDITIONS]
    if unknown:
        raise SystemExit(f"unknown conditions {unknown}; known: {list(CONDITIONS)}")
    model_path, microserve_model = resolve_model(args.model)
    before = os.getloadavg()
    print(f"model {model_path}\nload average before: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}", flush=True)
    contenders: list[Contender] = []
    try:
        if not args.no_llama_server:
            port = free_port()
            binary = ensure_peers().llama_server
            cmd = [str(binary), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port)]
            who = start(LLAMA_SERVER, cmd, port, "/health", model_path.name, args)
            if who is not None:
                contenders.append(who)
        for label, extra, env in [(MICROSERVE, [], {}), *(parse_variant(v) for v in args.variant)]:
            port = free_port()
            name = MICROSERVE if label == MICROSERVE else f"{MICROSERVE} {label}"
            cmd = [*microserve_cmd(port, "--model", microserve_model), *extra]
            who = start(name, cmd, port, "/v1/health/ready", microserve_model, args, env=env)
            if who is not None:
                contenders.append(who)
        loads = sweep(contenders, args)
    finally:
        for who in contenders:
            stop_server(who.server)
    rows = report(contenders, args)
    after = os.getloadavg()
    print(f"\nload average after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} (the neighbours' own load included)")
    result = {
        "model": args.model,
        "model_path": str(model_path),
        "cpus": sorted(os.sched_getaffinity(0)),
        "load_before": before,
        "load_after": after,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "loads": loads,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return 0 if contenders else 2


if __name__ == "__main__":
    sys.exit(main())
