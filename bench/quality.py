"""Answer quality and speed of SmolLM2-135M-Instruct by precision: Q4_1 (the shipped file), Q8_0, F16 and BF16.

Each wider file is derived from the shipped Q4_1 GGUF with llama.cpp's own quantizer (``derive_gguf``, which calls
``llama_model_quantize`` with ``allow_requantize``, as the F16 profile is made), so all four hold the same weights.
The questions are in ``bench/questions.py``, shared with the end-to-end test of the default model. Each is served by
``microserve serve --model <gguf>``; all four servers are up at once. Quality: a fixed set of questions with known
answers, asked greedily (temperature 0) through ``/v1/chat/completions``; an answer counts when, normalised (lower
case, accents and punctuation dropped), it contains one of the accepted answers as whole words. Speed: closed-loop
streamed ``/v1/completions`` (64 tokens, EOS ignored, c x 4 requests) at c = 1 and 16, the four servers taking
turns within each repeat (the order rotated every repeat), the median of the repeats kept; the ratio is to Q4_1 in
the same run.

    .venv/bin/python bench/quality.py [--repeats 3] [--threads 2] [--requests-per-worker 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
from pathlib import Path

import httpx

from loadgen import ServerProcess, free_port, microserve_cmd, run_load, start_server, stop_server
from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore, sha256_file
from microserve.engines.llamacpp.requantize import derive_gguf
from microserve.settings import Settings
from questions import QUESTIONS, is_right

MODEL = "smollm2-135m-instruct"
PRECISIONS = ("Q4_1", "Q8_0", "F16", "BF16")
LEVELS = (1, 16)
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle on a stormy night."


def ask(url: str, model: str, question: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 48,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def derived_files(out: Path, threads: int) -> dict[str, Path]:
    """The shipped Q4_1 file and the three derived from it (derived once, kept in ``out``)."""
    manifest = find_builtin(MODEL)
    assert manifest is not None
    shipped = ModelStore(Settings().cache_dir).ensure(manifest, manifest.profile("llamacpp-cpu-q4_1"))
    files = {"Q4_1": shipped}
    for precision in PRECISIONS[1:]:
        target = out / f"SmolLM2-135M-Instruct.{precision}.gguf"
        if not target.exists():
            derive_gguf(shipped, target, precision, threads=threads)
            print(f"derived {target.name}: sha256 {sha256_file(target)}", file=sys.stderr)
        files[precision] = target
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests-per-worker", type=int, default=4, help="requests per level = c x this")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "quality")
    parser.add_argument("--speed-only", action="store_true", help="skip the questions; measure tok/s only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # A timeout's SIGTERM must still stop the servers (they run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    files = derived_files(args.out, args.threads)

    servers: dict[str, ServerProcess] = {}
    try:
        for precision, path in files.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = microserve_cmd(port, "--model", str(path), "--served-model-name", precision)
            cmd += ["--parallel", "16", "--threads", str(args.threads), "--context-length", "1024"]
            servers[precision] = start_server(
                precision, cmd, url, f"{url}/v1/health/ready", log_path=args.out / f"serve-{precision}.log"
            )

        questions = () if args.speed_only else QUESTIONS
        answers = {p: [ask(s.base_url, p, q.text) for q in questions] for p, s in servers.items()}
        scores = {p: [is_right(a, q.accepted) for a, q in zip(answers[p], questions, strict=True)] for p in answers}
        # Printed at once: the speed runs that follow take minutes on the wide files.
        if questions:
            print_answers(files, answers, scores)
            (args.out / "answers.json").write_text(json.dumps({"answers": answers, "scores": scores}, indent=2))

        for server in servers.values():  # warm caches and allocators
            asyncio.run(run_load(server.base_url, server.name, PROMPT, 2, 2, max_tokens=8))
        rates: dict[tuple[str, int], list[float]] = {}
        order = list(servers)
        for repeat in range(args.repeats):
            turn = order[repeat % len(order) :] + order[: repeat % len(order)]
            for c in LEVELS:
                for precision in turn:
                    n = c * args.requests_per_worker
                    result = asyncio.run(run_load(servers[precision].base_url, precision, PROMPT, c, n))
                    if result.n_failed:
                        raise SystemExit(f"{precision} c={c}: {result.n_failed} requests failed: {result.errors}")
                    rates.setdefault((precision, c), []).append(result.tok_s)
                    print(f"repeat {repeat + 1} {precision} c={c}: {result.tok_s:.1f} tok/s", flush=True)
    finally:
        for server in servers.values():
            stop_server(server)

    size = {p: path.stat().st_size for p, path in files.items()}
    median = {key: statistics.median(values) for key, values in rates.items()}
    print("| precision | file MiB | right answers | tok/s c=1 | × Q4_1 | tok/s c=16 | × Q4_1 |")
    print("|---|---|---|---|---|---|---|")
    for p in files:
        one, many = median[(p, 1)], median[(p, 16)]
        print(
            f"| {p} | {size[p] / 2**20:.0f} | {sum(scores[p])}/{len(questions)} | {one:.1f} | "
            f"{one / median[('Q4_1', 1)]:.2f} | {many:.1f} | {many / median[('Q4_1', 16)]:.2f} |"
        )
    report = {
        "questions": [q.text for q in QUESTIONS],
        "answers": answers,
        "right": {p: sum(s) for p, s in scores.items()},
        "tok_s": {f"{p} c={c}": v for (p, c), v in rates.items()},
        "size": size,
    }
    (args.out / ("speed.json" if args.speed_only else "quality.json")).write_text(json.dumps(report, indent=2))
    return 0


def print_answers(files: dict[str, Path], answers: dict[str, list[str]], scores: dict[str, list[bool]]) -> None:
    """The answers, question by question, as a markdown table."""
    print("| question | " + " | ".join(files) + " |")
    print("|---|" + "---|" * len(files))
    for i, q in enumerate(QUESTIONS):
        cells = [("right" if scores[p][i] else "wrong") + f": {_cell(answers[p][i])}" for p in files]
        print(f"| {q.text} | " + " | ".join(cells) + " |")
    print("| right answers | " + " | ".join(f"{sum(scores[p])}/{len(QUESTIONS)}" for p in files) + " |", flush=True)


def _cell(answer: str) -> str:
    text = " ".join(answer.split())
    text = text if len(text) <= 60 else text[:57] + "..."
    return text.replace("|", "\\|")


if __name__ == "__main__":
    raise SystemExit(main())
