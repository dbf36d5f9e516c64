"""NeMo Customizer's jobs API on the same fine-tuning jobs as OpenAI's: one job, two views.

A NeMo request is translated into a :class:`CreateJobRequest` plus the LoRA knobs OpenAI's API has no field for:

- ``config`` names the base model (``"smollm2-135m-instruct"``, or NeMo's ``"<model>@<version>"``: the version is
  ignored; an object names it as ``base_model`` or ``name``);
- ``dataset`` names the training file: an uploaded file's id (``file-...``) or its filename, as a string or as
  ``{"name": ..., "namespace": ...}``;
- ``hyperparameters``: ``epochs``, ``batch_size``, ``learning_rate`` (absolute, where OpenAI scales a default),
  ``weight_decay``, ``seed``, and ``lora.adapter_dim`` (the rank), ``lora.alpha``, ``lora.adapter_dropout`` and
  ``lora.target_modules`` (NeMo's ``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2`` or the
  projections' own names); only ``finetuning_type: lora`` with ``training_type: sft`` is trained;
- ``output_model`` names the adapter (its served name), else it is named as an OpenAI job's.

Statuses map ``validating_files`` -> ``created``, ``queued`` -> ``pending``, ``running``, ``succeeded`` ->
``completed``, ``failed``, ``cancelled``. What the client sent is kept with the job and shown back.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from microserve.errors import InvalidRequest
from microserve.finetune.jobs import FineTuningJobs, NotFound
from microserve.finetune.jobstore import JobRow
from microserve.protocol.customization import (
    ConfigRef,
    CreateCustomizationRequest,
    CustomizationJob,
    CustomizationJobPage,
    CustomizationMetrics,
    CustomizationStatus,
    CustomizationStatusDetails,
    MetricValue,
    Pagination,
    StatusLog,
)
from microserve.protocol.fine_tuning import CreateJobRequest, Hyperparameters

STATUSES: dict[str, CustomizationStatus] = {
    "validating_files": "created",
    "queued": "pending",
    "running": "running",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}
# NeMo (Megatron) layer names -> the projections microserve trains.
NEMO_MODULES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def base_model_of(config: str | ConfigRef) -> str:
    """The base model a NeMo ``config`` names."""
    if isinstance(config, ConfigRef):
        config = config.base_model or config.name
    return config.split("@", 1)[0].strip()


def target_modules(names: list[str]) -> list[str]:
    """NeMo's layer names (or projection names) as the projections to adapt."""
    modules: list[str] = []
    for name in names:
        modules += NEMO_MODULES.get(name, (name,))
    return list(dict.fromkeys(modules))


