"""Nothing lost: restart with queued jobs (SQLite), SIGTERM drain, hot reload with good and broken weights."""

from __future__ import annotations

import json
import signal

import httpx

from sdjax.serve import store as S
from sdjax.serve.sqlite_store import SqliteStore
from tests.serve.conftest import ADMIN_KEY, create_video, wait_status, wait_steps, wait_until


def test_drain_restart_and_kill9_keep_every_job(spawn, tmp_path):
    data = tmp_path / "data"
    args = ("--drain-timeout", "30", "--lease-seconds", "1.5")

    # 1. SIGTERM drains: readiness false, new jobs 503, the running job finishes, queued ones stay queued
    a = spawn(*args, data_dir=data, step_seconds=0.05, name="a")
    with a.client() as c:
        before = wait_status(c, create_video(c, prompt="done before", num_inference_steps=2)["id"])
        content = c.get(f"/v1/videos/{before['id']}/content").content
        running = create_video(c, prompt="finish me", num_inference_steps=60)["id"]  # ~3 s
        queued = create_video(c, prompt="later", num_inference_steps=2)["id"]
        wait_steps(c, running, 2)
        a.signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(a.url + "/readyz").status_code == 503, 5, "readiness to go false")
        r = c.post("/v1/videos", json={"prompt": "too late"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining" and "retry-after" in r.headers
        assert c.get(f"/v1/videos/{queued}").json()["status"] == "queued"  # reads still work while draining
    assert a.wait_exit(30) == 0
    store = SqliteStore(data / "jobs.sqlite3", results_dir=data / "results")
    try:
        finished = store.get(running)
        assert finished.status == S.COMPLETED and finished.steps_done == 60
        assert store.get(queued).status == S.QUEUED  # no new job was taken
    finally:
        store.close()

    # 2. restart with queued jobs: they run; then kill -9 mid-job (no drain, no release)
    b = spawn(*args, data_dir=data, step_seconds=0.05, name="b")
    with b.client() as c:
        assert wait_status(c, queued)["status"] == "completed"
        killed = create_video(c, prompt="running", num_inference_steps=60)["id"]
        waiting = [create_video(c, prompt=f"queued {i}", num_inference_steps=2)["id"] for i in range(2)]
        wait_steps(c, killed, 2)
    b.proc.kill()
    b.proc.wait(timeout=10)

    # 3. the next server requeues the job when its lease runs out and finishes everything
    c3 = spawn(*args, data_dir=data, step_seconds=0.01, name="c")
    with c3.client() as c:
        for job_id in [killed, *waiting]:
            assert wait_status(c, job_id, timeout=30)["status"] == "completed"
        again = c.get(f"/v1/videos/{killed}").json()
        assert again["attempts"] == 2 and again["steps_done"] == 60  # rerun from the start
        # completed results stay downloadable across restarts
        assert c.get(f"/v1/videos/{before['id']}/content").content == content


def _fake_model(root, name: str, spec: dict | str):
    path = root / name
    path.mkdir()
    (path / "fake.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return str(path)


def test_reload_swaps_between_jobs_and_survives_broken_weights(spawn, tmp_path):
    good = _fake_model(tmp_path, "v2", {"version": "v2"})
    broken = [_fake_model(tmp_path, "bad-json", "{not json"),
              _fake_model(tmp_path, "bad-warmup", {"version": "v3", "fail_warmup": True}),
              str(tmp_path / "missing")]
    s = spawn(step_seconds=0.05)
    with s.client() as c, s.client(ADMIN_KEY) as admin:
        old = create_video(c, prompt="old weights", num_inference_steps=40)["id"]
        wait_steps(c, old, 1)
        r = admin.post("/admin/reload", params={"wait": "true", "timeout": 30}, json={"model": good})
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        assert c.get("/v1/models").json()["data"][0]["version"] == "v2"
        new = create_video(c, prompt="new weights", num_inference_steps=2)["id"]
        assert wait_status(c, old)["weights_version"] == "v1"  # the running job kept its engine
        assert wait_status(c, new)["weights_version"] == "v2"

        for model in broken:
            r = admin.post("/admin/reload", params={"wait": "true", "timeout": 30}, json={"model": model})
            body = r.json()
            assert r.status_code == 422 and body["status"] == "failed" and body["error"], r.text
            assert c.get("/v1/models").json()["data"][0]["version"] == "v2"  # the old model keeps serving
        assert "fake.json" in admin.get("/admin/reload").json()["error"]  # the last error is reported
        after = create_video(c, prompt="still serving", num_inference_steps=2)["id"]
        done = wait_status(c, after)
        assert done["status"] == "completed" and done["weights_version"] == "v2"
        assert httpx.get(s.url + "/readyz").status_code == 200
        metrics = admin.get("/metrics").text
        assert 'sdjax_reloads_total{result="failed"} 3.0' in metrics
        assert 'sdjax_reloads_total{result="ok"} 1.0' in metrics
