"""The multi-turn chat workload against microserve on a local Ray Serve head: the real run that checks the
simulator's prediction.

Starts Ray with ``--cpus`` CPUs, deploys the Ray Serve application (``--replicas`` replicas of the default chat
model, one thread and one CPU each, microserve's prefix- and load-aware router), replays ``bench/chat_workload.py``'s
workload through Ray's HTTP proxy for ``--duration`` seconds, and writes the records; then

    .venv/bin/python bench/router_sim.py --compare bench/out/ray_chat_run.json --replicas 2

prints the simulator's prediction for the same workload beside it.

    flock /tmp/microserve-cpu.lock .venv/bin/python bench/ray_chat_run.py --replicas 2 --users 6 --duration 240
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from chat_workload import Workload, WorkloadSpec, replay, summarize
from microserve.scale.ray_app import RayServeOptions, build_application
from microserve.settings import Settings

SRC = Path(__file__).resolve().parent.parent / "src"


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--profile", default="llamacpp-cpu-q4_1", help="The profile bench/step_costs_t1.json was measured with."
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--duration", type=float, default=240.0)
    parser.add_argument("--warmup", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "ray_chat_run.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    port = free_port()
    # "local": a cluster of our own, even where a stale address file names an older one.
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(SRC)}}
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(model=[args.model], profile=args.profile, threads=1, embedding_model="none")
        options = RayServeOptions(replicas=args.replicas, num_cpus=1)
        started = time.monotonic()
        serve.run(build_application(settings, options), name="microserve", route_prefix="/")
        print(f"{args.replicas} replicas ready in {time.monotonic() - started:.0f} s", flush=True)
        spec = WorkloadSpec(seed=args.seed)
        url = f"http://127.0.0.1:{port}"
        records = asyncio.run(replay(url, args.model, Workload(spec), args.users, args.duration))
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = summarize(records, args.warmup, args.duration)
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "spec": spec.to_dict(),
                "users": args.users,
                "replicas": args.replicas,
                "profile": args.profile,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "summary": summary,
                "records": [dataclasses.asdict(r) for r in records],
            },
            indent=1,
        )
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
