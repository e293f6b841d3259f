"""The worker: one engine per process (one GPU group) and one scheduler over its stages.

Threads:
  main       loads + warms the engine (every allowed shape), then leases jobs from the store (pull-based)
  encode     stage 1 of each job (text encoder)
  denoise    stage 2 (the transformer loop; checks cancellation between steps)
  decode     stage 3 (VAE) + writing the MP4/PNG + storing the result
  heartbeat  extends leases, notices cancel requests and dead workers' jobs (reaper)

Stages are units: with `overlap_stages`, job B's text encoding starts near the end of job A's denoise, and A's
decode runs while B denoises. At most one job is in each stage, and a job is leased only when the worker is
about to run it, so idle workers elsewhere get the rest of the queue.

Each job keeps the engine it was leased with: a reload builds and warms a new engine beside the old one and
swaps the reference, so the swap happens between jobs and a failed reload leaves the old engine serving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import sys
import threading
import time

from sdjax.config import ConfigError
from sdjax.serve import store as S
from sdjax.serve.engine import Engine, check_engine, engine_version, write_artefact

FRAMES = "uint8"  # the engine's frames as the files hold them: rounded on the device, a quarter of float32's bytes

log = logging.getLogger("sdjax.serve.worker")

CANCEL_POLL_S = 0.25  # how often a running job re-reads its cancel flag from a shared store
PROGRESS_WRITE_S = 0.1  # progress is written at most this often (and always on the last step)
RELOAD_POLL_S = 1.0  # how often a worker looks for a reload request in the store
PURGE_EVERY_S = 60.0  # how often a worker deletes jobs past --result-ttl (ttl / 4 when shorter)
FRONT_STAGES = ("leased", "encode", "wait_denoise", "denoise")


class _Stopped(Exception):
    """A stage noticed its run was halted (cancel, drain, lost lease)."""


@dataclasses.dataclass
class _Run:
    job: S.Job
    engine: Engine
    version: str
    stage: str = "leased"
    fraction: float = 0.0
    params: object = None
    text: object = None
    latents: object = None
    cache_skip_ratio: float | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    reason: str | None = None  # why it was halted: cancel | release | lost
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    last_poll: float = 0.0
    last_write: float = 0.0

    @property
    def token(self) -> str:
        return self.job.lease_token

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()


def _block(out) -> None:
    """Wait for a stage's device work, so its timing is its own (JAX dispatches asynchronously)."""
    jax = sys.modules.get("jax")  # an engine without JAX has nothing to wait for
    if jax is not None:
        jax.block_until_ready(list(vars(out).values()) if dataclasses.is_dataclass(out) else out)


def _as_dict(obj) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(vars(obj))


