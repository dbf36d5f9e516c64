"""The fine-tuning state: uploaded files, jobs, their events and checkpoints, in one SQLite file.

The database lives in the cache directory (``<cache>/fine_tuning/jobs.sqlite3``) beside the uploaded files'
contents (``<cache>/fine_tuning/files/<id>``), so jobs and files survive a restart. The server and the job
worker process both write to it: every operation opens its own short connection, the journal is WAL and writers
wait for each other (``busy_timeout``) instead of failing.

Ownership: a row's ``owner`` is the sha256 of the API key that created it (None when the server has no keys); a
request sees only rows with its own owner.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    config TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,
    suffix TEXT,
    seed INTEGER NOT NULL,
    metadata TEXT,
    status TEXT NOT NULL,
    fine_tuned_model TEXT,
    error TEXT,
    trained_tokens INTEGER,
    result_files TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    estimated_finish INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    step_number INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    model_checkpoint TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS customizations (
    job_id TEXT PRIMARY KEY,
    request TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""

_CHUNK = 1 << 20


class FileTooLarge(Exception):
    """An upload went over the size limit; nothing was kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the file is larger than the limit of {limit} bytes")


def owner_of(api_key: str | None) -> str | None:
    """The owner recorded for requests made with ``api_key`` (hex sha256), None without keys."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest() if api_key else None


# The ids new_id makes for files: the only names under the files directory.
FILE_ID = re.compile(r"file-[0-9a-f]{24}")


def new_id(prefix: str, sep: str = "-") -> str:
    """An OpenAI-style object id (``file-...``, ``ftjob-...``, ``ft-event-...``, ``ftckpt_...``)."""
    return f"{prefix}{sep}{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class FileRow:
    id: str
    owner: str | None
    filename: str
    purpose: str
    bytes: int
    created_at: int


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    owner: str | None
    model: str
    training_file: str
    validation_file: str | None
    config: dict[str, Any]
    hyperparameters: dict[str, Any]
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    status: str
    fine_tuned_model: str | None
    error: dict[str, Any] | None
    trained_tokens: int | None
    result_files: list[str]
    created_at: int
    started_at: int | None
    finished_at: int | None
    estimated_finish: int | None
    cancel_requested: bool
    worker_pid: int | None


@dataclass(frozen=True, slots=True)
class EventRow:
    seq: int
    id: str
    job_id: str
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    seq: int
    id: str
    job_id: str
    created_at: int
    step_number: int
    metrics: dict[str, Any]
    model_checkpoint: str


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


class JobStore:
    """Files, jobs, events and checkpoints under ``root`` (normally ``<cache>/fine_tuning``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.path = root / "jobs.sqlite3"
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    # -- files ------------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        """Where a file's bytes are kept; ``ValueError`` for anything but an id this store makes, so that no id a
        client sends names a path outside the files directory."""
        if not FILE_ID.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.files_dir / file_id

    def add_file(
        self, owner: str | None, filename: str, purpose: str, source: BinaryIO | bytes, *, max_bytes: int
    ) -> FileRow:
        """Store an upload (streamed, never more than ``max_bytes``); raises :class:`FileTooLarge`."""
        file_id = new_id("file")
        target = self.file_path(file_id)
        tmp = target.with_name(f".{file_id}.tmp")
        size = 0
        try:
            with tmp.open("wb") as out:
                if isinstance(source, bytes):
                    size = len(source)
                    if size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    out.write(source)
                else:
                    while block := source.read(_CHUNK):
                        size += len(block)
                        if size > max_bytes:
                            raise FileTooLarge(max_bytes)
                        out.write(block)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        row = FileRow(file_id, owner, filename, purpose, size, int(time.time()))
        with self._connect() as db:
            db.execute(
                "INSERT INTO files (id, owner, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (row.id, row.owner, row.filename, row.purpose, row.bytes, row.created_at),
            )
        return row

    def get_file(self, owner: str | None, file_id: str) -> FileRow | None:
        """The file, if ``owner`` may see it."""
        with self._connect() as db:
            found = db.execute("SELECT * FROM files WHERE id = ? AND owner IS ?", (file_id, owner)).fetchone()
        return FileRow(**dict(found)) if found else None

    def list_files(self, owner: str | None, purpose: str | None = None) -> list[FileRow]:
        """``owner``'s files, newest first."""
        query = "SELECT * FROM files WHERE owner IS ?"
        args: list[Any] = [owner]
        if purpose:
            query += " AND purpose = ?"
            args.append(purpose)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC, rowid DESC", args).fetchall()
        return [FileRow(**dict(r)) for r in rows]

    def delete_file(self, owner: str | None, file_id: str) -> bool:
        """Forget the file and its bytes; False when ``owner`` has no such file."""
        with self._connect() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND owner IS ?", (file_id, owner)).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    # -- jobs -------------------------------------------------------------------------------------------------

    def add_job(
        self,
        owner: str | None,
        *,
        model: str,
        training_file: str,
        validation_file: str | None,
        config: dict[str, Any],
        hyperparameters: dict[str, Any],
        suffix: str | None,
        seed: int,
        metadata: dict[str, str] | None,
        fine_tuned_model: str,
    ) -> JobRow:
        """A new job in ``validating_files``."""
        job_id = new_id("ftjob")
        now = int(time.time())
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, owner, model, training_file, validation_file, config, hyperparameters, suffix,"
                " seed, metadata, status, fine_tuned_model, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    owner,
                    model,
                    training_file,
                    validation_file,
                    json.dumps(config),
                    json.dumps(hyperparameters),
                    suffix,
                    seed,
                    json.dumps(metadata) if metadata is not None else None,
                    "validating_files",
                    fine_tuned_model,
                    now,
                ),
            )
        job = self.job(job_id, any_owner=True)
        assert job is not None
        return job

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRow:
        data = dict(row)
        for key in ("config", "hyperparameters", "metadata", "error", "result_files"):
            data[key] = _loads(data[key])
        data["cancel_requested"] = bool(data["cancel_requested"])
        return JobRow(**data)

    def job(self, job_id: str, owner: str | None = None, *, any_owner: bool = False) -> JobRow | None:
        """The job, if ``owner`` may see it (``any_owner`` for the runner)."""
        with self._connect() as db:
            if any_owner:
                row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            else:
                row = db.execute("SELECT * FROM jobs WHERE id = ? AND owner IS ?", (job_id, owner)).fetchone()
        return self._job(row) if row else None

    def list_jobs(self, owner: str | None) -> list[JobRow]:
        """``owner``'s jobs, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE owner IS ? ORDER BY created_at DESC, rowid DESC", (owner,)
            ).fetchall()
        return [self._job(r) for r in rows]

    def next_queued(self) -> JobRow | None:
        """The oldest queued job."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' AND cancel_requested = 0 ORDER BY created_at, rowid LIMIT 1"
            ).fetchone()
        return self._job(row) if row else None

    def jobs_in(self, *statuses: str) -> list[JobRow]:
        """Every job (any owner) in one of ``statuses``."""
        marks = ", ".join("?" for _ in statuses)
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at", statuses).fetchall()
        return [self._job(r) for r in rows]

    def update_job(self, job_id: str, *, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set ``fields``; with ``only_if``, only while the job's status is one of those (False otherwise)."""
        encoded = {
            k: json.dumps(v)
            if k in ("config", "hyperparameters", "metadata", "error", "result_files") and v is not None
            else v
            for k, v in fields.items()
        }
        assignments = ", ".join(f"{k} = ?" for k in encoded)
        query = f"UPDATE jobs SET {assignments} WHERE id = ?"
        args: list[Any] = [*encoded.values(), job_id]
        if only_if:
            query += f" AND status IN ({', '.join('?' for _ in only_if)})"
            args += list(only_if)
        with self._connect() as db:
            return db.execute(query, args).rowcount > 0

    # -- events and checkpoints -------------------------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        kind: str = "message",
        data: dict[str, Any] | None = None,
    ) -> EventRow:
        """Append an event to the job's log."""
        event_id = new_id("ft-event")
        now = int(time.time())
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO events (id, job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event_id, job_id, now, level, kind, message, json.dumps(data) if data is not None else None),
            )
            seq = int(cursor.lastrowid or 0)
        return EventRow(seq, event_id, job_id, now, level, kind, message, data)

    def events(self, job_id: str) -> list[EventRow]:
        """The job's events, newest first (as OpenAI lists them)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [EventRow(**{**dict(r), "data": _loads(r["data"])}) for r in rows]

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any], model_checkpoint: str) -> CheckpointRow:
        """Record a checkpoint (one per epoch)."""
        checkpoint_id = new_id("ftckpt", "_")
        now = int(time.time())
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO checkpoints (id, job_id, created_at, step_number, metrics, model_checkpoint)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (checkpoint_id, job_id, now, step, json.dumps(metrics), model_checkpoint),
            )
            seq = int(cursor.lastrowid or 0)
        return CheckpointRow(seq, checkpoint_id, job_id, now, step, metrics, model_checkpoint)

    def checkpoints(self, job_id: str) -> list[CheckpointRow]:
        """The job's checkpoints, newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [CheckpointRow(**{**dict(r), "metrics": _loads(r["metrics"])}) for r in rows]

    # -- NeMo Customizer's view of a job ----------------------------------------------------------------------

    def add_customization(self, job_id: str, request: dict[str, Any]) -> None:
        """Keep what a NeMo Customizer client sent for a job (its name, config, dataset, hyperparameters ...)."""
        with self._connect() as db:
            db.execute("INSERT INTO customizations (job_id, request) VALUES (?, ?)", (job_id, json.dumps(request)))

    def customization(self, job_id: str) -> dict[str, Any] | None:
        """What a NeMo Customizer client sent for the job, if it was created that way."""
        with self._connect() as db:
            row = db.execute("SELECT request FROM customizations WHERE job_id = ?", (job_id,)).fetchone()
        return json.loads(row["request"]) if row else None
