"""OpenAI's fine-tuning API behind plain methods: files, jobs, events, checkpoints, cancellation, recovery.

:class:`FineTuningJobs` is what the HTTP routes call (each method takes the caller's owner digest and returns the
wire object, or raises a :class:`~microserve.errors.ServiceError` with the right status); the methods block
briefly on SQLite, so routes call them from a thread. :class:`JobRunner` moves jobs along:

- ``validating_files``: a validation thread checks the files completely (JSON, roles, assistant turns and the
  token length of every line, with the base model's tokenizer and template) and fails the job with every bad
  line, or queues it;
- ``queued`` -> ``running``: one job at a time runs in a worker process (``python -m microserve.finetune.worker``),
  niced and with its thread count bounded, never on the event loop or an engine thread;
- the worker trains, converts and publishes the adapter, then exits; the runner hands the finished job to its
  ``on_success`` hook (the server serves the adapter there) and only then marks it ``succeeded``, so a client that
  sees ``succeeded`` can use ``fine_tuned_model`` at once;
- cancelling a running job sends the worker SIGTERM: it stops after the current step and the job ends
  ``cancelled``; on a restart, a job that was validating or running is marked ``failed`` with the reason (one whose
  adapter was already published is marked ``succeeded``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from microserve.errors import InvalidRequest, ServiceError
from microserve.finetune.config import TuneConfig, check_adapter_name
from microserve.finetune.jobstore import CheckpointRow, EventRow, FileRow, FileTooLarge, JobRow, JobStore
from microserve.protocol.fine_tuning import (
    TERMINAL,
    CheckpointMetrics,
    CreateJobRequest,
    FileDeleted,
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobError,
    JobEvent,
    Page,
    ResolvedHyperparameters,
)

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 8
DEFAULT_FILE_LIMIT = 512 * 1024 * 1024
EXIT_CANCELLED = 3


class NotFound(ServiceError):
    """No such object for this caller (404)."""

    status_code = 404
    error_type = "invalid_request_error"


class PayloadTooLarge(ServiceError):
    """An upload over the size limit (413)."""

    status_code = 413
    error_type = "invalid_request_error"


def _page(items: list[Any], after: str | None, limit: int) -> Page:
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    chosen = items[:limit]
    return Page(
        data=chosen,
        has_more=len(items) > limit,
        first_id=chosen[0].id if chosen else None,
        last_id=chosen[-1].id if chosen else None,
    )


def file_object(row: FileRow) -> FileObject:
    """The wire shape of a stored file."""
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename, purpose=row.purpose)


def job_object(row: JobRow) -> FineTuningJob:
    """The wire shape of a stored job."""
    hyper = ResolvedHyperparameters(**row.hyperparameters)
    return FineTuningJob(
        id=row.id,
        created_at=row.created_at,
        error=JobError(**row.error) if row.error else None,
        fine_tuned_model=row.fine_tuned_model if row.status == "succeeded" else None,
        finished_at=row.finished_at,
        hyperparameters=hyper,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper.model_dump()}},
        model=row.model,
        result_files=row.result_files,
        seed=row.seed,
        status=row.status,  # type: ignore[arg-type]
        trained_tokens=row.trained_tokens,
        training_file=row.training_file,
        validation_file=row.validation_file,
        estimated_finish=row.estimated_finish if row.status not in TERMINAL else None,
        metadata=row.metadata,
        user_provided_suffix=row.suffix,
    )


def event_object(row: EventRow) -> JobEvent:
    """The wire shape of a job event."""
    return JobEvent(
        id=row.id,
        created_at=row.created_at,
        level=row.level,  # type: ignore[arg-type]
        message=row.message,
        type=row.type,  # type: ignore[arg-type]
        data=row.data,
    )


def checkpoint_object(row: CheckpointRow) -> JobCheckpoint:
    """The wire shape of a job checkpoint."""
    return JobCheckpoint(
        id=row.id,
        created_at=row.created_at,
        fine_tuned_model_checkpoint=row.model_checkpoint,
        fine_tuning_job_id=row.job_id,
        metrics=CheckpointMetrics(**row.metrics),
        step_number=row.step_number,
    )


def adapter_name(model: str, suffix: str | None, job_id: str) -> str:
    """The served name of a job's adapter: ``ft-<base>[-<suffix>]-<job id tail>``."""
    stem = Path(model).name if "/" in model or model.startswith(".") else model  # a path names its last part
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip(".-") or "model"
    parts = ["ft", safe] + ([suffix] if suffix else []) + [job_id.removeprefix("ftjob-")[:8]]
    return check_adapter_name("-".join(parts)[:128])


