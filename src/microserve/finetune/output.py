"""The adapter directory a run leaves: PEFT files, the GGUF LoRA, ``training.json`` and the loss plot.

Everything is written into a hidden staging directory beside the target and renamed into place in one step, so a
server that rescans the adapter directory sees either no adapter or the whole of it. Names starting with a dot are
never adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from microserve.catalog.peft_gguf import LoraInfo

GGUF_FILE = "adapter.gguf"
REPORT_FILE = "training.json"
PLOT_FILE = "loss.png"


class OutputError(Exception):
    """The adapter cannot be written where it was asked to go."""


def staging_dir(lora_dir: Path, name: str) -> Path:
    """A fresh hidden directory beside ``lora_dir/name`` to assemble the adapter in."""
    lora_dir.mkdir(parents=True, exist_ok=True)
    path = lora_dir / f".{name}.staging-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def check_target(lora_dir: Path, name: str, *, overwrite: bool) -> Path:
    """``lora_dir/name`` after checking it may be written."""
    target = lora_dir / name
    if target.exists() and not overwrite:
        raise OutputError(f"{target} already exists; pass --overwrite to replace it or choose another --name")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a directory")
    return target


def publish(staging: Path, target: Path) -> None:
    """Move the assembled adapter into place, replacing an older one as late as possible."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """``training.json``."""
    path.write_text(json.dumps(report, indent=2) + "\n")


def build_report(
    *,
    config: dict[str, Any],
    base: dict[str, Any],
    data: dict[str, Any],
    result: Any,
    lora: LoraInfo,
) -> dict[str, Any]:
    """The content of ``training.json``: settings, data, per-step losses, per-epoch summaries and the GGUF."""
    import peft
    import torch
    import transformers

    steps = [asdict(s) for s in result.steps]
    epochs = [asdict(e) for e in result.epochs]
    return {
        "object": "microserve.training_report",
        "created_at": int(time.time()),
        "config": config,
        "base_model": base,
        "data": data,
        "device": result.device,
        "threads": result.threads,
        "total_steps": result.total_steps,
        "wall_seconds": result.wall_seconds,
        "resumed_from_step": result.resumed_from,
        "trained_tokens": result.trained_tokens,
        "first_epoch_loss": epochs[0]["train_loss"] if epochs else None,
        "last_epoch_loss": epochs[-1]["train_loss"] if epochs else None,
        "epochs": epochs,
        "steps": steps,
        "gguf": {
            "file": GGUF_FILE,
            "architecture": lora.architecture,
            "alpha": lora.alpha,
            "rank": lora.rank,
            "types": lora.types,
            "tensors": len(lora.tensors),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def plot_losses(path: Path, report: dict[str, Any], title: str) -> None:
    """A PNG of the per-step training loss, with the per-epoch validation loss when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = report["steps"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="training loss (per step)", lw=1.5)
    valid = [(e["step"], e["valid_loss"]) for e in report["epochs"] if e.get("valid_loss") is not None]
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss (per epoch)")
    for epoch in report["epochs"][:-1]:
        ax.axvline(epoch["step"] + 0.5, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
