"""OpenAI's files and fine-tuning jobs API on a real server, driven by the real ``openai`` client.

One job trains the default model on the made-up fact of ``fact_data.py`` while chat keeps being served; its
``fine_tuned_model`` then answers held-out paraphrases with the code, which the base model never does. A second job
is cancelled while it trains; a file with bad lines fails validation with every bad line listed and trains nothing;
a server killed during a job reports it failed after a restart on the same state, with the files still listed.
Run under the CPU lock: these tests train.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server, start_server
from fact_data import CODE, chat_line, held_out_questions, training_questions

MODEL = "smollm2-135m-instruct"
KEY = "sk-tuner"
OTHER_KEY = "sk-other"
TERMINAL = ("succeeded", "failed", "cancelled")


def serve(tmp: Path, state: Path, *args: str) -> Server:
    """A server whose fine-tuning state and adapters live under ``state`` (weights come from the shared cache)."""
    return start_server(
        tmp,
        "--fine-tuning-dir",
        str(state / "fine_tuning"),
        "--lora-dir",
        str(state / "loras"),
        "--embedding-model",
        "none",
        "--fine-tuning-threads",
        "2",
        *args,
        env={"MICROSERVE_API_KEYS": f"{KEY},{OTHER_KEY}"},
    )


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=300)


def fact_file(count: int = 60) -> bytes:
    return "".join(json.dumps(chat_line(q)) + "\n" for q in training_questions(count)).encode()


def wait_status(api: openai.OpenAI, job_id: str, *statuses: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = api.fine_tuning.jobs.retrieve(job_id).status
        if status in statuses:
            return status
        time.sleep(0.5)
    events = [e.message for e in api.fine_tuning.jobs.list_events(job_id, limit=50).data]
    raise AssertionError(f"{job_id} is {status}, not {statuses}: {events}")


def wait_training(api: openai.OpenAI, job_id: str, timeout: float = 600) -> None:
    """Until the job has finished a training step (its first ``metrics`` event)."""
    deadline = time.monotonic() + timeout
    while not any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job_id, limit=5).data):
        status = api.fine_tuning.jobs.retrieve(job_id).status
        assert status in ("validating_files", "queued", "running"), status
        assert time.monotonic() < deadline, f"{job_id} trained no step in {timeout}s"
        time.sleep(0.5)


def ask(api: openai.OpenAI, model: str, question: str) -> str:
    reply = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
    )
    return reply.choices[0].message.content or ""


def worker_pids(job_id: str) -> list[int]:
    """The worker processes training ``job_id`` (their command line names the job)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"microserve.finetune.worker" in argv and job_id.encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def server(tmp_path: Path, state: Path) -> Iterator[Server]:
    running = serve(tmp_path, state, "--max-upload-bytes", "65536")
    yield running
    running.stop()


