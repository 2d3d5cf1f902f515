"""The embedded job store: one SQLite file (stdlib ``sqlite3``), so ``parkway serve`` needs nothing else.

Every operation is one ``BEGIN IMMEDIATE`` transaction run off the Trio thread
(``trio.to_thread.run_sync``) on the store's one connection, behind a lock. ``BEGIN IMMEDIATE``
takes SQLite's write lock at once, so several processes sharing the file (``--workers``) never
claim the same job. The journal is WAL with ``synchronous=FULL``: a committed job survives a
power cut, not only a crash. State changes are the pure functions of :mod:`proxy.jobs.model`; this
module only reads a record, applies one, and writes it back with its :class:`~proxy.jobs.store.Index`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Set
from dataclasses import replace
from pathlib import Path
from typing import Any, Self, TypeVar

import structlog
import trio

from ..errors import Overloaded
from . import model as jobs
from .model import Job
from .store import (
    Cancellation,
    QueueFull,
    StoreStats,
    cancellation,
    credential_queue_full,
    expired,
    index_of,
    job_from_json,
    job_to_json,
)

log = structlog.get_logger("parkway.jobs")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    queued_at   REAL,
    lease_until REAL,
    delivery_at REAL,
    expires_at  REAL,
    record      BLOB NOT NULL,
    credential  TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (queued_at) WHERE queued_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_until) WHERE lease_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_deliveries ON jobs (delivery_at) WHERE delivery_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
"""
# After the credential column exists (a file from before it gets it added and filled first).
CREDENTIAL_INDEX = """
CREATE INDEX IF NOT EXISTS jobs_credential_queued ON jobs (credential, queued_at) WHERE queued_at IS NOT NULL;
"""