class Worker:
    def __init__(self, settings, store: S.JobStore, factory, metrics):
        self.settings = settings
        self.store = store
        self.factory = factory
        self.metrics = metrics
        self.id = settings.worker_id
        self.state = "starting"  # starting | loading | ready | failed | draining | stopped
        self.error: str | None = None
        self.model_info: dict | None = None
        self._engine: Engine | None = None
        self._model = settings.model
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._draining = threading.Event()
        self._stopping = threading.Event()
        self._reload_seen = 0
        self._next_reload_check = 0.0
        self._next_purge = 0.0
        self._reload_thread: threading.Thread | None = None
        self._tmp = settings.data_path / "tmp"
        self._queues = {name: queue.Queue() for name in ("encode", "denoise", "decode")}
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        targets = {"main": self._main, "heartbeat": self._heartbeat,
                   "encode": lambda: self._stage_loop("encode", self._encode),
                   "denoise": lambda: self._stage_loop("denoise", self._denoise),
                   "decode": lambda: self._stage_loop("decode", self._decode)}
        for name, fn in targets.items():
            t = threading.Thread(target=fn, name=f"worker-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and not self._draining.is_set()

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "error": self.error, "running": self.running_ids(),
                "model": (self.model_info or {}).get("name"), "version": (self.model_info or {}).get("version")}

    def notify_cancel(self, job_id: str) -> None:
        """Same-process fast path; other workers see the flag on their next poll or heartbeat."""
        with self._lock:
            run = self._runs.get(job_id)
        if run:
            run.halt("cancel")

    def poke_reload(self) -> None:
        """Same-process fast path for a reload request (other workers poll the store)."""
        self._next_reload_check = 0.0
        self._wake.set()

    def drain(self, timeout: float) -> None:
        """Stop leasing; let held jobs finish for up to `timeout` s, then hand the rest back to the queue."""
        self._draining.set()
        if self.state == "ready":
            self.state = "draining"
        self.metrics.ready.set(0)
        log.info("draining", extra={"worker": self.id, "running": self.running_ids(), "timeout_s": timeout})
        if not self._wait_idle(timeout):
            for run in self._snapshot():
                run.halt("release")  # stops at the next denoising step and goes back to the queue
            self._wait_idle(max(5.0, self.settings.lease_seconds))

    def stop(self) -> None:
        """Hand back whatever is still held (their late writes are refused: the token is gone) and stop."""
        self._draining.set()
        self._stopping.set()
        for run in self._snapshot():
            run.halt("release")
            try:
                self.store.release(run.job.id, run.token)
            except Exception:
                log.exception("could not release job", extra={"job_id": run.job.id})
        for q in self._queues.values():
            q.put(None)
        self._wake.set()
        self.state = "stopped"

    def _snapshot(self) -> list[_Run]:
        with self._lock:
            return list(self._runs.values())

    def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._runs

    # ------------------------------------------------------------------------------ engine load / reload
    def _load(self, model: str | None, version: str | None = None) -> tuple[Engine, dict]:
        """Build an engine and compile every allowed shape: videos (sizes x frames) and one-frame images."""
        engine = self.factory(self.settings, model)
        check_engine(engine)
        d = engine.config.defaults
        sizes = sorted(set(self.settings.sizes or ((d.width, d.height),)))
        frames = sorted(set(self.settings.frames or (d.num_frames,)))
        shapes = list(dict.fromkeys([(w, h, f) for w, h in sizes for f in frames] + [(w, h, 1) for w, h in sizes]))
        t0 = time.perf_counter()
        for w, h, f in shapes:
            try:
                params = engine.user_params(prompt="warm-up", width=w, height=h, num_frames=f, seed=0)
            except ConfigError as e:
                raise ConfigError(f"allowed shape {w}x{h}x{f} (--sizes/--frames) rejected by the model: {e}") from e
            phases = engine.warmup(params, output_type=FRAMES)
            if phases:  # where a cold start's time went (compiles alone, side by side, runs)
                log.info("warmed up", extra={"worker": self.id, "shape": f"{w}x{h}x{f}",
                                             **{k: round(v, 3) for k, v in phases.items()}})
        warm_s = time.perf_counter() - t0
        cfg = engine.config
        info = {
            "name": cfg.name, "version": version or engine_version(engine), "model": model,
            "defaults": _as_dict(cfg.defaults), "limits": _as_dict(cfg.limits),
            "sizes": [list(s) for s in sizes], "frames": frames,
            "worker": self.id, "warmup_s": round(warm_s, 3), "updated_at": time.time(),
        }
        log.info("engine ready", extra={"worker": self.id, "model": cfg.name, "version": info["version"],
                                        "shapes": len(shapes), "warmup_s": round(warm_s, 3)})
        self.metrics.warmup.set(warm_s)
        return engine, info

    def _publish(self, engine: Engine, info: dict) -> None:
        with self._lock:
            self._engine, self.model_info = engine, info
        self.store.kv_set("model_info", info)
        self.metrics.model.info({"name": str(info["name"]), "version": str(info["version"])})

    def _check_reload(self) -> None:
        req = self.store.kv_get("reload")
        if not req or req["seq"] <= self._reload_seen:
            return
        if self._reload_thread and self._reload_thread.is_alive():
            return  # one at a time; the newer request is picked up when this one ends
        self._reload_seen = req["seq"]
        self._reload_thread = threading.Thread(target=self._reload, args=(req,), name="worker-reload", daemon=True)
        self._reload_thread.start()

    def _reload(self, req: dict) -> None:
        model = req.get("model") or self._model
        report = {"seq": req["seq"], "status": "loading", "model": model, "started_at": time.time()}
        self.store.kv_set(f"reload_status:{self.id}", report)
        log.info("reload started", extra={"worker": self.id, "seq": req["seq"], "model": model})
        try:
            engine, info = self._load(model, req.get("version"))
        except Exception as e:
            log.exception("reload failed; the old model keeps serving", extra={"worker": self.id})
            self.metrics.reloads.labels("failed").inc()
            if self._engine is None:
                self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            report.update(status="failed", error=f"{type(e).__name__}: {e}", finished_at=time.time())
        else:
            self._publish(engine, info)  # new leases use the new engine; running jobs keep theirs
            self._model = model
            if self.state in ("loading", "failed"):
                self.state, self.error = "ready", None
            self.metrics.reloads.labels("ok").inc()
            report.update(status="ok", version=info["version"], name=info["name"], finished_at=time.time())
        self.store.kv_set(f"reload_status:{self.id}", report)

    # ------------------------------------------------------------------------------ main loop (leasing)
    def _main(self) -> None:
        try:
            self.state = "loading"
            self._reload_seen = (self.store.kv_get("reload") or {}).get("seq", 0)
            engine, info = self._load(self._model)
            self._publish(engine, info)
            self.store.kv_set(f"reload_status:{self.id}", {"seq": self._reload_seen, "status": "ok", "note": "started",
                                                           "model": self._model, "version": info["version"]})
            self.state = "draining" if self._draining.is_set() else "ready"
            self.metrics.ready.set(1 if self.ready else 0)
        except Exception as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("engine failed to start", extra={"worker": self.id})
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= self._next_reload_check:
                    self._next_reload_check = time.monotonic() + RELOAD_POLL_S
                    self._check_reload()
                if self._engine is None or self._draining.is_set() or not self._can_lease():
                    job = None
                else:
                    job = self.store.lease(self.id, self.settings.lease_seconds)
            except Exception:
                log.exception("store error in the lease loop", extra={"worker": self.id})
                job = None
            if job is None:
                self._wake.wait(self.settings.poll_seconds)
                self._wake.clear()
                continue
            self._begin(job)

    def _can_lease(self) -> bool:
        runs = self._snapshot()
        if not runs:
            return True
        if not self.settings.overlap_stages or len(runs) >= 3:
            return False
        front = [r for r in runs if r.stage in FRONT_STAGES]
        if not front:
            return True  # only decode/save in flight: start the next job's encode + denoise beside it
        return len(front) == 1 and front[0].stage == "denoise" and front[0].fraction >= self.settings.prefetch_at

    def _begin(self, job: S.Job) -> None:
        with self._lock:
            run = _Run(job=job, engine=self._engine, version=self.model_info["version"])
            self._runs[job.id] = run
        self.metrics.running.set(len(self._runs))
        self.metrics.queue_wait.observe(max(0.0, time.time() - job.created_at))
        log.info("job leased", extra={"job_id": job.id, "worker": self.id, "attempt": job.attempts})
        self._queues["encode"].put(run)

    def _end(self, run: _Run) -> None:
        with self._lock:
            self._runs.pop(run.job.id, None)
        self.metrics.running.set(len(self._runs))
        self._wake.set()

    # ------------------------------------------------------------------------------ heartbeat / reaper
    def _heartbeat(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_interval):
            for run in self._snapshot():
                try:
                    job = self.store.heartbeat(run.job.id, run.token, self.settings.lease_seconds)
                except Exception:
                    log.exception("heartbeat failed", extra={"job_id": run.job.id})
                    continue
                if job is None:
                    run.halt("lost")
                elif job.cancel_requested:
                    run.halt("cancel")
            try:
                self.store.worker_seen(self.id, self.status())
                for job_id in self.store.reap(self.settings.max_attempts):
                    self.metrics.requeued.inc()
                    log.warning("lease expired; job requeued", extra={"job_id": job_id, "worker": self.id})
                ttl = self.settings.result_ttl_s
                if ttl > 0 and time.monotonic() >= self._next_purge:
                    self._next_purge = time.monotonic() + min(PURGE_EVERY_S, ttl / 4)
                    for job_id in self.store.purge(time.time() - ttl):
                        log.info("ended job purged (--result-ttl)", extra={"job_id": job_id})
            except Exception:
                log.exception("store error in heartbeat", extra={"worker": self.id})

    # ------------------------------------------------------------------------------ stages
    def _stage_loop(self, name: str, fn) -> None:
        q = self._queues[name]
        while (run := q.get()) is not None:
            try:
                if run.stop.is_set():
                    raise _Stopped()
                fn(run)
            except BaseException as e:  # noqa: B036 -- every outcome must end the run in the store
                self._abort(run, e)

    def _set_stage(self, run: _Run, stage: str, **fields) -> None:
        run.stage = stage
        if not self.store.progress(run.job.id, run.token, stage=stage, **fields):
            run.halt("lost")
            raise _Stopped()

    def _should_stop(self, run: _Run) -> bool:
        now = time.monotonic()
        if not run.stop.is_set() and now - run.last_poll >= CANCEL_POLL_S:
            run.last_poll = now
            try:
                job = self.store.get(run.job.id)
            except Exception:
                job = run.job  # store hiccup: keep going, the heartbeat will tell
            if job is None or job.lease_token != run.token:
                run.halt("lost")
            elif job.cancel_requested:
                run.halt("cancel")
        return run.stop.is_set()

    def _encode(self, run: _Run) -> None:
        kw = {k: v for k, v in run.job.params.items() if k != "fps"}
        run.params = run.engine.user_params(**kw)  # the engine re-validates (it may be newer than the API's)
        self._set_stage(run, "encode", progress=1, steps_total=run.params.num_inference_steps)
        t = time.perf_counter()
        run.text = run.engine.encode_text(run.params)
        _block(run.text)
        self._timed(run, "encode", t)
        run.stage = "wait_denoise"
        self._queues["denoise"].put(run)

    def _denoise(self, run: _Run) -> None:
        self._set_stage(run, "denoise")
        last = [time.perf_counter()]

        def on_step(done: int, total: int) -> None:
            now = time.perf_counter()
            self.metrics.step.observe(now - last[0])
            last[0] = now
            run.fraction = done / max(total, 1)
            if now - run.last_write >= PROGRESS_WRITE_S or done >= total:
                run.last_write = now
                if not self.store.progress(run.job.id, run.token, steps_done=done, steps_total=total,
                                           progress=2 + int(88 * run.fraction)):
                    run.halt("lost")
            self._wake.set()  # the lease loop may prefetch the next job now

        t = time.perf_counter()
        stats = {}
        run.latents = run.engine.denoise(run.params, run.text, on_step=on_step,
                                         should_stop=lambda: self._should_stop(run), stats=stats)
        done = stats.get("steps_computed", 0) + stats.get("steps_skipped", 0)
        run.cache_skip_ratio = stats["steps_skipped"] / done if done else None
        _block(run.latents)
        run.text = None
        self._timed(run, "denoise", t)
        run.stage = "wait_decode"
        self._wake.set()
        self._queues["decode"].put(run)

    def _decode(self, run: _Run) -> None:
        job = run.job
        self._set_stage(run, "decode", progress=91)
        t = time.perf_counter()
        frames = run.engine.decode(run.latents, output_type=FRAMES)
        skip = run.cache_skip_ratio
        run.latents = None
        self._timed(run, "decode", t)
        if run.stop.is_set():
            raise _Stopped()
        self._set_stage(run, "save", progress=96)
        t = time.perf_counter()
        p = run.params
        metadata = {"job_id": job.id, "model": job.model, "weights_version": run.version, "prompt": p.prompt,
                    "negative_prompt": p.negative_prompt, "seed": p.seed, "steps": p.num_inference_steps,
                    "guidance_scale": p.guidance_scale, "size": f"{p.width}x{p.height}", "frames": p.num_frames}
        path = write_artefact(frames, self._tmp / f"{job.id}.{run.token}", job.params["fps"], metadata)
        data = path.read_bytes()
        self._timed(run, "save", t)
        result = {"content_type": "image/png" if path.suffix == ".png" else "video/mp4",
                  "filename": f"{job.id}{path.suffix}", "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "num_frames": int(len(frames))}
        if skip is not None:
            result["cache_skip_ratio"] = float(skip)
            self.metrics.cache_skip.observe(float(skip))
        run.timings["run_s"] = round(time.time() - (job.started_at or job.created_at), 4)
        try:
            new = self.store.complete(job.id, run.token, path, result, timings=run.timings,
                                      steps_done=p.num_inference_steps, weights_version=run.version)
        finally:
            path.unlink(missing_ok=True)
        if new is None:
            log.warning("lease lost before the result was stored; result discarded",
                        extra={"job_id": job.id, "worker": self.id})
        else:
            self._finished(run, new)
        self._end(run)

    def _timed(self, run: _Run, stage: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        run.timings[f"{stage}_s"] = round(dt, 4)
        self.metrics.stage.labels(stage).observe(dt)

    # ------------------------------------------------------------------------------ endings
    def _finished(self, run: _Run, job: S.Job) -> None:
        self.metrics.finished.labels(job.kind, job.status).inc()
        if job.status == S.COMPLETED:
            self.metrics.latency.labels(job.kind).observe(job.finished_at - job.created_at)
        elif job.status == S.FAILED:
            self.metrics.failures.labels((job.error or {}).get("code", "unknown")).inc()
        log.info(f"job {job.status}", extra={"job_id": job.id, "worker": self.id, "timings": job.timings})

    def _abort(self, run: _Run, exc: BaseException) -> None:
        job, store = run.job, self.store
        try:
            if run.stop.is_set():  # halted: whatever the engine raised (its Cancelled or anything) is the stop
                if run.reason == "cancel":
                    new = store.finish(job.id, run.token, S.CANCELLED, timings=run.timings)
                elif run.reason == "release":
                    new = store.release(job.id, run.token)
                    log.info("job handed back to the queue", extra={"job_id": job.id, "worker": self.id})
                else:  # lost: another worker owns it now
                    new = None
                    log.warning("lease lost; job abandoned", extra={"job_id": job.id, "worker": self.id})
            else:
                code = "invalid_request" if isinstance(exc, ConfigError) else "engine_error"
                if code == "engine_error":
                    log.error("job failed", exc_info=exc, extra={"job_id": job.id, "worker": self.id})
                err = {"code": code, "message": f"{type(exc).__name__}: {exc}"[:2000]}
                new = store.finish(job.id, run.token, S.FAILED, error=err, timings=run.timings)
            if new is not None and new.terminal:
                self._finished(run, new)
        except Exception:
            log.exception("could not record the end of a job", extra={"job_id": job.id})
        finally:
            run.params = run.text = run.latents = None
            self._end(run)