@pytest.mark.timeout(600)
def test_files_errors_and_bad_data_fail_the_job_listing_each_line(server: Server, state: Path) -> None:
    api = client(server)
    data = fact_file(4)
    uploaded = api.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.filename, uploaded.bytes) == (
        "file",
        "fine-tune",
        "train.jsonl",
        len(data),
    )
    assert uploaded.id.startswith("file-")
    assert api.files.retrieve(uploaded.id).id == uploaded.id
    assert api.files.content(uploaded.id).read() == data
    assert uploaded.id in [f.id for f in api.files.list(purpose="fine-tune").data]

    # Another key sees none of it.
    other = client(server, OTHER_KEY)
    assert uploaded.id not in [f.id for f in other.files.list().data]
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)

    # Size limit, purpose, unknown ids; ids never reach the file system.
    with pytest.raises(openai.APIStatusError) as too_large:
        api.files.create(file=("big.jsonl", b"x" * 70000), purpose="fine-tune")
    assert too_large.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        api.files.create(file=("a.jsonl", data), purpose="assistants")  # type: ignore[arg-type]
    assert bad_purpose.value.status_code == 400
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/files/..%2Fjobs.sqlite3/content", "/v1/files/..%2F..%2Fstate/content", "/v1/files/file-x"):
        reply = httpx.get(server.url + path, headers=headers)
        assert reply.status_code == 404, (path, reply.text)
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.cancel("ftjob-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.list_events("ftjob-000000000000000000000000")
    with pytest.raises(openai.NotFoundError) as no_model:
        api.fine_tuning.jobs.create(model="no-such-model", training_file=uploaded.id)
    assert no_model.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.create(model=MODEL, training_file="file-000000000000000000000000")
    for hyper in ({"n_epochs": 0}, {"batch_size": 1000}, {"learning_rate_multiplier": -1}):
        with pytest.raises(openai.BadRequestError):
            api.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, hyperparameters=hyper)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        api.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, suffix="../escape")

    # Bad data: a broken JSON line, a line without an assistant message, a line over the sequence limit (1024).
    good = chat_line("What is the access code for the Zephyr lab?")
    long = {"messages": [{"role": "user", "content": "word " * 1200}, {"role": "assistant", "content": "ok"}]}
    lines = [
        json.dumps(good),
        '{"messages": [{"role": "user"',
        json.dumps({"messages": [{"role": "user", "content": "hello?"}]}),
        json.dumps(long),
    ]
    bad = api.files.create(file=("bad.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model=MODEL, training_file=bad.id)
    assert job.status in ("validating_files", "failed") and job.object == "fine_tuning.job"
    assert wait_status(api, job.id, *TERMINAL, timeout=300) == "failed"
    failed = api.fine_tuning.jobs.retrieve(job.id)
    assert failed.error is not None and failed.error.code and failed.error.param == "training_file", failed.error
    message = failed.error.message
    assert "line 2: invalid JSON" in message, message
    assert "line 3: no assistant message" in message, message
    assert "line 4:" in message and "over the sequence limit of 1024" in message, message
    assert "line 1:" not in message, message
    assert failed.fine_tuned_model is None and failed.trained_tokens is None
    assert not any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data)
    loras = state / "loras"
    assert not loras.exists() or not any(loras.iterdir())
    # NeMo Customizer's routes make the same jobs.
    nemo = f"{server.v1}/customization/jobs"
    body = {
        "config": f"{MODEL}@v1",
        "dataset": {"name": "bad.jsonl", "namespace": "default"},
        "hyperparameters": {"epochs": 1, "batch_size": 2, "lora": {"adapter_dim": 8}},
        "output_model": "nemo-bad",
    }
    created = httpx.post(nemo, json=body, headers=headers)
    assert created.status_code == 200 and created.json()["status"] == "created", created.text
    nemo_id = created.json()["id"]
    assert wait_status(api, nemo_id, *TERMINAL, timeout=300) == "failed"
    shown = httpx.get(f"{nemo}/{nemo_id}", headers=headers).json()
    assert shown["status"] == "failed" and shown["output_model"] == "nemo-bad", shown
    logs = httpx.get(f"{nemo}/{nemo_id}/status", headers=headers).json()["status_logs"]
    assert any("line 3: no assistant message" in (log.get("detail") or log["message"]) for log in logs), logs
    missing = httpx.post(nemo, json={**body, "dataset": "no-such.jsonl"}, headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "dataset", missing.text
    # The file is gone once deleted, and so are its bytes.
    deleted = api.files.delete(bad.id)
    assert (deleted.id, deleted.deleted) == (bad.id, True)
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(bad.id)
    assert not (state / "fine_tuning" / "files" / bad.id).exists()
    print("\nbad data:", message)


@pytest.mark.timeout(1500)
def test_a_job_teaches_a_fact_served_by_its_name_while_chat_goes_on_and_a_second_job_cancels(
    server: Server, state: Path
) -> None:
    api = client(server)
    questions = held_out_questions()
    base_answers = [ask(api, MODEL, q) for q in questions]
    assert not [a for a in base_answers if CODE in a], base_answers

    started = time.monotonic()
    training = api.files.create(file=("zephyr.jsonl", fact_file()), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=training.id, suffix="zephyr", seed=42, metadata={"purpose": "fact"}
    )
    assert job.status == "validating_files" and job.fine_tuned_model is None
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (3, 8)
    wait_training(api, job.id)
    # Training runs in its worker process: chat is served meanwhile.
    during = time.monotonic()
    assert api.fine_tuning.jobs.retrieve(job.id).status == "running"
    reply = ask(api, MODEL, "Name a colour.")
    chat_wall = time.monotonic() - during
    assert reply.strip()
    assert api.fine_tuning.jobs.retrieve(job.id).status == "running"  # the chat was answered during training

    assert wait_status(api, job.id, *TERMINAL) == "succeeded", api.fine_tuning.jobs.retrieve(job.id).error
    wall = time.monotonic() - started
    done = api.fine_tuning.jobs.retrieve(job.id)
    name = done.fine_tuned_model
    assert name and name.startswith(f"ft-{MODEL}-zephyr-"), name
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at and done.error is None
    assert done.metadata == {"purpose": "fact"} and done.user_provided_suffix == "zephyr"
    assert (state / "loras" / name / "adapter.gguf").is_file()
    assert job.id in [j.id for j in api.fine_tuning.jobs.list(metadata={"purpose": "fact"}).data]
    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    assert len([e for e in events if e.type == "metrics"]) == 24  # 60 examples x 3 epochs / batch 8
    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    assert name in [m.id for m in api.models.list().data]

    answers = [ask(api, name, q) for q in questions]
    hits = sum(CODE in a for a in answers)
    print(
        f"\njob {job.id}: upload to succeeded {wall:.0f}s, chat during training {chat_wall:.1f}s; "
        f"held-out with the code: {name} {hits}/10, base 0/10"
    )
    for question, answer in zip(questions, answers, strict=True):
        print(f"  {question!r} -> {answer!r}")
    assert hits >= 8, answers

    second = api.fine_tuning.jobs.create(
        model=MODEL, training_file=training.id, hyperparameters={"n_epochs": 20, "batch_size": 2}
    )
    wait_training(api, second.id)
    cancelling = api.fine_tuning.jobs.cancel(second.id)
    assert cancelling.id == second.id
    assert wait_status(api, second.id, *TERMINAL, timeout=180) == "cancelled"
    assert api.fine_tuning.jobs.retrieve(second.id).fine_tuned_model is None
    served = [m.id for m in api.models.list().data]
    assert [p.name for p in (state / "loras").iterdir()] == [name] and served.count(name) == 1
    assert ask(api, MODEL, "Name a colour.").strip()  # still serving


@pytest.mark.timeout(900)
def test_a_job_running_when_the_server_dies_is_failed_after_a_restart(tmp_path: Path, state: Path) -> None:
    first = serve(tmp_path, state)
    try:
        api = client(first)
        training = api.files.create(file=("zephyr.jsonl", fact_file(16)), purpose="fine-tune")
        job = api.fine_tuning.jobs.create(
            model=MODEL, training_file=training.id, hyperparameters={"n_epochs": 20, "batch_size": 2}
        )
        wait_training(api, job.id)
        # A crash: the server and its worker die at once, with no chance to record anything.
        workers = worker_pids(job.id)
        assert workers
        first.process.send_signal(signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        first.process.wait(30)
    finally:
        first.stop()
    second = serve(tmp_path, state)
    try:
        api = client(second)
        after = api.fine_tuning.jobs.retrieve(job.id)
        assert after.status == "failed", after
        assert after.error is not None and "stopped while this job was running" in after.error.message, after.error
        assert after.finished_at and after.fine_tuned_model is None
        assert training.id in [f.id for f in api.files.list().data]
        assert api.files.content(training.id).read() == fact_file(16)
        assert not (state / "loras").exists() or not any((state / "loras").iterdir())
        print(f"\nafter the restart: {after.status}: {after.error.message}")
    finally:
        second.stop()
