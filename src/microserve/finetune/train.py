"""LoRA training with peft on transformers' model of the base, on torch's CPU build or a GPU.

The loop is small on purpose: AdamW with linear warm-up and decay, micro-batches padded to their longest
example, loss averaged over the assistant (labelled) tokens of each optimizer step. Stops happen between steps:
a stop request (Ctrl-C, SIGTERM, a cancelled job) finishes the current step, writes a checkpoint and raises
:class:`Stopped`; ``resume`` continues from that checkpoint with the same data order and the same result.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from microserve.finetune.base import BaseModel
from microserve.finetune.config import TuneConfig
from microserve.finetune.render import IGNORE, Encoded


class Stopped(Exception):
    """Training stopped on request after ``step`` steps; a checkpoint was written."""

    def __init__(self, step: int, total: int) -> None:
        self.step = step
        self.total = total
        super().__init__(f"stopped after step {step} of {total}; a checkpoint was saved")


class ResumeError(Exception):
    """A checkpoint exists but belongs to other data or other settings."""


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One optimizer step."""

    step: int
    epoch: int
    loss: float
    learning_rate: float
    tokens: int
    elapsed_s: float


@dataclass(slots=True)
class EpochRecord:
    """One pass over the data."""

    epoch: int
    step: int
    train_loss: float
    valid_loss: float | None = None


@dataclass(slots=True)
class TrainResult:
    """What a finished run produced (the adapter is in ``adapter_dir``, not yet converted)."""

    steps: list[StepRecord]
    epochs: list[EpochRecord]
    total_steps: int
    wall_seconds: float
    device: str
    threads: int
    trained_tokens: int
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ProgressSink(Protocol):
    """Where the loop reports progress."""

    def start(self, total_steps: int, done: int) -> None:
        """Training starts (or resumes after ``done`` steps)."""

    def step(self, record: StepRecord, tokens_per_second: float) -> None:
        """A step finished."""

    def message(self, text: str) -> None:
        """A line for the user (epoch summaries, checkpoints)."""

    def close(self) -> None:
        """Training ended."""


class QuietProgress:
    """A sink that reports nothing."""

    def start(self, total_steps: int, done: int) -> None:
        """Nothing."""

    def step(self, record: StepRecord, tokens_per_second: float) -> None:
        """Nothing."""

    def message(self, text: str) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


def data_fingerprint(examples: list[Encoded]) -> str:
    """A digest of the encoded data, so a resume never continues on other data."""
    import hashlib

    digest = hashlib.sha256()
    for item in examples:
        digest.update(json.dumps([item.input_ids, item.labels]).encode())
    return digest.hexdigest()


def _config_fingerprint(config: TuneConfig) -> dict[str, Any]:
    # Threads and device change speed, not the result's meaning: a resume may use others.
    return config.model_dump(exclude={"threads", "device"})


def steps_per_epoch(examples: int, config: TuneConfig) -> int:
    """Optimizer steps in one pass over ``examples``."""
    return math.ceil(examples / (config.batch_size * config.gradient_accumulation))


def _order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def learning_rate(step: int, total: int, config: TuneConfig) -> float:
    """The rate for ``step`` (1-based): linear warm-up over ``warmup_ratio`` of the steps, then linear decay."""
    warmup = max(1, round(total * config.warmup_ratio)) if config.warmup_ratio > 0 else 0
    if step <= warmup:
        return config.learning_rate * step / warmup
    remaining = max(1, total - warmup)
    return config.learning_rate * max(0.0, (total - step + 1) / remaining)


