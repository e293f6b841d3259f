"""The embedded job store: one SQLite file (WAL) plus a results folder, both in the data dir.

Every change is one `BEGIN IMMEDIATE` transaction, so several threads (and, on one host, several processes)
can share the file. A result file is moved into place inside the transaction that marks the job completed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from sdjax.serve import store as S
from sdjax.serve.store import Job

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, seq INTEGER NOT NULL, tenant TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
  lease_expires REAL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, kind, seq);
CREATE TABLE IF NOT EXISTS idem (tenant TEXT, key TEXT, job_id TEXT, hash TEXT, PRIMARY KEY (tenant, key));
CREATE TABLE IF NOT EXISTS tenants (tenant TEXT PRIMARY KEY, served REAL NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, seen REAL NOT NULL, info TEXT NOT NULL);
"""


class SqliteStore(S.JobStore):
    def __init__(self, path: str | Path, results_dir: str | Path):
        self.results = Path(results_dir)
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _load(db, job_id: str) -> Job | None:
        row = db.execute("SELECT doc FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_json(row[0]) if row else None

    @staticmethod
    def _save(db, job: Job) -> None:
        db.execute("INSERT OR REPLACE INTO jobs (id, seq, tenant, kind, status, lease_expires, doc) "
                   "VALUES (?,?,?,?,?,?,?)",
                   (job.id, job.seq, job.tenant, job.kind, job.status, job.lease_expires, job.to_json()))

    def _update(self, job_id: str, move: Callable[[Job], Job | None], on_save=None) -> Job | None:
        with self._tx() as db:
            job = self._load(db, job_id)
            new = move(job) if job else None
            if new is not None:
                if on_save:
                    on_save(new)
                self._save(db, new)
            return new

    # ------------------------------------------------------------------------------ API side
    def create(self, job, *, limit, idem_hash=None):
        with self._tx() as db:
            if job.idempotency_key:
                row = db.execute("SELECT job_id, hash FROM idem WHERE tenant=? AND key=?",
                                 (job.tenant, job.idempotency_key)).fetchone()
                if row:
                    if row[1] != idem_hash:
                        raise S.IdempotencyConflict(job.idempotency_key)
                    return self._load(db, row[0]), False
            depth = db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (S.QUEUED,)).fetchone()[0]
            if depth >= limit:
                raise S.QueueFull(depth)
            job.seq = (db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0] or 0) + 1
            self._save(db, job)
            db.execute("INSERT OR IGNORE INTO tenants (tenant, served) VALUES (?, 0)", (job.tenant,))
            if job.idempotency_key:
                db.execute("INSERT INTO idem VALUES (?,?,?,?)", (job.tenant, job.idempotency_key, job.id, idem_hash))
            return job, True

    def get(self, job_id):
        rows = self._read("SELECT doc FROM jobs WHERE id=?", (job_id,))
        return Job.from_json(rows[0][0]) if rows else None

    def list(self, tenant, kind, *, limit, after, descending):
        cursor = None
        if after:
            rows = self._read("SELECT seq FROM jobs WHERE id=? AND tenant=?", (after, tenant))
            cursor = rows[0][0] if rows else None
        op, order = ("<", "DESC") if descending else (">", "ASC")
        where, args = "tenant=? AND kind=?", [tenant, kind]
        if cursor is not None:
            where += f" AND seq {op} ?"
            args.append(cursor)
        rows = self._read(f"SELECT doc FROM jobs WHERE {where} ORDER BY seq {order} LIMIT ?", (*args, limit + 1))
        jobs = [Job.from_json(r[0]) for r in rows]
        return jobs[:limit], len(jobs) > limit

    def queue_depth(self):
        return self._read("SELECT COUNT(*) FROM jobs WHERE status=?", (S.QUEUED,))[0][0]

    def queue_position(self, job):
        if job.status != S.QUEUED:
            return None
        return self._read("SELECT COUNT(*) FROM jobs WHERE status=? AND seq<?", (S.QUEUED, job.seq))[0][0]

    def result_path(self, job):
        if job.status != S.COMPLETED or not job.result:
            return None
        path = self.results / job.result["filename"]
        return path if path.is_file() else None

    # ------------------------------------------------------------------------------ worker side
    def lease(self, worker, ttl):
        now = time.time()
        with self._tx() as db:
            # the oldest queued job of the tenant served least recently (round-robin over tenants)
            row = db.execute(
                "SELECT j.id FROM jobs j JOIN tenants t ON t.tenant = j.tenant WHERE j.status=? AND j.seq = "
                "(SELECT MIN(seq) FROM jobs WHERE status=? AND tenant=j.tenant) ORDER BY t.served, j.seq LIMIT 1",
                (S.QUEUED, S.QUEUED)).fetchone()
            if row is None:
                return None
            job = S.t_lease(self._load(db, row[0]), worker, now, ttl)
            self._save(db, job)
            db.execute("UPDATE tenants SET served=? WHERE tenant=?", (now, job.tenant))
            return job

    def heartbeat(self, job_id, token, ttl):
        return self._update(job_id, lambda j: S.t_heartbeat(j, token, time.time(), ttl))

    def progress(self, job_id, token, **fields):
        return self._update(job_id, lambda j: S.t_progress(j, token, fields)) is not None

    def complete(self, job_id, token, artefact, result, **fields):
        final = self.results / result["filename"]

        def place(new: Job) -> None:
            if new.status == S.COMPLETED:  # first writer wins: the file only moves for the lease holder
                os.replace(artefact, final)

        return self._update(job_id, lambda j: S.t_complete(j, token, time.time(), result, fields), on_save=place)

    def purge(self, ended_before):
        marks = ",".join("?" * len(S.TERMINAL))
        with self._tx() as db:
            rows = db.execute(f"SELECT doc FROM jobs WHERE status IN ({marks}) AND "
                              "json_extract(doc, '$.finished_at') < ?", (*S.TERMINAL, ended_before)).fetchall()
            jobs = [Job.from_json(r[0]) for r in rows]
            for j in jobs:
                db.execute("DELETE FROM jobs WHERE id=?", (j.id,))
                db.execute("DELETE FROM idem WHERE job_id=?", (j.id,))
        for j in jobs:  # after the commit: a crash in between leaves a file without a job, never the reverse
            if j.result:
                (self.results / j.result["filename"]).unlink(missing_ok=True)
        return [j.id for j in jobs]

    def reap(self, max_attempts):
        now = time.time()
        ids = [r[0] for r in self._read("SELECT id FROM jobs WHERE status=? AND lease_expires<=?",
                                         (S.IN_PROGRESS, now))]
        return [i for i in ids if self._update(i, lambda j: S.t_expire(j, now, max_attempts)) is not None]

    # ------------------------------------------------------------------------------ shared state
    def kv_get(self, key):
        rows = self._read("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def kv_set(self, key, value):
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    def kv_incr(self, key):
        with self._tx() as db:
            row = db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
            n = (json.loads(row[0])["n"] if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps({"n": n})))
            return n

    def worker_seen(self, worker, info):
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?)", (worker, time.time(), json.dumps(info)))

    def workers(self, within_s):
        rows = self._read("SELECT id, info FROM workers WHERE seen>=?", (time.time() - within_s,))
        return {r[0]: json.loads(r[1]) for r in rows}

    def ping(self):
        return bool(self._read("SELECT 1"))

    def close(self):
        with self._lock:
            self._db.close()