Validator = Callable[[TuneConfig, Path, Path | None], list[str]]


def default_validator(cache_dir: Path, catalog_dir: Path | None = None) -> Validator:
    """A validator that checks files completely against the base model (tokenizer and template included)."""

    def validate(config: TuneConfig, training: Path, validation: Path | None) -> list[str]:
        from microserve.finetune.base import BaseModelError
        from microserve.finetune.data import DataError
        from microserve.finetune.pipeline import prepare

        try:
            prepare(config, training, validation, cache_dir, catalog_dir=catalog_dir)
        except DataError as exc:
            return [exc.summary or f"{Path(exc.path).name}: {len(exc.errors)} invalid lines"] + [
                str(e) for e in exc.errors
            ]
        except (BaseModelError, OSError) as exc:
            return [str(exc)]
        return []

    return validate


SuccessHook = Callable[[JobRow], None]


class JobRunner:
    """Validates queued files and runs one training job at a time in a worker process.

    ``on_success`` runs in the runner's thread after a worker published an adapter, before the job is marked
    ``succeeded``; an exception there fails the job with its message (the adapter stays in the directory).
    """

    def __init__(
        self,
        store: JobStore,
        *,
        lora_dir: Path,
        cache_dir: Path,
        catalog_dir: Path | None = None,
        threads: int | None = None,
        nice: int = 10,
        validator: Validator | None = None,
        python: str = sys.executable,
        on_success: SuccessHook | None = None,
    ) -> None:
        self.store = store
        self.on_success = on_success
        self.lora_dir = lora_dir
        self.cache_dir = cache_dir
        self.catalog_dir = catalog_dir
        self.threads = threads
        self.nice = nice
        self.python = python
        self.validator = validator or default_validator(cache_dir, catalog_dir)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._validation = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ft-validate")
        self._process: subprocess.Popen[bytes] | None = None
        self._running: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Fail the jobs a previous process left validating or running; returns their ids. Queued jobs stay.

        A running job whose worker had already published its adapter is marked ``succeeded`` instead: the adapter
        is in the directory, where the server finds it at start."""
        failed = []
        for job in self.store.jobs_in("validating_files", "running"):
            if job.status == "running" and self._published(job):
                self._succeeded(job.id)
                continue
            reason = (
                "the server stopped while this job was running; start a new job (its files are kept)"
                if job.status == "running"
                else "the server stopped while this job's files were being validated; start a new job"
            )
            if self.store.update_job(
                job.id,
                only_if=("validating_files", "running"),
                status="failed",
                finished_at=int(time.time()),
                error={"code": "server_restarted", "message": reason, "param": None},
            ):
                self.store.add_event(job.id, f"Job failed: {reason}", level="error")
                failed.append(job.id)
                self._remove_leftovers(job)
        return failed

    def _remove_leftovers(self, job: JobRow) -> None:
        # A worker killed outright leaves its half-written adapter (a hidden staging directory beside the adapters)
        # and its checkpoints; a failed job is never resumed, so neither is of use.
        name = str((job.config or {}).get("name") or job.fine_tuned_model or "")
        if not name:
            return
        for staging in self.lora_dir.glob(f".{name}.staging-*"):
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(self.cache_dir / "tune" / name, ignore_errors=True)  # pipeline.work_dir_for

    def start(self) -> None:
        """Recover, then start the thread that runs queued jobs."""
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="ft-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop running jobs: a running job is stopped and marked failed (the server is going away)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout)
        self._validation.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """A job was queued."""
        with self._wake:
            self._wake.notify_all()

    @property
    def running_job(self) -> str | None:
        """The id of the job in the worker process, if any."""
        return self._running

    # -- validation -------------------------------------------------------------------------------------------

    def submit_validation(self, job_id: str) -> None:
        """Validate the job's files off the caller's thread, then queue or fail it."""
        self._validation.submit(self._validate, job_id)

    def _validate(self, job_id: str) -> None:
        job = self.store.job(job_id, any_owner=True)
        if job is None or job.status != "validating_files":
            return
        config = TuneConfig(**job.config)
        self.store.add_event(job_id, f"Validating training file: {job.training_file}")
        try:
            problems = self.validator(
                config,
                self.store.file_path(job.training_file),
                self.store.file_path(job.validation_file) if job.validation_file else None,
            )
        except Exception as exc:  # a validator bug must fail the job, not leave it validating forever
            log.exception("validating %s failed", job_id)
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:
            message = "\n".join(problems)
            # The event first: a client that sees the status change finds the reason in the events too.
            self.store.add_event(job_id, f"Training file validation failed: {message}", level="error")
            self.store.update_job(
                job_id,
                only_if=("validating_files",),
                status="failed",
                finished_at=int(time.time()),
                error={"code": "invalid_training_file", "message": message, "param": "training_file"},
            )
            return
        self.store.add_event(job_id, "Files validated, moving job to queued state")
        if self.store.update_job(job_id, only_if=("validating_files",), status="queued"):
            self.wake()

    # -- running ----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
            job = self.store.next_queued()
            if job is None:
                with self._wake:
                    if not self._stopping:
                        self._wake.wait(timeout=2.0)
                continue
            try:
                self._run(job)
            except Exception:
                log.exception("fine-tuning job %s could not be run", job.id)
                self._fail(job.id, "the training process could not be started")

    def _fail(self, job_id: str, message: str, code: str = "training_failed") -> None:
        if self.store.update_job(
            job_id,
            only_if=("queued", "running"),
            status="failed",
            finished_at=int(time.time()),
            error={"code": code, "message": message, "param": None},
        ):
            self.store.add_event(job_id, f"Job failed: {message}", level="error")

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.threads:
            # Bound every thread pool torch and its BLAS may start, before the worker imports them.
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[name] = str(self.threads)
        return env

    def _run(self, job: JobRow) -> None:
        if not self.store.update_job(job.id, only_if=("queued",), status="running", started_at=int(time.time())):
            return  # cancelled meanwhile
        self.store.add_event(job.id, "Fine-tuning job started")
        command = [
            self.python,
            "-m",
            "microserve.finetune.worker",
            "--root",
            str(self.store.root),
            "--job",
            job.id,
            "--lora-dir",
            str(self.lora_dir),
            "--cache-dir",
            str(self.cache_dir),
        ]
        if self.catalog_dir:
            command += ["--catalog-dir", str(self.catalog_dir)]
        if self.threads:
            command += ["--threads", str(self.threads)]
        if self.nice:
            command += ["--nice", str(self.nice)]
        log_path = self.store.root / "logs" / f"{job.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._worker_env(),
                start_new_session=True,  # a Ctrl-C meant for the server reaches the worker only through stop()
            )
            self._process = process
            self._running = job.id
            self.store.update_job(job.id, worker_pid=process.pid)
            code = process.wait()
        self._process = None
        self._running = None
        current = self.store.job(job.id, any_owner=True)
        if current is None or current.status != "running":
            return  # the worker recorded the outcome
        if code == 0 and self._published(current):
            self._finish(current)
            return
        if current.cancel_requested or code == EXIT_CANCELLED:
            self._cancelled(job.id)
            return
        if self._stopping:
            self._fail(job.id, "the server shut down while this job was running", code="server_shutdown")
            return
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        self._fail(job.id, f"the training process exited with code {code}: " + " | ".join(tail))

    def _published(self, job: JobRow) -> bool:
        # The worker records the trained tokens only once the adapter is in place.
        return (
            job.trained_tokens is not None
            and bool(job.fine_tuned_model)
            and (self.lora_dir / str(job.fine_tuned_model) / "adapter.gguf").is_file()
        )

    def _succeeded(self, job_id: str) -> None:
        # The event first: a client that sees the status change finds it.
        self.store.add_event(job_id, "The job has successfully completed")
        self.store.update_job(job_id, only_if=("running",), status="succeeded", finished_at=int(time.time()))

    def _finish(self, job: JobRow) -> None:
        """A worker exited 0 after publishing: serve the adapter (the hook), then report success."""
        if self.on_success is not None and not self._stopping:  # a server going away serves it at its next start
            try:
                self.on_success(job)
            except Exception as exc:
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                log.warning("the adapter of %s cannot be served: %s", job.id, reason)
                self._fail(
                    job.id,
                    f"the adapter was trained and written to {self.lora_dir / str(job.fine_tuned_model)}, "
                    f"but it cannot be served: {reason}",
                    code="adapter_not_served",
                )
                return
        self._succeeded(job.id)

    def _cancelled(self, job_id: str) -> None:
        if self.store.update_job(
            job_id, only_if=("validating_files", "queued", "running"), status="cancelled", finished_at=int(time.time())
        ):
            self.store.add_event(job_id, "Job cancelled")

    def cancel(self, job_id: str) -> None:
        """Cancel a job: at once when it has not started, after its current step when it is running."""
        self.store.update_job(job_id, cancel_requested=1)
        job = self.store.job(job_id, any_owner=True)
        if job is None or job.status in TERMINAL:
            return
        if job.status in ("validating_files", "queued"):
            self._cancelled(job_id)
            return
        process = self._process
        if process is not None and self._running == job_id and process.poll() is None:
            process.send_signal(signal.SIGTERM)


class FineTuningJobs:
    """The files and fine-tuning jobs API, owner by owner."""

    def __init__(
        self,
        store: JobStore,
        runner: JobRunner,
        *,
        max_file_bytes: int = DEFAULT_FILE_LIMIT,
        base_learning_rate: float = 1e-3,
        tunable: Callable[[str], str | None] | None = None,
        base_of: Callable[[str], str] | None = None,
        max_rank: int | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.max_file_bytes = max_file_bytes
        self.base_learning_rate = base_learning_rate
        # Returns the reason a model cannot be tuned, or None when it can.
        self.tunable = tunable or _catalog_tunable(runner.catalog_dir)
        # What the trainer loads for a tunable model name (a server maps a served name to its catalog id or GGUF).
        self.base_of = base_of or (lambda model: model)
        # The largest rank the server serves: an adapter above it could be trained but not served.
        self.max_rank = max_rank

    # -- files ------------------------------------------------------------------------------------------------

    def upload(self, owner: str | None, filename: str, purpose: str, source: BinaryIO | bytes) -> FileObject:
        """``POST /v1/files``."""
        if purpose != "fine-tune":
            raise InvalidRequest(f"purpose {purpose!r} is not supported; use 'fine-tune'", param="purpose")
        try:
            row = self.store.add_file(owner, filename or "upload.jsonl", purpose, source, max_bytes=self.max_file_bytes)
        except FileTooLarge as exc:
            raise PayloadTooLarge(str(exc), param="file", code="file_too_large") from exc
        return file_object(row)

    def list_files(
        self,
        owner: str | None,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
    ) -> Page:
        """``GET /v1/files``, newest first unless ``order`` is ``asc``."""
        files = [file_object(r) for r in self.store.list_files(owner, purpose)]
        return _page(files[::-1] if order == "asc" else files, after, limit)

    def retrieve_file(self, owner: str | None, file_id: str) -> FileObject:
        """``GET /v1/files/{id}``."""
        return file_object(self._file(owner, file_id))

    def file_content(self, owner: str | None, file_id: str) -> Path:
        """``GET /v1/files/{id}/content``: the path of the bytes."""
        self._file(owner, file_id)
        return self.store.file_path(file_id)

    def delete_file(self, owner: str | None, file_id: str) -> FileDeleted:
        """``DELETE /v1/files/{id}``."""
        if not self.store.delete_file(owner, file_id):
            raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return FileDeleted(id=file_id)

    def _file(self, owner: str | None, file_id: str, param: str = "file_id") -> FileRow:
        row = self.store.get_file(owner, file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param=param, code="file_not_found")
        return row

    # -- jobs -------------------------------------------------------------------------------------------------

    def create_job(
        self,
        owner: str | None,
        request: CreateJobRequest,
        *,
        overrides: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> FineTuningJob:
        """``POST /v1/fine_tuning/jobs``: the job starts in ``validating_files``.

        ``overrides`` sets further :class:`TuneConfig` knobs (NeMo Customizer's ``lora.adapter_dim`` is ``rank``);
        ``name`` chooses the adapter's name instead of ``ft-<base>[-<suffix>]-<id>`` (NeMo's ``output_model``): it
        must be free, neither an adapter in the directory nor another job's. A bad value is a 400.
        """
        reason = self.tunable(request.model)
        if reason:
            raise InvalidRequest(reason, param="model", code="model_not_available")
        training = self._file(owner, request.training_file, "training_file")
        if training.purpose != "fine-tune":
            raise InvalidRequest(
                f"{training.id} has purpose {training.purpose!r}, not 'fine-tune'", param="training_file"
            )
        if request.validation_file:
            self._file(owner, request.validation_file, "validation_file")
        hyper = request.hyperparameters
        if request.method is not None and request.method.supervised is not None:
            hyper = request.method.supervised.hyperparameters or hyper
        epochs = DEFAULT_EPOCHS if hyper is None or hyper.n_epochs == "auto" else hyper.n_epochs
        batch = DEFAULT_BATCH if hyper is None or hyper.batch_size == "auto" else hyper.batch_size
        multiplier = (
            1.0 if hyper is None or hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier
        )
        if not isinstance(epochs, int) or not 1 <= epochs <= 50:
            raise InvalidRequest("hyperparameters.n_epochs must be between 1 and 50", param="hyperparameters.n_epochs")
        if not isinstance(batch, int) or not 1 <= batch <= 256:
            raise InvalidRequest(
                "hyperparameters.batch_size must be between 1 and 256", param="hyperparameters.batch_size"
            )
        if not 0 < float(multiplier) <= 10:
            raise InvalidRequest(
                "hyperparameters.learning_rate_multiplier must be above 0 and at most 10",
                param="hyperparameters.learning_rate_multiplier",
            )
        if request.suffix is not None and not all(c.isalnum() or c in "-_." for c in request.suffix):
            raise InvalidRequest("suffix may hold only letters, digits, '-', '_' and '.'", param="suffix")
        if name is not None:
            self._check_free_name(name)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "big") % (2**31)
        resolved = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": float(multiplier)}
        knobs: dict[str, Any] = {
            "epochs": epochs,
            "batch_size": batch,
            "learning_rate": self.base_learning_rate * float(multiplier),
            "seed": seed,
            "threads": self.runner.threads,
            **(overrides or {}),
        }
        base = self.base_of(request.model)
        try:
            checked = TuneConfig(base=base, name="check", **knobs)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"{where}: {first['msg']}", param="hyperparameters") from exc
        if self.max_rank is not None and checked.rank > self.max_rank:
            raise InvalidRequest(
                f"rank {checked.rank} is above the largest rank this server serves ({self.max_rank}; "
                "see --max-lora-rank)",
                param="hyperparameters",
            )
        row = self.store.add_job(
            owner,
            model=request.model,
            training_file=training.id,
            validation_file=request.validation_file,
            config={},
            hyperparameters=resolved,
            suffix=request.suffix,
            seed=seed,
            metadata=request.metadata,
            fine_tuned_model="",
        )
        name = name or adapter_name(request.model, request.suffix, row.id)
        config = TuneConfig(base=base, name=name, **knobs)
        self.store.update_job(row.id, config=config.model_dump(), fine_tuned_model=name)
        self.store.add_event(row.id, f"Created fine-tuning job: {row.id}")
        self.runner.submit_validation(row.id)
        return self.retrieve_job(owner, row.id)

    def _check_free_name(self, name: str) -> None:
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="output_model") from None
        taken = (self.runner.lora_dir / name).exists() or any(
            j.fine_tuned_model == name and j.status not in ("failed", "cancelled")
            for j in self.store.jobs_in("validating_files", "queued", "running", "succeeded")
        )
        if taken:
            raise InvalidRequest(
                f"an adapter named `{name}` exists already; choose another name", param="output_model", code="exists"
            )

    def list_jobs(
        self, owner: str | None, after: str | None = None, limit: int = 20, metadata: dict[str, str] | None = None
    ) -> Page:
        """``GET /v1/fine_tuning/jobs``, newest first; ``metadata`` keeps the jobs whose metadata holds every pair."""
        rows = self.store.list_jobs(owner)
        if metadata:
            rows = [r for r in rows if r.metadata and all(r.metadata.get(k) == v for k, v in metadata.items())]
        return _page([job_object(r) for r in rows], after, limit)

    def retrieve_job(self, owner: str | None, job_id: str) -> FineTuningJob:
        """``GET /v1/fine_tuning/jobs/{id}``."""
        return job_object(self._job(owner, job_id))

    def cancel_job(self, owner: str | None, job_id: str) -> FineTuningJob:
        """``POST /v1/fine_tuning/jobs/{id}/cancel``; a finished job cannot be cancelled (400, as OpenAI)."""
        job = self._job(owner, job_id)
        if job.status in TERMINAL:
            raise InvalidRequest(f"Job {job_id} has already {job.status}; it cannot be cancelled", param="job_id")
        self.runner.cancel(job_id)
        return self.retrieve_job(owner, job_id)

    def list_events(self, owner: str | None, job_id: str, after: str | None = None, limit: int = 20) -> Page:
        """``GET /v1/fine_tuning/jobs/{id}/events``, newest first."""
        self._job(owner, job_id)
        return _page([event_object(r) for r in self.store.events(job_id)], after, limit)

    def list_checkpoints(self, owner: str | None, job_id: str, after: str | None = None, limit: int = 10) -> Page:
        """``GET /v1/fine_tuning/jobs/{id}/checkpoints``, newest first."""
        self._job(owner, job_id)
        return _page([checkpoint_object(r) for r in self.store.checkpoints(job_id)], after, limit)

    def _job(self, owner: str | None, job_id: str) -> JobRow:
        row = self.store.job(job_id, owner)
        if row is None:
            raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
        return row


def _catalog_tunable(catalog_dir: Path | None) -> Callable[[str], str | None]:
    def tunable(model: str) -> str | None:
        from microserve.catalog.manifest import find_manifest

        manifest = find_manifest(model, catalog_dir)
        if manifest is None:
            return f"The model `{model}` is not a catalog model that can be fine-tuned"
        if manifest.task not in ("chat", "completion") or manifest.architecture not in ("llama", "gemma3"):
            return f"The model `{model}` cannot be fine-tuned (adapters are trained for llama and gemma3 text models)"
        return None

    return tunable
