"""The knobs of one LoRA training run, with their defaults (docs/customization.md lists them)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from microserve.catalog.peft_gguf import MODULES

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALL_LINEAR = list(MODULES)


def check_adapter_name(name: str) -> str:
    """``name`` if it can be an adapter directory (and a served model name); else ``ValueError``."""
    if not ADAPTER_NAME.match(name) or name in (".", "..") or ".." in name:
        raise ValueError(
            f"adapter name {name!r} must start with a letter or digit and hold only letters, digits, '.', '_' or '-' "
            "(at most 128 characters)"
        )
    return name


class TuneConfig(BaseModel):
    """One training run: the base model, the adapter's name and every hyperparameter."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="Base model: catalog id, GGUF path or Hugging Face directory.")
    name: str = Field(description="Adapter name: its directory under the adapter directory and its served name.")
    rank: int = Field(default=16, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_LINEAR), min_length=1, description="Projections that get an adapter."
    )
    epochs: int = Field(default=3, ge=1, le=100, description="Passes over the training data.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Examples per optimizer step (before accumulation).")
    gradient_accumulation: int = Field(default=1, ge=1, le=1024, description="Micro-batches summed into one step.")
    max_seq_len: int = Field(
        default=1024, ge=16, description="Longest example in tokens; a longer one is a data error."
    )
    warmup_ratio: float = Field(
        default=0.1, ge=0, lt=1, description="Share of the steps the learning rate warms up over."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(default=42, description="Seeds the adapter's initialisation, the data order and dropout.")
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch (default: the usable cores).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where to train; auto takes a GPU if present."
    )
    gguf_type: Literal["f32", "f16", "q8_0"] = Field(default="q8_0", description="Tensor type of the GGUF LoRA.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_adapter_name(value)

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        if value == ["all-linear"]:
            return list(ALL_LINEAR)
        unknown = [m for m in value if m not in MODULES]
        if unknown:
            raise ValueError(f"unsupported target modules {', '.join(unknown)} (supported: {', '.join(MODULES)})")
        return list(dict.fromkeys(value))
