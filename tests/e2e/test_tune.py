"""`microserve tune` end to end on the default model: a fact taught, bad data refused, Ctrl-C and --resume, and
the converted GGUF LoRA applied by llama.cpp itself.

Answers are checked with llama-cpp-python's own high-level ``Llama(lora_path=...)`` on the GGUF the model was
trained from (the shipped Q4_1 file; the served F16 profile holds the same weights), prompted with the chat template
the server renders, greedy. Run under the CPU lock: these tests train.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fact_data import CODE, held_out_questions, write

from microserve.finetune.base import GgufTokenizer, chat_template, resolve_base
from microserve.settings import Settings

MODEL = "smollm2-135m-instruct"


def tune(
    tmp: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microserve", "tune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=tmp,
    )


class Answerer:
    """Greedy answers from llama.cpp with or without a GGUF LoRA, prompted exactly as the server prompts."""

    def __init__(self, lora: Path | None) -> None:
        from llama_cpp import Llama

        base = resolve_base(MODEL, Settings().cache_dir)
        self.tokenizer = GgufTokenizer(base.path)
        self.template = chat_template(base, self.tokenizer)
        self.llm = Llama(
            str(base.path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2, verbose=False, seed=0
        )

    def ask(self, question: str) -> str:
        prompt = self.template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        tok = self.tokenizer
        ids = tok.encode(prompt, add_special=tok.add_bos and not prompt.startswith(tok.bos_token))
        out = self.llm.create_completion(ids, max_tokens=24, temperature=0.0, stop=["<|im_end|>"])
        return str(out["choices"][0]["text"])  # type: ignore[index]

    def close(self) -> None:
        self.llm.close()
        self.tokenizer.close()


@pytest.mark.timeout(1500)
def test_tune_teaches_the_default_model_a_fact(tmp_path: Path) -> None:
    train, _ = write(tmp_path / "data")
    lora_dir = tmp_path / "loras"
    started = time.monotonic()
    result = tune(
        tmp_path, str(train), "--model", MODEL, "--name", "zephyr", "--lora-dir", str(lora_dir), "--threads", "2"
    )
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = lora_dir / "zephyr"
    names = sorted(p.name for p in adapter.iterdir())
    assert names == ["adapter.gguf", "adapter_config.json", "adapter_model.safetensors", "loss.png", "training.json"]
    assert not [p for p in lora_dir.iterdir() if p.name.startswith(".")]  # no staging left behind
    report = json.loads((adapter / "training.json").read_text())
    assert report["config"]["name"] == "zephyr" and report["data"]["training_examples"] == 60
    assert len(report["steps"]) == report["total_steps"] and report["threads"] == 2
    assert report["last_epoch_loss"] < report["first_epoch_loss"] / 2, report["epochs"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == MODEL

    questions = held_out_questions()
    base = Answerer(None)
    base_answers = [base.ask(q) for q in questions]
    base.close()
    tuned = Answerer(adapter / "adapter.gguf")
    tuned_answers = [tuned.ask(q) for q in questions]
    tuned.close()
    hits = sum(CODE in a for a in tuned_answers)
    print(
        f"\ntune wall {wall:.0f}s (training {report['wall_seconds']:.0f}s, {report['total_steps']} steps); "
        f"held-out with the code: adapter {hits}/10, base {sum(CODE in a for a in base_answers)}/10; "
        f"loss {report['first_epoch_loss']:.3f} -> {report['last_epoch_loss']:.3f}"
    )
    for question, answer in zip(questions, tuned_answers, strict=True):
        print(f"  {question!r} -> {answer!r}")
    assert sum(CODE in a for a in base_answers) == 0, base_answers
    assert hits >= 8, tuned_answers


def test_bad_data_exits_2_listing_each_line_and_trains_nothing(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "bad.jsonl"
    data.write_text(
        "\n".join(
            [
                json.dumps(good),
                '{"messages": [{"role": "user"',
                json.dumps({"messages": [{"role": "user", "content": "hello?"}]}),
                json.dumps(long),
            ]
        )
        + "\n"
    )
    lora_dir = tmp_path / "loras"
    result = tune(tmp_path, str(data), "--name", "bad", "--lora-dir", str(lora_dir), "--max-seq-len", "256")
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "nothing was trained" in err and "3 invalid lines" in err
    assert "line 2: invalid JSON" in err
    assert "line 3: no assistant message" in err
    assert "line 4:" in err and "over the sequence limit of 256" in err
    assert "line 1" not in err
    assert not lora_dir.exists() or not any(lora_dir.iterdir())


@pytest.mark.timeout(1200)
def test_ctrl_c_stops_cleanly_and_resume_finishes(tmp_path: Path) -> None:
    train, _ = write(tmp_path / "data", count=16)
    lora_dir = tmp_path / "loras"
    cache = tmp_path / "cache"
    args = [str(train), "--name", "resumed", "--lora-dir", str(lora_dir), "--threads", "2"]
    args += ["--epochs", "2", "--batch-size", "4", "--rank", "8"]
    # The base model comes from the shared cache; checkpoints go to a cache of this test's own.
    env = {"MICROSERVE_CACHE": str(Settings().cache_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "microserve", "tune", *args, "--cache-dir", str(cache)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("epoch 1:"):
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=600)
    err = "".join(seen) + rest
    assert process.returncode == 130, err
    assert "run the same command with --resume" in err
    assert (cache / "tune" / "resumed" / "checkpoint" / "state.json").is_file()
    assert not (lora_dir / "resumed").exists()
    resumed = tune(tmp_path, *args, "--cache-dir", str(cache), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stderr
    report = json.loads((lora_dir / "resumed" / "training.json").read_text())
    assert report["resumed_from_step"] >= 4
    assert [s["step"] for s in report["steps"]] == list(range(1, 9))
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert not (cache / "tune" / "resumed").exists()  # the finished adapter's checkpoint is cleaned up


@pytest.mark.timeout(900)
def test_converted_adapter_applies_in_llamacpp_as_in_transformers(tmp_path: Path) -> None:
    """A random LoRA on every projection: llama.cpp's logit change equals transformers' (permutation and scale)."""
    import torch
    from llama_cpp import Llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from microserve.catalog.peft_gguf import BaseFacts, convert_peft

    base = resolve_base(MODEL, Settings().cache_dir)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(base.path.parent), gguf_file=base.path.name, dtype=torch.float32)
    torch.manual_seed(3)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=modules, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    tokenizer = GgufTokenizer(base.path)
    ids = tokenizer.encode("The capital of France is", add_special=tokenizer.add_bos)
    tokenizer.close()
    with torch.no_grad():
        with peft_model.disable_adapter():
            hf_base = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
        hf_tuned = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
    facts = BaseFacts.from_gguf(base.path)
    for out_type in ("f32", "q8_0"):
        gguf = tmp_path / f"adapter-{out_type}.gguf"
        convert_peft(tmp_path / "peft", gguf, facts, out_type=out_type)  # type: ignore[arg-type]

        def logits(lora: Path | None) -> np.ndarray:
            llm = Llama(
                str(base.path),
                lora_path=str(lora) if lora else None,
                n_ctx=64,
                logits_all=True,
                n_threads=2,
                verbose=False,
            )
            llm.eval(ids)
            scores = np.array(llm.scores[len(ids) - 1])
            greedy = llm.create_completion(ids, max_tokens=8, temperature=0.0)["choices"][0]["text"]  # type: ignore[index]
            llm.close()
            return scores, greedy  # type: ignore[return-value]

        cpp_base, base_text = logits(None)
        cpp_tuned, tuned_text = logits(gguf)
        hf_delta, cpp_delta = hf_tuned - hf_base, cpp_tuned - cpp_base
        correlation = float(np.corrcoef(hf_delta, cpp_delta)[0, 1])
        ratio = float(np.linalg.norm(cpp_delta) / np.linalg.norm(hf_delta))
        print(
            f"\n{out_type}: delta correlation {correlation:.4f}, norm ratio {ratio:.3f}, "
            f"{base_text!r} -> {tuned_text!r}"
        )
        assert np.linalg.norm(hf_delta) > 1.0  # the adapter matters
        assert correlation > 0.95 and 0.9 < ratio < 1.1
        assert tuned_text != base_text