class SQLiteJobStore:
    """The :class:`~proxy.jobs.store.JobStore` in a SQLite file; ``async with SQLiteJobStore(path) as store``."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def __aenter__(self) -> Self:
        await trio.to_thread.run_sync(self._open)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        db, self._db = self._db, None
        if db is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, db)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are begun and ended explicitly below.
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # A deleted record's bytes (the prompt, the answer) are overwritten, not left in free pages.
            db.execute("PRAGMA secure_delete=ON")
            db.executescript(SCHEMA)
            if "credential" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}:
                db.execute("ALTER TABLE jobs ADD COLUMN credential TEXT")
                db.execute("UPDATE jobs SET credential = json_extract(CAST(record AS TEXT), '$.credential')")
            db.executescript(CREDENTIAL_INDEX)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _close(self, db: sqlite3.Connection) -> None:
        with self._lock:
            db.close()

    # --- running a transaction ------------------------------------------------------------------

    async def _transaction(self, work: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction on a worker thread (a write one takes SQLite's lock at
        once). It always runs to its end (a thread cannot be interrupted), so a cancelled
        caller never leaves half a change."""
        try:
            return await trio.to_thread.run_sync(self._locked, work, write)
        except sqlite3.Error as exc:  # locked past busy_timeout, disk full, I/O error
            log.error("job_store_error", store="sqlite", error=str(exc))
            raise Overloaded(
                f"the job store (SQLite) failed: {exc}", code="job_store_unavailable", retry_after=1
            ) from None

    def _locked(self, work: Callable[[sqlite3.Connection], T], write: bool) -> T:
        with self._lock:
            db = self._db
            if db is None:
                raise RuntimeError("the job store is closed")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    @staticmethod
    def _write(db: sqlite3.Connection, job: Job) -> None:
        i = index_of(job)
        db.execute(
            "INSERT OR REPLACE INTO jobs (id, status, queued_at, lease_until, delivery_at, expires_at, record,"
            " credential) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job.id, job.status, i.queued_at, i.lease_until, i.delivery_at, i.expires_at, job_to_json(job),
             job.credential),
        )  # fmt: skip

    @staticmethod
    def _read(db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _decode(db, job_id, row[0]) if row else None

    def _first(self, db: sqlite3.Connection, query: str, args: tuple[Any, ...]) -> Job | None:
        """The first readable job a query finds (an unreadable record is dropped and logged)."""
        while row := db.execute(query, args).fetchone():
            job = _decode(db, row[0], row[1])
            if job is not None:
                return job
        return None

    # --- the protocol ---------------------------------------------------------------------------

    async def add(self, job: Job, *, max_queued: int, max_queued_credential: int | None = None) -> None:
        def work(db: sqlite3.Connection) -> None:
            (queued,) = db.execute("SELECT count(*) FROM jobs WHERE queued_at IS NOT NULL").fetchone()
            if queued >= max_queued:
                raise QueueFull(f"{queued} jobs are queued (max_jobs_queued = {max_queued})")
            if max_queued_credential is not None:
                (mine,) = db.execute(
                    "SELECT count(*) FROM jobs WHERE queued_at IS NOT NULL AND credential = ?", (job.credential,)
                ).fetchone()
                if mine >= max_queued_credential:
                    raise QueueFull(credential_queue_full(job.credential, mine, max_queued_credential))
            self._write(db, job)

        await self._transaction(work)

    async def get(self, job_id: str, *, now: float) -> Job | None:
        job = await self._transaction(lambda db: self._read(db, job_id), write=False)
        return None if job is None or expired(job, now) else job

    async def claim(
        self, owner: str, *, now: float, lease: float, skip_credentials: Set[str] = frozenset(),
        skip_ids: Set[str] = frozenset(),
    ) -> Job | None:  # fmt: skip
        skipped = "".join(
            f" AND {column} NOT IN ({', '.join('?' * len(values))})"
            for column, values in (("credential", skip_credentials), ("id", skip_ids))
            if values
        )
        skip_args = (*skip_credentials, *skip_ids)

        def work(db: sqlite3.Connection) -> Job | None:
            # A job whose runner died (lease run out) first: it has waited longest.
            job = self._first(
                db,
                f"SELECT id, record FROM jobs WHERE lease_until <= ?{skipped} ORDER BY lease_until LIMIT 1",
                (now, *skip_args),
            ) or self._first(
                db,
                f"SELECT id, record FROM jobs WHERE queued_at IS NOT NULL{skipped} ORDER BY queued_at LIMIT 1",
                skip_args,
            )
            if job is None:
                return None
            job = jobs.claimed(job, owner, now=now, lease=lease)
            self._write(db, job)
            return job

        return await self._transaction(work)

    async def renew(self, job_id: str, owner: str, *, until: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            job = self._read(db, job_id)
            if job is None or job.status != jobs.IN_PROGRESS or job.owner != owner:
                return False
            self._write(db, replace(job, lease_until=until))
            return True

        return await self._transaction(work)

    async def finish(self, job: Job, owner: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            current = self._read(db, job.id)
            if current is None or current.status != jobs.IN_PROGRESS or current.owner != owner:
                return False
            self._write(db, job)
            return True

        return await self._transaction(work)

    async def cancel(self, job_id: str, *, now: float, result_ttl: float) -> Cancellation | None:
        def work(db: sqlite3.Connection) -> Cancellation | None:
            job = self._read(db, job_id)
            if job is None or expired(job, now):
                return None
            if job.terminal:
                return cancellation(job, job)
            after = jobs.cancelled(job, now=now, result_ttl=result_ttl)
            self._write(db, after)
            return cancellation(job, after)  # read and written in one BEGIN IMMEDIATE: no claim between

        return await self._transaction(work)

    async def claim_delivery(self, *, now: float, lease: float) -> Job | None:
        def work(db: sqlite3.Connection) -> Job | None:
            query = "SELECT id, record FROM jobs WHERE delivery_at <= ? ORDER BY delivery_at LIMIT 1"
            job = self._first(db, query, (now,))
            if job is None:
                return None
            # Hidden from other runners until the lease ends; a runner that dies mid-attempt
            # leaves it due again then (at-least-once).
            self._write(db, replace(job, delivery=replace(job.delivery, next_at=now + lease)))
            return job

        return await self._transaction(work)

    async def delivered(self, job: Job) -> None:
        await self._transaction(lambda db: self._write(db, job))

    async def purge(self, *, now: float) -> int:
        """Delete expired jobs; their bytes are zeroed in the file (``secure_delete``) and the WAL,
        which still holds the pages as they were, is checkpointed and truncated."""
        purged = await self._transaction(
            lambda db: db.execute("DELETE FROM jobs WHERE expires_at <= ?", (now,)).rowcount
        )
        if purged:
            try:
                await trio.to_thread.run_sync(self._checkpoint)
            except sqlite3.Error as exc:  # busy: the next purge's checkpoint does it
                log.warning("job_store_checkpoint_failed", store="sqlite", error=str(exc))
        return int(purged)

    def _checkpoint(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def stats(self, *, now: float) -> StoreStats:
        def work(db: sqlite3.Connection) -> StoreStats:
            by_status = dict.fromkeys(jobs.STATUSES, 0)
            for status, count in db.execute("SELECT status, count(*) FROM jobs GROUP BY status"):
                by_status[status] = count
            (pending,) = db.execute("SELECT count(*) FROM jobs WHERE delivery_at IS NOT NULL").fetchone()
            (oldest,) = db.execute("SELECT min(queued_at) FROM jobs").fetchone()
            return StoreStats(by_status, pending, max(0.0, now - oldest) if oldest is not None else 0.0)

        return await self._transaction(work, write=False)


def _decode(db: sqlite3.Connection, job_id: str, record: bytes) -> Job | None:
    try:
        return job_from_json(record)
    except ValueError as exc:
        # Never expected; dropping it keeps one bad row from blocking the queue forever.
        log.error("job_record_unreadable", job=job_id[:12], error=str(exc))
        db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return None