class Customizations:
    """``/v1/customization/jobs`` over :class:`FineTuningJobs`, owner by owner."""

    def __init__(self, jobs: FineTuningJobs) -> None:
        self.jobs = jobs
        self.store = jobs.store

    def create(self, owner: str | None, request: CreateCustomizationRequest) -> CustomizationJob:
        """``POST /v1/customization/jobs``."""
        hyper = request.hyperparameters
        if hyper.finetuning_type != "lora":
            raise InvalidRequest(
                f"finetuning_type {hyper.finetuning_type!r} is not supported: microserve trains LoRA adapters "
                "(finetuning_type `lora`)",
                param="hyperparameters.finetuning_type",
            )
        if hyper.training_type != "sft":
            raise InvalidRequest(
                f"training_type {hyper.training_type!r} is not supported: microserve trains with supervised "
                "fine-tuning (training_type `sft`)",
                param="hyperparameters.training_type",
            )
        model = base_model_of(request.config)
        training_file = self._dataset_file(owner, request.dataset)
        multiplier: Literal["auto"] | float = "auto"
        if hyper.learning_rate is not None:
            multiplier = hyper.learning_rate / self.jobs.base_learning_rate
            if multiplier > 10:
                raise InvalidRequest(
                    f"learning_rate may be at most {10 * self.jobs.base_learning_rate:g}",
                    param="hyperparameters.learning_rate",
                )
        overrides: dict[str, Any] = {}
        if hyper.weight_decay is not None:
            overrides["weight_decay"] = hyper.weight_decay
        lora = hyper.lora
        if lora is not None:
            if lora.adapter_dim is not None:
                overrides["rank"] = lora.adapter_dim
            if lora.alpha is not None:
                overrides["alpha"] = lora.alpha
            if lora.adapter_dropout is not None:
                overrides["dropout"] = lora.adapter_dropout
            if lora.target_modules:
                overrides["target_modules"] = target_modules(lora.target_modules)
        job = self.jobs.create_job(
            owner,
            CreateJobRequest(
                model=model,
                training_file=training_file,
                hyperparameters=Hyperparameters(
                    n_epochs=hyper.epochs if hyper.epochs is not None else "auto",
                    batch_size=hyper.batch_size if hyper.batch_size is not None else "auto",
                    learning_rate_multiplier=multiplier,
                ),
                seed=hyper.seed,
                suffix=None,
                metadata=None,
            ),
            overrides=overrides,
            name=request.output_model,
        )
        self.store.add_customization(job.id, request.model_dump(mode="json", exclude_none=True))
        return self.retrieve(owner, job.id)

    def _dataset_file(self, owner: str | None, dataset: Any) -> str:
        name = dataset if isinstance(dataset, str) else dataset.name
        files = self.store.list_files(owner, "fine-tune")
        chosen = next((f for f in files if f.id == name), None) or next((f for f in files if f.filename == name), None)
        if chosen is None:
            raise NotFound(
                f"No such dataset: {name} (name an uploaded file, by id or filename; upload with POST /v1/files)",
                param="dataset",
                code="dataset_not_found",
            )
        return chosen.id

    def list(
        self,
        owner: str | None,
        *,
        page: int = 1,
        page_size: int = 10,
        sort: str = "created_at",
        status: str | None = None,
    ) -> CustomizationJobPage:
        """``GET /v1/customization/jobs``: ``sort`` is ``created_at`` (oldest first) or ``-created_at``."""
        if sort not in ("created_at", "-created_at"):
            raise InvalidRequest("sort must be `created_at` or `-created_at`", param="sort")
        rows = self.store.list_jobs(owner)  # newest first
        if sort == "created_at":
            rows = rows[::-1]
        if status is not None:
            rows = [r for r in rows if STATUSES.get(r.status) == status]
        start = (page - 1) * page_size
        chosen = rows[start : start + page_size]
        return CustomizationJobPage(
            data=[self._view(r) for r in chosen],
            pagination=Pagination(
                page=page,
                page_size=page_size,
                current_page_size=len(chosen),
                total_pages=max(1, -(-len(rows) // page_size)),
                total_results=len(rows),
            ),
            sort=sort,
            filter={"status": status} if status else None,
        )

    def retrieve(self, owner: str | None, job_id: str) -> CustomizationJob:
        """``GET /v1/customization/jobs/{id}``."""
        return self._view(self._row(owner, job_id))

    def status(self, owner: str | None, job_id: str) -> CustomizationStatusDetails:
        """``GET /v1/customization/jobs/{id}/status``."""
        return self._details(self._row(owner, job_id))

    def cancel(self, owner: str | None, job_id: str) -> CustomizationJob:
        """``POST /v1/customization/jobs/{id}/cancel``."""
        self.jobs.cancel_job(owner, job_id)
        return self.retrieve(owner, job_id)

    def _row(self, owner: str | None, job_id: str) -> JobRow:
        row = self.store.job(job_id, owner)
        if row is None:
            raise NotFound(f"No such customization job: {job_id}", param="job_id", code="job_not_found")
        return row

    def _view(self, row: JobRow) -> CustomizationJob:
        sent = self.store.customization(row.id) or {}
        details = self._details(row)
        hyper = sent.get("hyperparameters") or {
            "finetuning_type": "lora",
            "training_type": "sft",
            "epochs": row.hyperparameters["n_epochs"],
            "batch_size": row.hyperparameters["batch_size"],
            "learning_rate": row.config.get("learning_rate"),
            "lora": {"adapter_dim": row.config.get("rank"), "alpha": row.config.get("alpha")},
        }
        return CustomizationJob(
            id=row.id,
            created_at=_iso(row.created_at),
            updated_at=details.updated_at,
            namespace=sent.get("namespace") or "default",
            name=sent.get("name") or row.id,
            description=sent.get("description"),
            project=sent.get("project"),
            config=sent.get("config") or row.model,
            dataset=sent.get("dataset") or row.training_file,
            hyperparameters=hyper,
            output_model=row.fine_tuned_model or None,
            status=details.status,
            status_details=details,
            custom_fields=sent.get("custom_fields") or {},
        )

    def _details(self, row: JobRow) -> CustomizationStatusDetails:
        events = self.store.events(row.id)[::-1]  # oldest first
        checkpoints = self.store.checkpoints(row.id)[::-1]
        metrics = [e for e in events if e.type == "metrics" and e.data]
        train = [
            MetricValue(value=float(e.data["train_loss"]), step=int(e.data["step"]), timestamp=_iso(e.created_at))
            for e in metrics
            if e.data is not None
        ]
        valid = [
            MetricValue(value=float(c.metrics["valid_loss"]), step=c.step_number, timestamp=_iso(c.created_at))
            for c in checkpoints
            if c.metrics.get("valid_loss") is not None
        ]
        steps = train[-1].step if train else 0
        total = int(metrics[-1].data.get("total_steps", 0)) if metrics and metrics[-1].data else 0
        status = STATUSES[row.status]
        done = 100.0 if status == "completed" else (100.0 * steps / total if total else 0.0)
        end = row.finished_at or time.time()
        best = min(range(len(valid)), key=lambda i: valid[i].value) + 1 if valid else None
        keys = ["train_loss"] + (["val_loss"] if valid else [])
        logs = [
            StatusLog(updated_at=_iso(e.created_at), message=e.message, detail=None if e.level == "info" else e.level)
            for e in events
            if e.type == "message"
        ]
        if row.error:
            logs.append(
                StatusLog(
                    updated_at=_iso(row.finished_at or row.created_at),
                    message=str(row.error.get("code")),
                    detail=str(row.error.get("message")),
                )
            )
        return CustomizationStatusDetails(
            created_at=_iso(row.created_at),
            updated_at=_iso(events[-1].created_at if events else row.created_at),
            status=status,
            steps_completed=steps,
            epochs_completed=len(checkpoints),
            percentage_done=round(done, 1),
            elapsed_time=round(end - row.started_at, 1) if row.started_at else 0.0,
            best_epoch=best,
            train_loss=train[-1].value if train else None,
            val_loss=valid[-1].value if valid else None,
            metrics=CustomizationMetrics(
                keys=keys, metrics={"train_loss": train, **({"val_loss": valid} if valid else {})}
            ),
            status_logs=logs,
        )
