"""Job-store semantics, the same for SQLite and Redis: fair FIFO, limits, idempotency, leases, one result."""

from __future__ import annotations

import time
import uuid

import pytest

from sdjax.serve import store as S
from sdjax.serve.redis_store import RedisStore
from sdjax.serve.sqlite_store import SqliteStore


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "jobs.sqlite3", results_dir=tmp_path / "results")
    else:
        url = request.getfixturevalue("redis_url")
        s = RedisStore(url, prefix=f"t{uuid.uuid4().hex[:8]}", cache_dir=tmp_path / "cache")
    yield s
    s.close()


def job(tenant="alice", key=None, kind="video") -> S.Job:
    return S.Job(id=S.new_job_id(kind), kind=kind, tenant=tenant, params={"prompt": "p"}, model="m",
                 created_at=time.time(), idempotency_key=key)


def artefact(tmp_path, text: bytes):
    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(text)
    return path


RESULT = {"content_type": "video/mp4", "bytes": 5, "sha256": "x"}


def test_fair_fifo_over_tenants(store):
    a = [store.create(job("alice"), limit=10)[0].id for _ in range(3)]
    b = store.create(job("bob"), limit=10)[0].id
    order = [store.lease("w", 30).id for _ in range(4)]
    # round-robin over tenants (least recently served first), FIFO within a tenant
    assert order == [a[0], b, a[1], a[2]]
    assert store.lease("w", 30) is None


def test_queue_limit_and_idempotency(store):
    first, created = store.create(job(key="k1"), limit=2, idem_hash="h1")
    assert created and store.queue_depth() == 1
    again, created = store.create(job(key="k1"), limit=2, idem_hash="h1")
    assert not created and again.id == first.id and store.queue_depth() == 1
    with pytest.raises(S.IdempotencyConflict):
        store.create(job(key="k1"), limit=2, idem_hash="other body")
    other_tenant, created = store.create(job("bob", key="k1"), limit=2, idem_hash="h1")
    assert created and other_tenant.id != first.id  # keys are per tenant
    with pytest.raises(S.QueueFull):
        store.create(job(), limit=2)
    assert store.queue_depth() == 2
    # a replay still answers while the queue is full
    assert store.create(job(key="k1"), limit=2, idem_hash="h1")[0].id == first.id


def test_expired_lease_requeues_at_front_then_fails(store):
    j1 = store.create(job(), limit=10)[0]
    j2 = store.create(job(), limit=10)[0]
    leased = store.lease("w1", ttl=0.05)
    assert leased.id == j1.id and leased.attempts == 1 and leased.status == S.IN_PROGRESS
    time.sleep(0.1)
    assert store.reap(max_attempts=2) == [j1.id]
    again = store.lease("w2", ttl=0.05)
    assert again.id == j1.id and again.attempts == 2  # back at the front, ahead of j2
    time.sleep(0.1)
    assert store.reap(max_attempts=2) == [j1.id]
    dead = store.get(j1.id)
    assert dead.status == S.FAILED and dead.error["code"] == "worker_lost"
    assert store.lease("w2", 30).id == j2.id


def test_stale_worker_cannot_write_a_second_result(store, tmp_path):
    j = store.create(job(), limit=10)[0]
    stale = store.lease("w1", ttl=0.05)
    time.sleep(0.1)
    store.reap(max_attempts=3)
    fresh = store.lease("w2", ttl=30)
    assert fresh.id == j.id and fresh.lease_token != stale.lease_token
    assert store.heartbeat(j.id, stale.lease_token, 30) is None
    assert not store.progress(j.id, stale.lease_token, steps_done=3)
    done = store.complete(j.id, fresh.lease_token, artefact(tmp_path, b"fresh"), {**RESULT, "filename": j.id + ".mp4"})
    assert done.status == S.COMPLETED
    late = store.complete(j.id, stale.lease_token, artefact(tmp_path, b"stale"),
                          {**RESULT, "filename": j.id + ".mp4"})
    assert late is None
    final = store.get(j.id)
    assert final.status == S.COMPLETED and final.attempts == 2
    assert store.result_path(final).read_bytes() == b"fresh"


