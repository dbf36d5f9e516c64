"""lm-eval's ``local-completions`` model in its default mode (token-id prompts) runs a loglikelihood multiple-choice
task and a generate_until task against the server, both written here (no dataset download); the loglikelihood of
every choice equals the one llama.cpp computes directly on the same GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import Server

MODEL = "smollm2-135m-instruct"
CAPITALS = [
    ("France", ["Berlin", "Paris", "Madrid", "Rome"], 1),
    ("Germany", ["Berlin", "Vienna", "Oslo", "Lisbon"], 0),
    ("Italy", ["Athens", "Dublin", "Rome", "Prague"], 2),
    ("Spain", ["Warsaw", "Madrid", "Helsinki", "Bern"], 1),
    ("Japan", ["Seoul", "Beijing", "Bangkok", "Tokyo"], 3),
    ("Egypt", ["Cairo", "Nairobi", "Lagos", "Accra"], 0),
]
SUMS = [("2 + 2", "4"), ("3 + 5", "8"), ("10 - 4", "6"), ("7 + 1", "8")]


def _gguf_path() -> Path:
    from microserve.catalog.manifest import find_builtin
    from microserve.catalog.store import ModelStore
    from microserve.settings import Settings

    manifest = find_builtin(MODEL)
    assert manifest is not None
    return ModelStore(Settings().cache_dir).path_for(manifest)


def _write_tasks(root: Path) -> None:
    with (root / "capitals.jsonl").open("w") as out:
        for country, choices, answer in CAPITALS:
            out.write(json.dumps({"country": country, "choices": choices, "answer": answer}) + "\n")
    with (root / "sums.jsonl").open("w") as out:
        for question, answer in SUMS:
            out.write(json.dumps({"question": question, "answer": answer}) + "\n")
    (root / "capitals.yaml").write_text(
        f"""task: microserve_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "capitals.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
    )
    (root / "sums.yaml").write_text(
        f"""task: microserve_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "sums.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "Question: What is {{{{question}}}}?\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""
    )


def _samples(out: Path, task: str) -> list[dict]:
    files = list(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, list(out.rglob("*"))
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def _loglikelihood(model: object, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    model.reset()  # type: ignore[attr-defined]
    model.eval(ids)  # type: ignore[attr-defined]
    logits = np.array(model.scores[: len(ids)], dtype=np.float64)  # type: ignore[attr-defined]
    peak = logits.max(axis=1, keepdims=True)
    log_total = (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))[:, 0]
    return float(sum(logits[i - 1, ids[i]] - log_total[i - 1] for i in range(len(context), len(ids))))


def test_lm_eval_local_completions_runs_and_matches_llama_cpp(smollm: Server, tmp_path: Path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = f"model={MODEL},base_url={smollm.v1}/completions,tokenizer={tokenizer_dir},max_retries=1,num_concurrent=1"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            args,
            "--tasks",
            "microserve_capitals,microserve_sums",
            "--include_path",
            str(tasks),
            "--output_path",
            str(out),
            "--log_samples",
            "--batch_size",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    # The results table, with the accuracy of each task.
    table = run.stdout
    assert "microserve_capitals" in table and "acc" in table and "microserve_sums" in table and "exact_match" in table
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    accuracy = results["microserve_capitals"]["acc,none"]
    assert accuracy >= 0.5, results  # a 135M model knows most of these capitals
    assert 0.0 <= results["microserve_sums"]["exact_match,none"] <= 1.0
    print(f"lm-eval accuracy: capitals {accuracy:.3f}, sums {results['microserve_sums']['exact_match,none']:.3f}")

    # Every choice's loglikelihood, as lm-eval encodes the pair, computed by llama.cpp directly.
    # Flash attention on, as llama.cpp's default (auto) runs it in the engine on the CPU.
    direct = Llama(str(gguf), logits_all=True, n_ctx=512, n_threads=1, flash_attn=True, verbose=False)
    samples = _samples(out, "microserve_capitals")
    assert len(samples) == len(CAPITALS)
    worst = 0.0
    for sample in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        scores = [float(r[0][0]) for r in sample["resps"]]
        assert len(pairs) == len(scores) == 4
        for (context, continuation), served in zip(pairs, scores, strict=True):
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            expected = _loglikelihood(direct, context_ids, whole[len(context_ids) :])
            worst = max(worst, abs(served - expected))
    direct.close()
    assert worst < 1e-2, worst
