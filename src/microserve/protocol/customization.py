"""Wire shapes of NeMo Customizer's jobs API (``/v1/customization/jobs``), field for field where microserve has the
meaning; the knobs NeMo's trainer has and microserve's has not are accepted and kept, not applied."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from microserve.protocol.common import Integral, WireModel
from microserve.protocol.fine_tuning import BatchSize, Epochs, Seed

CustomizationStatus = Literal["created", "pending", "running", "completed", "cancelled", "failed"]


class LoraParameters(WireModel):
    adapter_dim: Annotated[int, Field(ge=1, le=256), Integral] | None = None
    alpha: float | None = Field(None, gt=0)
    adapter_dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | None = None


class CustomizationHyperparameters(BaseModel):
    """``hyperparameters``: unknown keys (``sft``, ``log_every_n_steps``, ``val_check_interval`` ...) are kept."""

    model_config = ConfigDict(extra="allow", strict=True)

    # microserve trains LoRA adapters with supervised fine-tuning, NeMo's `lora` and `sft`.
    finetuning_type: Literal["lora"] = "lora"
    training_type: Literal["sft"] = "sft"
    epochs: Epochs | None = None
    batch_size: BatchSize | None = None
    learning_rate: float | None = Field(None, gt=0, le=0.01)
    weight_decay: float | None = Field(None, ge=0)
    seed: Seed | None = None
    lora: LoraParameters | None = None


class DatasetRef(WireModel):
    name: str
    namespace: str | None = None


class ConfigRef(WireModel):
    """A ``config`` given as an object: ``base_model`` names the model (else ``name`` does)."""

    name: str
    base_model: str | None = None


class CreateCustomizationRequest(WireModel):
    config: str | ConfigRef
    dataset: str | DatasetRef
    hyperparameters: CustomizationHyperparameters
    output_model: str | None = None
    name: str | None = None
    description: str | None = None
    project: str | None = None
    namespace: str | None = None
    custom_fields: dict[str, Any] | None = None


class MetricValue(BaseModel):
    value: float
    step: int
    timestamp: str


class CustomizationMetrics(BaseModel):
    keys: list[str] = Field(default_factory=list)
    metrics: dict[str, list[MetricValue]] = Field(default_factory=dict)


class StatusLog(BaseModel):
    updated_at: str
    message: str
    detail: str | None = None


class CustomizationStatusDetails(BaseModel):
    created_at: str
    updated_at: str
    status: CustomizationStatus
    steps_completed: int = 0
    epochs_completed: int = 0
    percentage_done: float = 0.0
    elapsed_time: float = 0.0
    best_epoch: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    metrics: CustomizationMetrics = Field(default_factory=CustomizationMetrics)
    status_logs: list[StatusLog] = Field(default_factory=list)


class CustomizationJob(BaseModel):
    id: str
    created_at: str
    updated_at: str
    namespace: str = "default"
    name: str | None = None
    description: str | None = None
    project: str | None = None
    config: str | dict[str, Any]
    dataset: str | dict[str, Any]
    hyperparameters: dict[str, Any]
    output_model: str | None = None
    status: CustomizationStatus
    status_details: CustomizationStatusDetails
    custom_fields: dict[str, Any] = Field(default_factory=dict)


class Pagination(BaseModel):
    page: int
    page_size: int
    current_page_size: int
    total_pages: int
    total_results: int


class CustomizationJobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[CustomizationJob]
    pagination: Pagination
    sort: str = "created_at"
    filter: dict[str, Any] | None = None