def pick_device(wanted: str) -> str:
    """``cuda`` when asked for or (``auto``) when torch sees a GPU, else ``cpu``."""
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no GPU")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def load_model(base: BaseModel, config: TuneConfig, device: str) -> Any:
    """transformers' model of ``base`` (a GGUF is dequantized to float32) with fresh LoRA layers from peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if base.is_gguf:
        model = AutoModelForCausalLM.from_pretrained(
            str(base.path.parent), gguf_file=base.path.name, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(config.seed)  # the LoRA A matrices are initialised at random
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft annotates int, takes any number
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = base.model_id
    return peft_model.to(device)


def _batch(items: list[Encoded], pad_id: int, device: str) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _loss_sum(model: Any, items: list[Encoded], pad_id: int, device: str) -> tuple[Any, int]:
    import torch

    ids, labels, mask = _batch(items, pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    # Position t predicts token t + 1.
    shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


class Trainer:
    """Trains one adapter; checkpoints go to ``work_dir``."""

    def __init__(
        self,
        config: TuneConfig,
        base: BaseModel,
        train: list[Encoded],
        validation: list[Encoded] | None,
        work_dir: Path,
        *,
        pad_id: int,
        progress: ProgressSink | None = None,
        stop: threading.Event | None = None,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.base = base
        self.train_set = train
        self.validation = validation or []
        self.work_dir = work_dir
        self.pad_id = pad_id
        self.progress = progress or QuietProgress()
        self.stop = stop or threading.Event()
        self.on_epoch = on_epoch
        self.per_epoch = steps_per_epoch(len(train), config)
        self.total_steps = self.per_epoch * config.epochs
        self.fingerprint = data_fingerprint(train + self.validation)

    @property
    def checkpoint_dir(self) -> Path:
        """Where the latest checkpoint lives."""
        return self.work_dir / "checkpoint"

    def has_checkpoint(self) -> bool:
        """Whether a resumable checkpoint is present."""
        return (self.checkpoint_dir / "state.json").is_file()

    def run(self, adapter_dir: Path, *, resume: bool = False) -> TrainResult:
        """Train and save the PEFT adapter into ``adapter_dir``; raises :class:`Stopped` on a stop request."""
        import torch

        config = self.config
        device = pick_device(config.device)
        threads = config.threads or usable_cores()
        torch.set_num_threads(threads)
        model = load_model(self.base, config, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        steps: list[StepRecord] = []
        epochs: list[EpochRecord] = []
        done = 0
        previous = 0.0
        if resume:
            done, previous, steps, epochs = self._restore(model, optimizer)
        resumed_from = done
        started = time.monotonic()
        self.progress.start(self.total_steps, done)
        model.train()
        step_size = config.batch_size * config.gradient_accumulation
        try:
            for epoch in range(done // self.per_epoch, config.epochs):
                order = _order(len(self.train_set), config.seed, epoch)
                first = done - epoch * self.per_epoch
                for index in range(first, self.per_epoch):
                    if self.stop.is_set():
                        self._save(model, optimizer, done, previous + time.monotonic() - started, steps, epochs)
                        raise Stopped(done, self.total_steps)
                    step = done + 1
                    chosen = [self.train_set[i] for i in order[index * step_size : (index + 1) * step_size]]
                    rate = learning_rate(step, self.total_steps, config)
                    for group in optimizer.param_groups:
                        group["lr"] = rate
                    tick = time.monotonic()
                    torch.manual_seed(config.seed + step)  # dropout masks, reproducible on resume
                    labelled = sum(item.trained_tokens for item in chosen)
                    total_loss = 0.0
                    optimizer.zero_grad(set_to_none=True)
                    for start in range(0, len(chosen), config.batch_size):
                        loss, _ = _loss_sum(model, chosen[start : start + config.batch_size], self.pad_id, device)
                        (loss / labelled).backward()
                        total_loss += float(loss.detach())
                    optimizer.step()
                    tokens = sum(len(item.input_ids) for item in chosen)
                    done = step
                    record = StepRecord(
                        step=step,
                        epoch=epoch + 1,
                        loss=total_loss / labelled,
                        learning_rate=rate,
                        tokens=tokens,
                        elapsed_s=round(previous + time.monotonic() - started, 3),
                    )
                    steps.append(record)
                    self.progress.step(record, tokens / max(time.monotonic() - tick, 1e-9))
                summary = self._end_epoch(model, epoch + 1, done, steps, device)
                epochs.append(summary)
                self._save(model, optimizer, done, previous + time.monotonic() - started, steps, epochs)
                if self.on_epoch is not None:
                    self.on_epoch(summary)
        finally:
            self.progress.close()
        adapter_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(adapter_dir))
        (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card template
        return TrainResult(
            steps=steps,
            epochs=epochs,
            total_steps=self.total_steps,
            wall_seconds=round(previous + time.monotonic() - started, 3),
            device=device,
            threads=threads,
            trained_tokens=sum(item.trained_tokens for item in self.train_set) * config.epochs,
            resumed_from=resumed_from,
        )

    def _end_epoch(self, model: Any, epoch: int, step: int, steps: list[StepRecord], device: str) -> EpochRecord:
        losses = [s.loss for s in steps if s.epoch == epoch]
        record = EpochRecord(epoch=epoch, step=step, train_loss=sum(losses) / max(1, len(losses)))
        if self.validation:
            record.valid_loss = self.evaluate(model, self.validation, device)
        text = f"epoch {epoch}: train loss {record.train_loss:.4f}"
        if record.valid_loss is not None:
            text += f", validation loss {record.valid_loss:.4f}"
        self.progress.message(text)
        return record

    def evaluate(self, model: Any, items: list[Encoded], device: str) -> float:
        """Mean loss per labelled token over ``items``, without dropout or gradients."""
        import torch

        model.eval()
        total = 0.0
        count = 0
        with torch.no_grad():
            for start in range(0, len(items), self.config.batch_size):
                loss, n = _loss_sum(model, items[start : start + self.config.batch_size], self.pad_id, device)
                total += float(loss)
                count += n
        model.train()
        return total / max(1, count)

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _save(
        self,
        model: Any,
        optimizer: Any,
        step: int,
        elapsed: float,
        steps: list[StepRecord],
        epochs: list[EpochRecord],
    ) -> None:
        import torch
        from peft import get_peft_model_state_dict

        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / f".checkpoint.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(get_peft_model_state_dict(model), tmp / "adapter.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {
            "step": step,
            "elapsed_s": elapsed,
            "data": self.fingerprint,
            "config": _config_fingerprint(self.config),
            "steps": [asdict(s) for s in steps],
            "epochs": [asdict(e) for e in epochs],
        }
        (tmp / "state.json").write_text(json.dumps(state))
        old = self.work_dir / f".checkpoint.{os.getpid()}.old"
        if self.checkpoint_dir.exists():
            self.checkpoint_dir.rename(old)
        tmp.rename(self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _restore(self, model: Any, optimizer: Any) -> tuple[int, float, list[StepRecord], list[EpochRecord]]:
        import torch
        from peft import set_peft_model_state_dict

        if not self.has_checkpoint():
            raise ResumeError(f"there is no checkpoint to resume in {self.work_dir}")
        state = json.loads((self.checkpoint_dir / "state.json").read_text())
        if state["data"] != self.fingerprint:
            raise ResumeError("the checkpoint was trained on other data; run without --resume to start over")
        if state["config"] != _config_fingerprint(self.config):
            changed = sorted(k for k, v in _config_fingerprint(self.config).items() if state["config"].get(k) != v)
            raise ResumeError(f"the checkpoint was trained with other settings ({', '.join(changed)})")
        device = next(model.parameters()).device
        set_peft_model_state_dict(model, torch.load(self.checkpoint_dir / "adapter.pt", map_location=device))
        optimizer.load_state_dict(torch.load(self.checkpoint_dir / "optimizer.pt", map_location=device))
        steps = [StepRecord(**s) for s in state["steps"]]
        epochs = [EpochRecord(**e) for e in state["epochs"]]
        return int(state["step"]), float(state["elapsed_s"]), steps, epochs
