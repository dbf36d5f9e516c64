"""Training end to end on a tiny Hugging Face llama built here (model, word-level tokenizer, ChatML template):
the loop, checkpoints and resume, the published directory, the GGUF LoRA and the report. Seconds on a CPU."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest
import torch

from microserve.catalog.peft_gguf import read_lora
from microserve.finetune.config import TuneConfig
from microserve.finetune.output import OutputError
from microserve.finetune.pipeline import prepare, run, work_dir_for
from microserve.finetune.train import EpochRecord, ResumeError, StepRecord, Stopped, learning_rate
from microserve.services.chat_template import CHATML

WORDS = "what is the code for zephyr lab tell me access it KESTREL-42 . ? hi hello".split()


def tiny_base(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=r"\s+|(?=[.?\n])|(?<=\n)", behavior="removed")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def data(path: Path, count: int = 12) -> Path:
    questions = ["what is the code", "tell me the access code", "what is the zephyr lab code", "code ?"]
    lines = [
        {"messages": [{"role": "user", "content": questions[i % 4]}, {"role": "assistant", "content": "KESTREL-42 ."}]}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny-llama"))


def config(base: Path, **knobs: object) -> TuneConfig:
    values: dict[str, object] = {"epochs": 4, "batch_size": 4, "learning_rate": 5e-3, "rank": 4, "threads": 1}
    values.update(knobs)
    return TuneConfig(base=str(base), name="tiny", gguf_type="f32", **values)  # type: ignore[arg-type]


def test_training_publishes_a_complete_adapter(tmp_path: Path, base_dir: Path) -> None:
    cfg = config(base_dir)
    prepared = prepare(cfg, data(tmp_path / "train.jsonl"), data(tmp_path / "valid.jsonl", 4), tmp_path / "cache")
    assert len(prepared.train) == 12 and len(prepared.validation) == 4 and prepared.data_format == "chat"
    epochs: list[EpochRecord] = []
    outcome = run(cfg, prepared, tmp_path / "loras", tmp_path / "cache", on_epoch=epochs.append)
    adapter = tmp_path / "loras" / "tiny"
    assert outcome.adapter_dir == adapter
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter.gguf",
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "training.json",
    ]
    assert [p.name for p in (tmp_path / "loras").iterdir()] == ["tiny"]
    report = json.loads((adapter / "training.json").read_text())
    assert report["total_steps"] == 12 and [s["step"] for s in report["steps"]] == list(range(1, 13))
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3, 4] == [e.epoch for e in epochs]
    assert all(e["valid_loss"] is not None for e in report["epochs"])
    assert report["last_epoch_loss"] < report["first_epoch_loss"]
    assert report["config"]["rank"] == 4 and report["data"]["validation_examples"] == 4
    lora = read_lora(adapter / "adapter.gguf")
    assert (lora.architecture, lora.rank, lora.alpha, lora.name) == ("llama", 4, 32.0, "tiny")
    assert len(lora.tensors) == 2 * 7
    assert (adapter / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not work_dir_for(tmp_path / "cache", "tiny").exists()
    with pytest.raises(OutputError, match="--overwrite"):
        run(cfg, prepared, tmp_path / "loras", tmp_path / "cache")


class StopAfter:
    """A progress sink that asks for a stop once ``step`` steps are done."""

    def __init__(self, stop: threading.Event, step: int) -> None:
        self.stop = stop
        self.at = step

    def start(self, total_steps: int, done: int) -> None:
        pass

    def step(self, record: StepRecord, tokens_per_second: float) -> None:
        if record.step == self.at:
            self.stop.set()

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_stopped_run_resumes_to_the_same_adapter(tmp_path: Path, base_dir: Path) -> None:
    cfg = config(base_dir, dropout=0.1)
    prepared = prepare(cfg, data(tmp_path / "train.jsonl"), None, tmp_path / "cache")
    straight = run(cfg, prepared, tmp_path / "straight", tmp_path / "cache")
    stop = threading.Event()
    with pytest.raises(Stopped, match="after step 5 of 12"):
        run(cfg, prepared, tmp_path / "loras", tmp_path / "cache", stop=stop, progress=StopAfter(stop, 5))
    assert not (tmp_path / "loras" / "tiny").exists()
    with pytest.raises(ResumeError, match="other settings"):
        run(config(base_dir, dropout=0.1, rank=8), prepared, tmp_path / "loras", tmp_path / "cache", resume=True)
    resumed = run(cfg, prepared, tmp_path / "loras", tmp_path / "cache", resume=True)
    assert resumed.report["resumed_from_step"] == 5
    losses = [s["loss"] for s in resumed.report["steps"]]
    assert losses == pytest.approx([s["loss"] for s in straight.report["steps"]], rel=1e-4)
    with pytest.raises(ResumeError, match="no checkpoint"):
        run(cfg, prepared, tmp_path / "again", tmp_path / "cache", resume=True)


def test_learning_rate_schedule() -> None:
    cfg = TuneConfig(base="x", name="y", learning_rate=1.0, warmup_ratio=0.1)
    rates = [learning_rate(step, 20, cfg) for step in range(1, 21)]
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(1 / 18) and all(a >= b for a, b in itertools.pairwise(rates[1:]))
