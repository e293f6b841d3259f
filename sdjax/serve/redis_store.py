"""The scale-out job store on Redis: stateless API processes and pull-based workers share it.

Keys (under `prefix`):
  job:{id}        JSON job doc                       seq            job counter (FIFO order)
  queued          zset id -> seq (all queued jobs)    q:{tenant}     zset id -> seq (the tenant's queue)
  tenants         zset tenant -> last served time    leases         zset id -> lease expiry
  jobs:{t}:{kind} zset id -> seq (listing)           idem:{t}:{key} JSON {id, hash}
  result:{id}     artefact bytes (the results store every replica sees)
  ended           zset id -> finished_at (ended jobs, for retention)
  kv:{key}, ctr:{key}, workers (zset id -> last seen), worker:{id}

Every change is an optimistic transaction (WATCH the job key, read, apply the shared transition, MULTI/EXEC),
so two workers racing for a job or a stale worker writing late cannot both win.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import redis

from sdjax.serve import store as S
from sdjax.serve.store import Job


class RedisStore(S.JobStore):
    def __init__(self, url: str, prefix: str = "sdjax", cache_dir: str | Path = "cache"):
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self.p = prefix
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)

    def _k(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    def _write(self, pipe, old: Job | None, new: Job) -> None:
        """Queue the doc and keep the indexes in step with the status (inside MULTI)."""
        pipe.set(self._k("job", new.id), new.to_json())
        if new.status == S.QUEUED:
            pipe.zadd(self._k("queued"), {new.id: new.seq})
            pipe.zadd(self._k("q", new.tenant), {new.id: new.seq})
            pipe.zadd(self._k("tenants"), {new.tenant: 0}, nx=True)
        elif old is not None and old.status == S.QUEUED:
            pipe.zrem(self._k("queued"), new.id)
            pipe.zrem(self._k("q", new.tenant), new.id)
        if new.status == S.IN_PROGRESS:
            pipe.zadd(self._k("leases"), {new.id: new.lease_expires})
        else:
            pipe.zrem(self._k("leases"), new.id)
        if new.terminal:
            pipe.zadd(self._k("ended"), {new.id: new.finished_at})

    def _update(self, job_id: str, move, extra=None) -> Job | None:
        key = self._k("job", job_id)

        def tx(pipe):
            raw = pipe.get(key)
            old = Job.from_json(raw) if raw else None
            new = move(old) if old else None  # transitions return a new job; `old` stays as read
            if new is None:
                return None
            pipe.multi()
            self._write(pipe, old, new)
            if extra:
                extra(pipe, new)
            return new

        return self.r.transaction(tx, key, value_from_callable=True)

    # ------------------------------------------------------------------------------ API side
    def create(self, job, *, limit, idem_hash=None):
        idem = self._k("idem", job.tenant, job.idempotency_key) if job.idempotency_key else None
        job.seq = self.r.incr(self._k("seq"))

        def tx(pipe):
            if idem:
                raw = pipe.get(idem)
                if raw:
                    earlier = json.loads(raw)
                    if earlier["hash"] != idem_hash:
                        raise S.IdempotencyConflict(job.idempotency_key)
                    return Job.from_json(pipe.get(self._k("job", earlier["id"]))), False
            depth = pipe.zcard(self._k("queued"))
            if depth >= limit:
                raise S.QueueFull(depth)
            pipe.multi()
            self._write(pipe, None, job)
            pipe.zadd(self._k("jobs", job.tenant, job.kind), {job.id: job.seq})
            if idem:
                pipe.set(idem, json.dumps({"id": job.id, "hash": idem_hash}))
            return job, True

        watch = [self._k("queued")] + ([idem] if idem else [])
        return self.r.transaction(tx, *watch, value_from_callable=True)

    def get(self, job_id):
        raw = self.r.get(self._k("job", job_id))
        return Job.from_json(raw) if raw else None

    def list(self, tenant, kind, *, limit, after, descending):
        key = self._k("jobs", tenant, kind)
        cursor = self.r.zscore(key, after) if after else None
        if descending:
            hi = f"({int(cursor)}" if cursor is not None else "+inf"
            ids = self.r.zrevrangebyscore(key, hi, "-inf", start=0, num=limit + 1)
        else:
            lo = f"({int(cursor)}" if cursor is not None else "-inf"
            ids = self.r.zrangebyscore(key, lo, "+inf", start=0, num=limit + 1)
        docs = self.r.mget([self._k("job", i.decode()) for i in ids]) if ids else []
        jobs = [Job.from_json(d) for d in docs if d]
        return jobs[:limit], len(jobs) > limit

    def queue_depth(self):
        return self.r.zcard(self._k("queued"))

    def queue_position(self, job):
        return self.r.zrank(self._k("queued"), job.id) if job.status == S.QUEUED else None

    def result_path(self, job):
        if job.status != S.COMPLETED or not job.result:
            return None
        path = self.cache / job.result["filename"]
        if not path.is_file() or path.stat().st_size != job.result["bytes"]:
            data = self.r.get(self._k("result", job.id))
            if data is None:
                return None
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one
        return path

    # ------------------------------------------------------------------------------ worker side
    def lease(self, worker, ttl):
        for _ in range(20):
            tenants = self.r.zrange(self._k("tenants"), 0, -1, withscores=True)
            if not tenants:
                return None
            pipe = self.r.pipeline(transaction=False)
            for tenant, _served in tenants:
                pipe.zrange(self._k("q", tenant.decode()), 0, 0, withscores=True)
            firsts = pipe.execute()
            heads = [(served, h[0][1], h[0][0].decode()) for (_, served), h in zip(tenants, firsts, strict=True) if h]
            if not heads:
                return None
            _, _, job_id = min(heads)  # least recently served tenant, then FIFO
            job = self._lease_one(job_id, worker, ttl)
            if job is not None:
                return job
        return None  # heavy contention: let the caller poll again

    def _lease_one(self, job_id: str, worker: str, ttl: float) -> Job | None:
        now = time.time()
        return self._update(job_id, lambda j: S.t_lease(j, worker, now, ttl),
                            extra=lambda pipe, new: pipe.zadd(self._k("tenants"), {new.tenant: now}))

    def heartbeat(self, job_id, token, ttl):
        return self._update(job_id, lambda j: S.t_heartbeat(j, token, time.time(), ttl))

    def progress(self, job_id, token, **fields):
        return self._update(job_id, lambda j: S.t_progress(j, token, fields)) is not None

    def complete(self, job_id, token, artefact, result, **fields):
        data = Path(artefact).read_bytes()

        def put(pipe, new):
            if new.status == S.COMPLETED:
                pipe.set(self._k("result", job_id), data)

        job = self._update(job_id, lambda j: S.t_complete(j, token, time.time(), result, fields), extra=put)
        Path(artefact).unlink(missing_ok=True)
        return job

    def purge(self, ended_before):
        purged = []
        for job_id in (i.decode() for i in self.r.zrangebyscore(self._k("ended"), "-inf", f"({ended_before}")):
            job = self.get(job_id)  # ended jobs never change again: no WATCH needed
            pipe = self.r.pipeline()
            pipe.delete(self._k("job", job_id), self._k("result", job_id))
            pipe.zrem(self._k("ended"), job_id)
            if job is not None:
                pipe.zrem(self._k("jobs", job.tenant, job.kind), job_id)
                if job.idempotency_key:
                    pipe.delete(self._k("idem", job.tenant, job.idempotency_key))
            pipe.execute()
            if job is not None and job.result:
                (self.cache / job.result["filename"]).unlink(missing_ok=True)
            purged.append(job_id)
        return purged

    def reap(self, max_attempts):
        now = time.time()
        ids = [i.decode() for i in self.r.zrangebyscore(self._k("leases"), "-inf", now)]
        return [i for i in ids if self._update(i, lambda j: S.t_expire(j, now, max_attempts)) is not None]

    # ------------------------------------------------------------------------------ shared state
    def kv_get(self, key):
        raw = self.r.get(self._k("kv", key))
        return json.loads(raw) if raw else None

    def kv_set(self, key, value):
        self.r.set(self._k("kv", key), json.dumps(value))

    def kv_incr(self, key):
        return self.r.incr(self._k("ctr", key))

    def worker_seen(self, worker, info):
        pipe = self.r.pipeline()
        pipe.zadd(self._k("workers"), {worker: time.time()})
        pipe.set(self._k("worker", worker), json.dumps(info), ex=24 * 3600)
        pipe.execute()

    def workers(self, within_s):
        ids = [i.decode() for i in self.r.zrangebyscore(self._k("workers"), time.time() - within_s, "+inf")]
        infos = self.r.mget([self._k("worker", i) for i in ids]) if ids else []
        return {i: json.loads(v) for i, v in zip(ids, infos, strict=True) if v}

    def ping(self):
        return bool(self.r.ping())

    def close(self):
        self.r.close()
