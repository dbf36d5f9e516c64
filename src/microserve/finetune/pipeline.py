"""One tuning run from data file to served adapter: validate, encode, train, convert, report, publish.

The command line and the job worker both run this; neither trains anything while any line of the data is bad.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microserve.catalog.peft_gguf import LoraInfo, check_lora, convert_peft
from microserve.finetune.base import BaseModel, chat_template, open_tokenizer, resolve_base
from microserve.finetune.config import TuneConfig
from microserve.finetune.data import DataError, LineError, check_lines, file_format, read_lines
from microserve.finetune.output import (
    GGUF_FILE,
    PLOT_FILE,
    REPORT_FILE,
    build_report,
    check_target,
    plot_losses,
    publish,
    staging_dir,
    write_report,
)
from microserve.finetune.render import Encoded, Renderer
from microserve.finetune.train import EpochRecord, ProgressSink, Trainer


@dataclass(frozen=True, slots=True)
class Prepared:
    """Checked and encoded data for one base model."""

    base: BaseModel
    train: list[Encoded]
    validation: list[Encoded]
    pad_id: int
    data_format: str
    max_seq_len: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished run: where the adapter is and what training reported."""

    adapter_dir: Path
    report: dict[str, Any]
    lora: LoraInfo


def _encode_file(path: Path, renderer: Renderer, limit: int, expected: str | None) -> tuple[list[Encoded], str]:
    examples, errors = check_lines(read_lines(path))
    encoded, too_long = renderer.encode_all(examples, limit)
    errors = sorted(errors + too_long, key=lambda e: e.line)
    kind = file_format(examples) if examples else None
    if kind is not None and expected is not None and kind != expected:
        errors.append(LineError(examples[0].line, f"a {kind}-format file, but the training file is {expected}-format"))
    if errors:
        raise DataError(path, errors)
    if not encoded:
        raise DataError(path, [], summary=f"{path}: no training examples")
    assert kind is not None
    return encoded, kind


def prepare(
    config: TuneConfig,
    training_file: Path,
    validation_file: Path | None,
    cache_dir: Path,
    *,
    catalog_dir: Path | None = None,
    offline: bool = False,
) -> Prepared:
    """Resolve the base, then check and encode both files; raises ``DataError`` listing every bad line."""
    base = resolve_base(config.base, cache_dir, catalog_dir=catalog_dir, offline=offline)
    tokenizer = open_tokenizer(base)
    try:
        renderer = Renderer(chat_template(base, tokenizer), tokenizer)
        limit = min(config.max_seq_len, base.context_length or config.max_seq_len)
        train, kind = _encode_file(training_file, renderer, limit, None)
        validation: list[Encoded] = []
        if validation_file is not None:
            validation, _ = _encode_file(validation_file, renderer, limit, kind)
        return Prepared(base, train, validation, tokenizer.eos_id, kind, limit)
    finally:
        tokenizer.close()


def work_dir_for(cache_dir: Path, name: str) -> Path:
    """Where the checkpoints of the adapter ``name`` are kept between runs."""
    return cache_dir / "tune" / name


def run(
    config: TuneConfig,
    prepared: Prepared,
    lora_dir: Path,
    cache_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
    stop: threading.Event | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    files: dict[str, str] | None = None,
) -> Outcome:
    """Train, convert and publish ``lora_dir/<name>``; raises ``Stopped`` (checkpoint kept) on a stop request."""
    target = check_target(lora_dir, config.name, overwrite=overwrite)
    work = work_dir_for(cache_dir, config.name)
    trainer = Trainer(
        config,
        prepared.base,
        prepared.train,
        prepared.validation,
        work,
        pad_id=prepared.pad_id,
        progress=progress,
        stop=stop,
        on_epoch=on_epoch,
    )
    staging = staging_dir(lora_dir, config.name)
    try:
        result = trainer.run(staging, resume=resume)
        lora = convert_peft(
            staging, staging / GGUF_FILE, prepared.base.facts, out_type=config.gguf_type, name=config.name
        )
        check_lora(lora, prepared.base.facts)
        report = build_report(
            config=config.model_dump(),
            base={
                "spec": prepared.base.spec,
                "id": prepared.base.model_id,
                "path": str(prepared.base.path),
                "architecture": prepared.base.facts.architecture,
            },
            data={
                "format": prepared.data_format,
                "training_examples": len(prepared.train),
                "validation_examples": len(prepared.validation),
                "max_seq_len": prepared.max_seq_len,
                **(files or {}),
            },
            result=result,
            lora=lora,
        )
        write_report(staging / REPORT_FILE, report)
        plot_losses(staging / PLOT_FILE, report, f"{config.name} on {prepared.base.model_id}")
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)  # the adapter is complete: its checkpoint is no longer needed
    return Outcome(target, report, lora)
