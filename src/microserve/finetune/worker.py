"""The process one fine-tuning job runs in: ``python -m microserve.finetune.worker --root DIR --job ID ...``.

Started by :class:`~microserve.finetune.jobs.JobRunner` (niced, threads bounded); it records its own progress,
checkpoints and failures in the job store. On success it publishes the adapter and records the trained tokens;
the runner then serves the adapter and marks the job ``succeeded``. SIGTERM stops it after the current step: the
job ends ``cancelled`` (or ``failed`` when the server is shutting down). When the server that started it dies, the
worker notices (it is re-parented) and stops the same way, so no orphan trains on.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from microserve.finetune.jobstore import JobStore
from microserve.finetune.train import EpochRecord, StepRecord

EXIT_CANCELLED = 3


class JobProgress:
    """Progress as job events: a metrics event per step, the estimated finish on the job."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.total = 0
        self.started = 0.0
        self.first = 0

    def start(self, total_steps: int, done: int) -> None:
        """Training starts."""
        self.total = total_steps
        self.started = time.monotonic()
        self.first = done
        self.store.add_event(self.job_id, f"Training started: {total_steps} steps")

    def step(self, record: StepRecord, tokens_per_second: float) -> None:
        """A metrics event, as OpenAI's jobs emit one per step."""
        self.store.add_event(
            self.job_id,
            f"Step {record.step}/{self.total}: training loss={record.loss:.4f}",
            kind="metrics",
            data={
                "step": record.step,
                "train_loss": record.loss,
                "total_steps": self.total,
                "learning_rate": record.learning_rate,
                "tokens_per_second": round(tokens_per_second, 1),
            },
        )
        done = record.step - self.first
        elapsed = time.monotonic() - self.started
        finish = time.time() + elapsed / max(done, 1) * (self.total - record.step)
        self.store.update_job(self.job_id, estimated_finish=int(finish))

    def message(self, text: str) -> None:
        """An info event."""
        self.store.add_event(self.job_id, text)

    def close(self) -> None:
        """Nothing to close."""


def main(argv: list[str] | None = None) -> int:
    """Run one job to its end; the exit code tells the runner how it ended (0 done, 3 cancelled, 1 failed)."""
    parser = argparse.ArgumentParser(prog="microserve.finetune.worker")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--lora-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--catalog-dir", type=Path)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority by this much first")
    args = parser.parse_args(argv)
    if args.nice:
        # The worker lowers its own priority: a preexec_fn in the server's threaded process could deadlock.
        os.nice(args.nice)

    stop = threading.Event()
    orphaned = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    parent = os.getppid()

    def watch_parent() -> None:
        # A server killed outright (SIGKILL, OOM) sends no SIGTERM: its worker is re-parented instead.
        while not stop.is_set():
            if os.getppid() != parent:
                orphaned.set()
                stop.set()
                return
            time.sleep(1.0)

    threading.Thread(target=watch_parent, name="ft-parent-watch", daemon=True).start()
    store = JobStore(args.root)
    job = store.job(args.job, any_owner=True)
    if job is None:
        print(f"no job {args.job}", file=sys.stderr)
        return 1

    from microserve.finetune.base import BaseModelError, QuietLlamaLogs
    from microserve.finetune.config import TuneConfig
    from microserve.finetune.data import DataError
    from microserve.finetune.pipeline import prepare, run, work_dir_for
    from microserve.finetune.train import Stopped

    quiet = QuietLlamaLogs()  # noqa: F841 - kept for the process's life
    config = TuneConfig(**job.config)
    if args.threads:
        config = config.model_copy(update={"threads": args.threads})

    def fail(code: str, message: str, param: str | None = None) -> int:
        store.add_event(job.id, f"Job failed: {message}", level="error")
        store.update_job(
            job.id,
            only_if=("running",),
            status="failed",
            finished_at=int(time.time()),
            error={"code": code, "message": message, "param": param},
        )
        return 1

    try:
        prepared = prepare(
            config,
            store.file_path(job.training_file),
            store.file_path(job.validation_file) if job.validation_file else None,
            args.cache_dir,
            catalog_dir=args.catalog_dir,
        )
    except DataError as exc:
        return fail("invalid_training_file", exc.describe(), "training_file")
    except (BaseModelError, OSError) as exc:
        return fail("invalid_model", str(exc), "model")

    def on_epoch(record: EpochRecord) -> None:
        metrics = {"step": record.step, "train_loss": record.train_loss, "valid_loss": record.valid_loss}
        store.add_checkpoint(job.id, record.step, metrics, f"{config.name}:ckpt-step-{record.step}")

    try:
        outcome = run(
            config,
            prepared,
            args.lora_dir,
            args.cache_dir,
            overwrite=True,
            progress=JobProgress(store, job.id),
            stop=stop,
            on_epoch=on_epoch,
            files={"training_file": job.training_file, "validation_file": job.validation_file or ""},
        )
    except Stopped:
        import shutil

        shutil.rmtree(work_dir_for(args.cache_dir, config.name), ignore_errors=True)
        current = store.job(job.id, any_owner=True)
        if orphaned.is_set():
            return fail(
                "server_stopped",
                "the server stopped while this job was running; start a new job (its files are kept)",
            )
        if current is not None and not current.cancel_requested:
            return fail("server_shutdown", "the server shut down while this job was running; start a new job")
        store.add_event(job.id, "Job cancelled")
        store.update_job(job.id, only_if=("running",), status="cancelled", finished_at=int(time.time()))
        return EXIT_CANCELLED
    except Exception as exc:  # the job fails with the reason; the server that started it keeps serving
        return fail("training_failed", f"{type(exc).__name__}: {exc}")
    # The adapter is published; the runner serves it and then reports the job succeeded.
    store.add_event(job.id, f"New fine-tuned model created: {config.name}")
    store.update_job(
        job.id, only_if=("running",), trained_tokens=outcome.report["trained_tokens"], fine_tuned_model=config.name
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
