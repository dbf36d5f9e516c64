"""Fine-tuning jobs through the jobs layer with the real worker process: success, niceness, cancellation.

The HTTP routes are thin over :class:`FineTuningJobs`; this drives it directly. Run under the CPU lock (trains).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fact_data import chat_line, training_questions

from microserve.finetune.jobs import FineTuningJobs, JobRunner
from microserve.finetune.jobstore import JobStore, owner_of
from microserve.protocol.fine_tuning import CreateJobRequest, Hyperparameters
from microserve.settings import Settings

OWNER = owner_of("a-key")


def wait_for(api: FineTuningJobs, job_id: str, *statuses: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.retrieve_job(OWNER, job_id).status
        if status in statuses:
            return status
        time.sleep(0.2)
    events = [e.message for e in api.list_events(OWNER, job_id, limit=50).data]
    raise AssertionError(f"{job_id} is {api.retrieve_job(OWNER, job_id).status}, not {statuses}: {events}")


@pytest.mark.timeout(1500)
def test_jobs_run_in_a_niced_worker_succeed_and_cancel(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "fine_tuning")
    lora_dir = tmp_path / "loras"
    runner = JobRunner(store, lora_dir=lora_dir, cache_dir=Settings().cache_dir, threads=2, nice=7)
    api = FineTuningJobs(store, runner)
    runner.start()
    try:
        data = "".join(json.dumps(chat_line(q)) + "\n" for q in training_questions(16))
        upload = api.upload(OWNER, "train.jsonl", "fine-tune", data.encode())
        first = api.create_job(
            OWNER,
            CreateJobRequest(
                model="smollm2-135m-instruct",
                training_file=upload.id,
                suffix="small",
                seed=1,
                hyperparameters=Hyperparameters(n_epochs=1, batch_size=8),
            ),
        )
        assert wait_for(api, first.id, "succeeded", "failed") == "succeeded", [
            e.message for e in api.list_events(OWNER, first.id, limit=50).data
        ]
        done = api.retrieve_job(OWNER, first.id)
        assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft-smollm2-135m-instruct-small-")
        assert done.trained_tokens and done.finished_at
        adapter = lora_dir / done.fine_tuned_model
        assert (adapter / "adapter.gguf").is_file() and (adapter / "training.json").is_file()
        events = api.list_events(OWNER, first.id, limit=100).data
        assert events[0].message == "The job has successfully completed"
        assert [e.data["step"] for e in reversed(events) if e.type == "metrics"] == [1, 2]  # type: ignore[index]
        checkpoints = api.list_checkpoints(OWNER, first.id).data
        assert [c.step_number for c in checkpoints] == [2]
        assert checkpoints[0].metrics.train_loss is not None

        second = api.create_job(
            OWNER,
            CreateJobRequest(
                model="smollm2-135m-instruct",
                training_file=upload.id,
                hyperparameters=Hyperparameters(n_epochs=20, batch_size=2),
            ),
        )
        wait_for(api, second.id, "running")
        deadline = time.monotonic() + 600
        while not any(e.type == "metrics" for e in api.list_events(OWNER, second.id).data):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # Training has started: the worker process lowered its own priority by then.
        pid = store.job(second.id, OWNER).worker_pid  # type: ignore[union-attr]
        assert pid and pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
        api.cancel_job(OWNER, second.id)
        assert wait_for(api, second.id, "cancelled", "failed", "succeeded", timeout=120) == "cancelled"
        name = store.job(second.id, OWNER).config["name"]  # type: ignore[union-attr]
        assert not (lora_dir / name).exists()
        assert not (Settings().cache_dir / "tune" / name).exists()
        # The runner lets go of the job once its worker has exited, a moment after the status is written.
        deadline = time.monotonic() + 30
        while runner.running_job == second.id:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        runner.stop()