def test_cancel_queued_and_running(store, tmp_path):
    queued = store.create(job(), limit=10)[0]
    running = store.create(job(), limit=10)[0]
    assert store.cancel(queued.id).status == S.CANCELLED
    held = store.lease("w", 30)
    assert held.id == running.id  # the cancelled job left the queue
    flagged = store.cancel(running.id)
    assert flagged.status == S.IN_PROGRESS and flagged.cancel_requested
    assert store.heartbeat(running.id, held.lease_token, 30).cancel_requested
    # a cancelled job never becomes completed, even if the worker finishes it
    ended = store.complete(running.id, held.lease_token, artefact(tmp_path, b"x"),
                           {**RESULT, "filename": running.id + ".mp4"})
    assert ended.status == S.CANCELLED and store.result_path(ended) is None
    assert store.cancel(running.id).status == S.CANCELLED  # idempotent on terminal jobs


def test_release_hands_back_without_counting_an_attempt(store):
    j = store.create(job(), limit=10)[0]
    held = store.lease("w", 30)
    back = store.release(j.id, held.lease_token)
    assert back.status == S.QUEUED and back.attempts == 0 and back.lease_token is None
    assert store.queue_position(back) == 0
    assert store.lease("w2", 30).id == j.id


def test_list_pages_per_tenant_and_kind(store):
    ids = [store.create(job("alice"), limit=10)[0].id for _ in range(3)]
    store.create(job("bob"), limit=10)
    store.create(job("alice", kind="image"), limit=10)
    page, more = store.list("alice", "video", limit=2, after=None, descending=False)
    assert [j.id for j in page] == ids[:2] and more
    page, more = store.list("alice", "video", limit=2, after=ids[1], descending=False)
    assert [j.id for j in page] == ids[2:] and not more
    page, _ = store.list("alice", "video", limit=10, after=None, descending=True)
    assert [j.id for j in page] == ids[::-1]


def test_shared_state(store):
    assert store.kv_get("model_info") is None
    store.kv_set("model_info", {"name": "m", "version": "2"})
    assert store.kv_get("model_info")["version"] == "2"
    assert store.kv_incr("reload_seq") == 1 and store.kv_incr("reload_seq") == 2
    store.worker_seen("w1", {"state": "ready"})
    assert store.workers(within_s=5) == {"w1": {"state": "ready"}}
    assert store.ping()


def test_purge_deletes_ended_jobs_with_results_and_idempotency_keys(store, tmp_path):
    done = store.create(job(key="k1"), limit=10)[0]
    leased = store.lease("w", ttl=30)
    store.complete(done.id, leased.lease_token, artefact(tmp_path, b"video"), {**RESULT, "filename": done.id + ".mp4"})
    result = store.result_path(store.get(done.id))
    cancelled = store.create(job(), limit=10)[0]
    store.cancel(cancelled.id)
    waiting = store.create(job(), limit=10)[0]

    assert store.purge(ended_before=time.time() - 60) == []  # nothing ended that long ago
    assert store.get(done.id).status == S.COMPLETED and result.is_file()

    assert sorted(store.purge(ended_before=time.time() + 1)) == sorted([done.id, cancelled.id])
    assert store.get(done.id) is None and store.get(cancelled.id) is None and not result.exists()
    assert store.get(waiting.id).status == S.QUEUED  # a job that has not ended is never purged
    listed, _ = store.list("alice", "video", limit=10, after=None, descending=False)
    assert [j.id for j in listed] == [waiting.id]
    again, created = store.create(job(key="k1"), limit=10)  # the key went with its job
    assert created and again.id != done.id
    assert store.purge(ended_before=time.time() + 1) == []
