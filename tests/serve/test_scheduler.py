"""The worker's scheduler over stages, in-process: one job's text encoding and decode overlap another's
denoise (with overlap on), never with it off; every allowed shape is warmed before the first lease."""

from __future__ import annotations

import dataclasses
import threading
import time

from sdjax.serve import store as S
from sdjax.serve.metrics import Metrics
from sdjax.serve.scheduler import Worker
from sdjax.serve.settings import Settings
from sdjax.serve.sqlite_store import SqliteStore
from tests.serve.conftest import wait_until
from tests.serve.fake_engine import FakeEngine


class RecordingEngine(FakeEngine):
    """Records (prompt, stage, start, end) for every stage call; decode is slow so overlap is visible."""

    def __init__(self):
        super().__init__(step_seconds=0.02)
        self.spans: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _span(self, key, fn, *args, **kw):
        t0 = time.monotonic()
        out = fn(*args, **kw)
        with self._lock:
            self.spans[key] = (t0, time.monotonic())
        return out

    def encode_text(self, params):
        return self._span((params.prompt, "encode"), super().encode_text, params)

    def denoise(self, params, text, **kw):
        out = self._span((params.prompt, "denoise"), super().denoise, params, text, **kw)
        out.prompt = params.prompt
        return out

    def decode(self, latents, output_type="np"):
        def slow():
            time.sleep(0.3)
            return FakeEngine.decode(self, latents, output_type)

        return self._span((latents.prompt, "decode"), slow)


def run_two_jobs(tmp_path, overlap: bool) -> RecordingEngine:
    settings = Settings(data_dir=str(tmp_path), worker_id="w", overlap_stages=overlap, prefetch_at=0.5,
                        poll_seconds=0.01, sizes=((48, 32), (64, 64)), frames=(5, 9))
    store = SqliteStore(tmp_path / "jobs.sqlite3", results_dir=tmp_path / "results")
    engine = RecordingEngine()
    worker = Worker(settings, store, lambda _settings, _model: engine, Metrics())
    worker.start()
    try:
        wait_until(lambda: worker.ready, 10, "warm-up")
        # warm-up compiled every allowed shape (videos and one-frame images) before the worker took jobs
        assert sorted(engine.warmed) == [(48, 32, 1), (48, 32, 5), (48, 32, 9), (64, 64, 1), (64, 64, 5),
                                         (64, 64, 9)]
        ids = []
        for prompt in ("A", "B"):
            params = engine.user_params(prompt=prompt, seed=1, num_inference_steps=10)
            job = S.Job(id=S.new_job_id("video"), kind="video", tenant="t", model="fake-tiny",
                        params={**dataclasses.asdict(params), "fps": 8}, created_at=time.time())
            ids.append(store.create(job, limit=10)[0].id)
        wait_until(lambda: all(store.get(i).status == S.COMPLETED for i in ids), 20, "both jobs")
    finally:
        worker.stop()
        store.close()
    return engine


def test_stages_of_two_jobs_overlap(tmp_path):
    engine = run_two_jobs(tmp_path, overlap=True)
    assert engine.output_types == {"uint8"}  # warm-up and decode: frames as the files hold them, rounded on device
    s = engine.spans
    # B's text encoding starts while A denoises (prefetch), and A's decode runs beside B's denoise
    assert s["B", "encode"][0] < s["A", "denoise"][1]
    assert s["B", "denoise"][0] < s["A", "decode"][1]
    # one job per stage at a time: B denoises after A has finished denoising
    assert s["B", "denoise"][0] >= s["A", "denoise"][1]


def test_no_overlap_runs_jobs_one_after_the_other(tmp_path):
    s = run_two_jobs(tmp_path, overlap=False).spans
    assert s["B", "encode"][0] >= s["A", "decode"][1]


class OldProtocolEngine(FakeEngine):
    """An engine written before decode / warmup took output_type."""

    def decode(self, latents):
        return FakeEngine.decode(self, latents)


def test_an_engine_without_output_type_fails_at_start_naming_it(tmp_path):
    settings = Settings(data_dir=str(tmp_path), worker_id="w", poll_seconds=0.01, sizes=((48, 32),), frames=(5,))
    store = SqliteStore(tmp_path / "jobs.sqlite3", results_dir=tmp_path / "results")
    worker = Worker(settings, store, lambda _settings, _model: OldProtocolEngine(), Metrics())
    worker.start()
    try:
        wait_until(lambda: worker.state == "failed", 10, "the start to fail")
        assert not worker.ready
        assert "OldProtocolEngine.decode must take output_type" in worker.error
    finally:
        worker.stop()
        store.close()
