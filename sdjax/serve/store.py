"""Jobs, their state machine, and the job-store interface (SQLite and Redis implement it).

Contract: at-least-once execution, exactly-once visible result per job id.
- A worker *leases* a queued job (token + expiry) and heartbeats it; an expired lease puts the job back at
  the front of its tenant's queue (or fails it after `max_attempts`).
- Every write by a worker names its lease token; a stale worker (its lease expired and the job moved on)
  is refused, so a job never shows two results.
- Status only moves forward: queued -> in_progress -> completed | failed | cancelled (a lease that expires or
  a drained worker hands the job back to queued, the one step back).

The transitions are pure functions on `Job`, shared by both stores; a store only makes them atomic and keeps
its indexes (queue, leases) in step with the status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
TERMINAL = (COMPLETED, FAILED, CANCELLED)


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"queue is full ({depth} jobs waiting)")
        self.depth = depth


class IdempotencyConflict(Exception):
    """The same idempotency key was used with a different request body."""


@dataclass
class Job:
    id: str
    kind: str  # "video" | "image"
    tenant: str
    params: dict  # resolved user params (UserParams fields) + "fps"
    model: str
    created_at: float
    seq: int = 0  # FIFO order; kept on requeue so a requeued job goes back to the front
    status: str = QUEUED
    stage: str | None = None  # encode | denoise | decode | save
    progress: int = 0
    steps_done: int = 0
    steps_total: int = 0
    attempts: int = 0
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_token: str | None = None
    lease_expires: float | None = None
    timings: dict = field(default_factory=dict)
    error: dict | None = None
    result: dict | None = None  # {content_type, filename, bytes, sha256}
    weights_version: str | None = None
    idempotency_key: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        return cls(**json.loads(text))

    def copy(self, **changes) -> Job:
        changes.setdefault("timings", dict(self.timings))
        return dataclasses.replace(self, **changes)


def new_job_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------- transitions
# Each returns the new job, or None when the move is refused (stale lease, wrong status).


def t_lease(job: Job, worker: str, now: float, ttl: float) -> Job | None:
    if job.status != QUEUED:
        return None
    return job.copy(status=IN_PROGRESS, stage="leased", attempts=job.attempts + 1, lease_owner=worker,
                    lease_token=secrets.token_hex(8), lease_expires=now + ttl,
                    started_at=job.started_at or now)


def _holds(job: Job, token: str) -> bool:
    return job.status == IN_PROGRESS and job.lease_token == token


def t_heartbeat(job: Job, token: str, now: float, ttl: float) -> Job | None:
    return job.copy(lease_expires=now + ttl) if _holds(job, token) else None


def t_progress(job: Job, token: str, fields: dict) -> Job | None:
    return job.copy(**fields) if _holds(job, token) else None


def _ended(job: Job, status: str, now: float, **fields) -> Job:
    return job.copy(status=status, finished_at=now, lease_owner=None, lease_token=None, lease_expires=None,
                    **fields)


def t_complete(job: Job, token: str, now: float, result: dict, fields: dict) -> Job | None:
    if not _holds(job, token):
        return None
    if job.cancel_requested:  # a cancelled job never becomes completed
        return _ended(job, CANCELLED, now, stage=None)
    return _ended(job, COMPLETED, now, stage=None, progress=100, result=result, **fields)


def t_finish(job: Job, token: str, now: float, status: str, error: dict | None, fields: dict) -> Job | None:
    if not _holds(job, token):
        return None
    return _ended(job, status, now, stage=None, error=error, **fields)


def t_release(job: Job, token: str) -> Job | None:
    """A draining worker gives the job back; it does not count as an attempt."""
    if not _holds(job, token):
        return None
    if job.cancel_requested:
        return _ended(job, CANCELLED, time.time(), stage=None)
    return job.copy(status=QUEUED, stage=None, progress=0, steps_done=0, attempts=max(0, job.attempts - 1),
                    lease_owner=None, lease_token=None, lease_expires=None)


def t_cancel(job: Job, now: float) -> Job | None:
    if job.status == QUEUED:
        return _ended(job, CANCELLED, now, cancel_requested=True)
    if job.status == IN_PROGRESS and not job.cancel_requested:
        return job.copy(cancel_requested=True)  # the worker stops at the next denoising step
    return None


def t_expire(job: Job, now: float, max_attempts: int) -> Job | None:
    """A lease that ran out: the worker died or hung."""
    if job.status != IN_PROGRESS or job.lease_expires is None or job.lease_expires > now:
        return None
    if job.cancel_requested:
        return _ended(job, CANCELLED, now, stage=None)
    if job.attempts >= max_attempts:
        err = {"code": "worker_lost", "message": f"the worker running this job stopped {job.attempts} times"}
        return _ended(job, FAILED, now, stage=None, error=err)
    return job.copy(status=QUEUED, stage=None, progress=0, steps_done=0, lease_owner=None, lease_token=None,
                    lease_expires=None)


# ------------------------------------------------------------------------------------- interface


class JobStore(ABC):
    """Durable jobs, a fair FIFO queue over tenants, leases, results and a little shared state (kv)."""

    # --- API side
    @abstractmethod
    def create(self, job: Job, *, limit: int, idem_hash: str | None = None) -> tuple[Job, bool]:
        """Enqueue `job` (its seq is assigned here); with `job.idempotency_key`, return the earlier job of the
        same tenant and key instead (created=False). Raises QueueFull / IdempotencyConflict."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list(self, tenant: str, kind: str, *, limit: int, after: str | None,
             descending: bool) -> tuple[list[Job], bool]:
        """A page of the tenant's jobs of one kind and whether more follow."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    @abstractmethod
    def queue_position(self, job: Job) -> int | None:
        """0-based number of queued jobs ahead (FIFO order, ignoring fairness)."""

    def cancel(self, job_id: str) -> Job | None:
        self._update(job_id, lambda j: t_cancel(j, time.time()))
        return self.get(job_id)

    @abstractmethod
    def _update(self, job_id: str, move, *args) -> Job | None:
        """Apply the transition `move(job) -> job | None` atomically; returns the stored job."""

    @abstractmethod
    def result_path(self, job: Job) -> Path | None:
        """A local file holding the job's artefact (fetched from the shared store if needed)."""

    # --- worker side
    @abstractmethod
    def lease(self, worker: str, ttl: float) -> Job | None:
        """The next queued job, round-robin over tenants (least recently served first), FIFO within one."""

    @abstractmethod
    def heartbeat(self, job_id: str, token: str, ttl: float) -> Job | None:
        """Extend the lease; None if it was lost. The returned job carries `cancel_requested`."""

    @abstractmethod
    def progress(self, job_id: str, token: str, **fields) -> bool: ...

    @abstractmethod
    def complete(self, job_id: str, token: str, artefact: Path, result: dict, **fields) -> Job | None:
        """Store the artefact and mark the job completed, atomically and only for the lease holder."""

    def finish(self, job_id: str, token: str, status: str, error: dict | None = None, **fields) -> Job | None:
        return self._update(job_id, lambda j: t_finish(j, token, time.time(), status, error, fields))

    def release(self, job_id: str, token: str) -> Job | None:
        return self._update(job_id, lambda j: t_release(j, token))

    @abstractmethod
    def purge(self, ended_before: float) -> list[str]:
        """Delete the jobs that ended (completed, failed, cancelled) before `ended_before`, with their results and
        idempotency keys; returns their ids (retention: `--result-ttl`)."""

    @abstractmethod
    def reap(self, max_attempts: int) -> list[str]:
        """Requeue (or fail) jobs whose lease expired; returns their ids."""

    # --- shared state: model info, reload requests and reports, live workers
    @abstractmethod
    def kv_get(self, key: str) -> dict | None: ...

    @abstractmethod
    def kv_set(self, key: str, value: dict) -> None: ...

    @abstractmethod
    def kv_incr(self, key: str) -> int: ...

    @abstractmethod
    def worker_seen(self, worker: str, info: dict) -> None: ...

    @abstractmethod
    def workers(self, within_s: float) -> dict[str, dict]: ...

    @abstractmethod
    def ping(self) -> bool: ...

    def close(self) -> None:  # noqa: B027 -- optional hook
        """Release connections (optional)."""


def open_store(settings) -> JobStore:
    data = settings.data_path
    data.mkdir(parents=True, exist_ok=True)
    if settings.backend == "redis":
        from sdjax.serve.redis_store import RedisStore

        return RedisStore(settings.redis_url, prefix=settings.redis_prefix, cache_dir=data / "cache")
    from sdjax.serve.sqlite_store import SqliteStore

    return SqliteStore(data / "jobs.sqlite3", results_dir=data / "results")
