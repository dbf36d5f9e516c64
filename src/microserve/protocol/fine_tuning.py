"""Wire shapes of OpenAI's files and fine-tuning API (``/v1/files``, ``/v1/fine_tuning/jobs``), field for field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from microserve.protocol.common import Integral, WireModel

# The bounds a job's hyperparameters are checked against before anything else: every one is in the schema.
Epochs = Annotated[int, Field(ge=1, le=50), Integral]
BatchSize = Annotated[int, Field(ge=1, le=256), Integral]
Multiplier = Annotated[float, Field(gt=0, le=10)]
Seed = Annotated[int, Field(ge=0, le=2147483647), Integral]

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
FilePurpose = Literal["fine-tune", "fine-tune-results"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Hyperparameters(WireModel):
    """What a client may ask for; ``auto`` lets microserve choose (the resolved value is reported back)."""

    n_epochs: Literal["auto"] | Epochs = "auto"
    batch_size: Literal["auto"] | BatchSize = "auto"
    learning_rate_multiplier: Literal["auto"] | Multiplier = "auto"


class SupervisedMethod(WireModel):
    hyperparameters: Hyperparameters | None = None


class Method(WireModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class CreateJobRequest(WireModel):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: Seed | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)


class ResolvedHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: ResolvedHyperparameters
    method: dict[str, Any] | None = None
    model: str
    organization_id: str = "microserve"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    step: int
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
