"""The fine-tuning jobs layer: files and jobs in SQLite, owners kept apart, validation, cancellation, recovery."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from microserve.errors import InvalidRequest
from microserve.finetune.jobs import FineTuningJobs, JobRunner, NotFound, PayloadTooLarge
from microserve.finetune.jobstore import JobStore, owner_of
from microserve.protocol.fine_tuning import CreateJobRequest, Hyperparameters
from microserve.settings import Settings

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
ALICE = owner_of("alice-key")
BOB = owner_of("bob-key")


def jsonl(*items: object) -> bytes:
    return "".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items).encode()


@pytest.fixture
def api(tmp_path: Path) -> FineTuningJobs:
    store = JobStore(tmp_path / "fine_tuning")
    runner = JobRunner(store, lora_dir=tmp_path / "loras", cache_dir=Settings().cache_dir)
    return FineTuningJobs(store, runner, max_file_bytes=4096)


def wait_status(api: FineTuningJobs, owner: str | None, job_id: str, *wanted: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.retrieve_job(owner, job_id).status
        if status in wanted:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {api.retrieve_job(owner, job_id).status}")


def test_files_are_stored_listed_and_owned(api: FineTuningJobs) -> None:
    uploaded = api.upload(ALICE, "train.jsonl", "fine-tune", jsonl(GOOD))
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(jsonl(GOOD)) and uploaded.purpose == "fine-tune"
    assert api.file_content(ALICE, uploaded.id).read_bytes() == jsonl(GOOD)
    assert [f.id for f in api.list_files(ALICE).data] == [uploaded.id]
    # Another key sees none of it.
    assert api.list_files(BOB).data == []
    assert api.list_files(None).data == []
    with pytest.raises(NotFound):
        api.retrieve_file(BOB, uploaded.id)
    with pytest.raises(NotFound):
        api.delete_file(BOB, uploaded.id)
    assert api.delete_file(ALICE, uploaded.id).deleted
    assert api.list_files(ALICE).data == []
    assert not api.store.file_path(uploaded.id).exists()


def test_upload_limits(api: FineTuningJobs) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        api.upload(ALICE, "big.jsonl", "fine-tune", b"x" * 5000)
    assert caught.value.status_code == 413
    assert list(api.store.files_dir.iterdir()) == []  # nothing half-written is kept
    with pytest.raises(InvalidRequest, match="purpose"):
        api.upload(ALICE, "a.jsonl", "assistants", jsonl(GOOD))


def test_job_requests_are_checked(api: FineTuningJobs) -> None:
    train = api.upload(ALICE, "train.jsonl", "fine-tune", jsonl(GOOD))
    with pytest.raises(InvalidRequest, match="not a catalog model"):
        api.create_job(ALICE, CreateJobRequest(model="gpt-4o", training_file=train.id))
    with pytest.raises(InvalidRequest, match="cannot be fine-tuned"):
        api.create_job(ALICE, CreateJobRequest(model="all-minilm-l6-v2", training_file=train.id))
    with pytest.raises(NotFound):
        api.create_job(BOB, CreateJobRequest(model="smollm2-135m-instruct", training_file=train.id))
    # The request model refuses a bound it documents; the jobs layer checks again for callers that skip it.
    with pytest.raises(ValidationError, match="n_epochs"):
        Hyperparameters(n_epochs=0)
    with pytest.raises(InvalidRequest, match="n_epochs"):
        api.create_job(
            ALICE,
            CreateJobRequest(
                model="smollm2-135m-instruct",
                training_file=train.id,
                hyperparameters=Hyperparameters.model_construct(n_epochs=0),
            ),
        )


def test_bad_lines_fail_the_job_listing_each(api: FineTuningJobs) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 1200}, {"role": "assistant", "content": "ok"}]}
    bad = jsonl(GOOD, '{"messages": [', {"messages": [{"role": "user", "content": "no reply"}]}, long)
    upload = FineTuningJobs(api.store, api.runner, max_file_bytes=1 << 20).upload(ALICE, "bad.jsonl", "fine-tune", bad)
    job = api.create_job(ALICE, CreateJobRequest(model="smollm2-135m-instruct", training_file=upload.id))
    assert job.status == "validating_files" and job.fine_tuned_model is None
    assert wait_status(api, ALICE, job.id, "failed", "queued") == "failed"
    failed = api.retrieve_job(ALICE, job.id)
    assert failed.error is not None and failed.error.code == "invalid_training_file"
    assert "line 2: invalid JSON" in failed.error.message
    assert "line 3: no assistant message" in failed.error.message
    assert "line 4:" in failed.error.message and "over the sequence limit of 1024" in failed.error.message
    assert "line 1" not in failed.error.message
    messages = [e.message for e in api.list_events(ALICE, job.id).data]
    assert any("validation failed" in m for m in messages)
    with pytest.raises(InvalidRequest, match="already failed"):
        api.cancel_job(ALICE, job.id)


def test_valid_jobs_queue_and_cancel_before_running(api: FineTuningJobs) -> None:
    train = api.upload(ALICE, "train.jsonl", "fine-tune", jsonl(GOOD, GOOD))
    job = api.create_job(
        ALICE,
        CreateJobRequest(
            model="smollm2-135m-instruct",
            training_file=train.id,
            suffix="zephyr",
            seed=7,
            hyperparameters=Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5),
        ),
    )
    assert wait_status(api, ALICE, job.id, "queued", "failed") == "queued"
    queued = api.retrieve_job(ALICE, job.id)
    assert queued.hyperparameters.model_dump() == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert queued.seed == 7 and queued.user_provided_suffix == "zephyr"
    row = api.store.job(job.id, ALICE)
    assert row is not None and row.config["epochs"] == 2 and row.config["learning_rate"] == pytest.approx(5e-4)
    assert row.config["name"].startswith("ft-smollm2-135m-instruct-zephyr-")
    assert [j.id for j in api.list_jobs(ALICE).data] == [job.id]
    assert api.list_jobs(BOB).data == []
    with pytest.raises(NotFound):
        api.cancel_job(BOB, job.id)
    assert api.cancel_job(ALICE, job.id).status == "cancelled"
    assert api.store.next_queued() is None


def test_a_job_running_at_a_crash_is_failed_on_restart(tmp_path: Path, api: FineTuningJobs) -> None:
    train = api.upload(None, "train.jsonl", "fine-tune", jsonl(GOOD))
    job = api.create_job(None, CreateJobRequest(model="smollm2-135m-instruct", training_file=train.id))
    wait_status(api, None, job.id, "queued")
    api.store.update_job(job.id, status="running", started_at=int(time.time()), worker_pid=999999)
    # A new server process over the same database.
    store = JobStore(api.store.root)
    runner = JobRunner(store, lora_dir=tmp_path / "loras", cache_dir=Settings().cache_dir)
    assert runner.recover() == [job.id]
    again = FineTuningJobs(store, runner)
    failed = again.retrieve_job(None, job.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_restarted" and "stopped while this job was running" in failed.error.message
    assert [f.id for f in again.list_files(None).data] == [train.id]  # the files survive
    assert runner.recover() == []


def test_lora_knobs_beyond_openai_hyperparameters(api: FineTuningJobs) -> None:
    # NeMo Customizer's hyperparameters.lora.adapter_dim arrives as rank.
    train = api.upload(ALICE, "train.jsonl", "fine-tune", jsonl(GOOD))
    job = api.create_job(
        ALICE, CreateJobRequest(model="smollm2-135m-instruct", training_file=train.id), overrides={"rank": 8}
    )
    row = api.store.job(job.id, ALICE)
    assert row is not None and row.config["rank"] == 8
    with pytest.raises(InvalidRequest, match="rank"):
        api.create_job(
            ALICE, CreateJobRequest(model="smollm2-135m-instruct", training_file=train.id), overrides={"rank": 0}
        )
    assert len(api.list_jobs(ALICE).data) == 1
    api.cancel_job(ALICE, job.id)


def test_the_worker_process_trains_a_tiny_model_and_cancels(tmp_path: Path) -> None:
    from test_tune_train import data, tiny_base

    base = tiny_base(tmp_path / "tiny")
    store = JobStore(tmp_path / "fine_tuning")
    lora_dir = tmp_path / "loras"
    runner = JobRunner(store, lora_dir=lora_dir, cache_dir=tmp_path / "cache", threads=1, nice=5)
    api = FineTuningJobs(store, runner, tunable=lambda model: None)
    runner.start()
    try:
        upload = api.upload(ALICE, "train.jsonl", "fine-tune", data(tmp_path / "train.jsonl").read_bytes())
        job = api.create_job(
            ALICE,
            CreateJobRequest(model=str(base), training_file=upload.id, hyperparameters=Hyperparameters(n_epochs=2)),
        )
        assert wait_status(api, ALICE, job.id, "succeeded", "failed", "cancelled", timeout=240) == "succeeded", [
            e.message for e in api.list_events(ALICE, job.id, limit=50).data
        ]
        done = api.retrieve_job(ALICE, job.id)
        assert done.fine_tuned_model and (lora_dir / done.fine_tuned_model / "adapter.gguf").is_file()
        assert done.trained_tokens and done.trained_tokens > 0
        events = api.list_events(ALICE, job.id, limit=100).data
        assert [e.data["step"] for e in reversed(events) if e.type == "metrics"] == [1, 2, 3, 4]  # type: ignore[index]
        assert [c.step_number for c in api.list_checkpoints(ALICE, job.id).data] == [4, 2]
        assert events[0].message == "The job has successfully completed"
        log = (store.root / "logs" / f"{job.id}.log").read_text()
        assert "Traceback" not in log

        slow = api.create_job(
            ALICE,
            CreateJobRequest(
                model=str(base), training_file=upload.id, hyperparameters=Hyperparameters(n_epochs=50, batch_size=1)
            ),
        )
        wait_status(api, ALICE, slow.id, "running", timeout=120)
        deadline = time.monotonic() + 120
        while not any(e.type == "metrics" for e in api.list_events(ALICE, slow.id).data):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = store.job(slow.id, ALICE).worker_pid  # type: ignore[union-attr]
        assert pid is not None
        import os

        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 5
        api.cancel_job(ALICE, slow.id)
        assert wait_status(api, ALICE, slow.id, "cancelled", "failed", "succeeded", timeout=60) == "cancelled"
        name = store.job(slow.id, ALICE).fine_tuned_model  # type: ignore[union-attr]
        assert name and not (lora_dir / name).exists()
        assert api.retrieve_job(ALICE, slow.id).fine_tuned_model is None
    finally:
        runner.stop()
