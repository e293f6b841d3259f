"""What the routes call: request -> validated job, job -> API view, readiness, drain and reload bookkeeping.

The API tier validates against the model info the workers publish to the store (defaults, limits and the
shapes they compiled), so a stateless API process needs no engine; the worker re-validates with its engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time

from starlette.concurrency import run_in_threadpool

from sdjax.config import ConfigError, ModelConfig, ModelDefaults, ModelLimits, UserParams
from sdjax.serve import store as S

log = logging.getLogger("sdjax.serve.api")


class ApiError(Exception):
    """An error answered with OpenAI's envelope: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(422, message, param=param, code="invalid_value")


def _config_error(e: ConfigError) -> ApiError:
    m = re.match(r"([A-Za-z_][A-Za-z0-9_.]*)=", str(e))
    return invalid(m.group(1) if m else None, str(e))


def model_config_from_info(info: dict) -> ModelConfig:
    return ModelConfig(name=info["name"], transformer={}, vae={}, text_encoder={},
                       defaults=ModelDefaults(**info["defaults"]), limits=ModelLimits(**info["limits"]))


def _ts(t: float | None) -> int | None:
    return int(t) if t is not None else None


class Service:
    def __init__(self, settings, store: S.JobStore, worker, metrics):
        self.settings, self.store, self.worker, self.metrics = settings, store, worker, metrics
        self.draining = False
        self.stopping = False
        self._info: tuple[float, dict | None] = (0.0, None)
        metrics.queue_depth.set_function(self._depth_or_nan)

    def _depth_or_nan(self) -> float:
        try:
            return float(self.store.queue_depth())
        except Exception:
            return float("nan")

    # ------------------------------------------------------------------------------ model info
    def model_info(self) -> dict | None:
        """What the API validates against: this process's engine, else what the workers last published."""
        if self.worker is not None:
            return self.worker.model_info
        stamp, info = self._info
        if time.monotonic() - stamp > 1.0:
            info = self.store.kv_get("model_info")
            self._info = (time.monotonic(), info)
        return info

    def require_model(self) -> dict:
        info = self.model_info()
        if info is None:
            raise ApiError(503, "no model is ready yet (no worker has finished its warm-up)", type="server_error",
                           code="not_ready", headers={"Retry-After": str(self.settings.retry_after_s)})
        return info

    def max_steps(self, info: dict) -> int:
        cap = info["limits"]["max_steps"]
        return min(cap, self.settings.max_steps) if self.settings.max_steps else cap

    # ------------------------------------------------------------------------------ requests -> jobs
    def resolve(self, req, kind: str) -> tuple[dict, dict]:
        """Request -> (resolved user params + fps, model info). Raises ApiError(422) naming the field."""
        info = self.require_model()
        d = info["defaults"]
        if req.model is not None and req.model != info["name"]:
            raise invalid("model", f"model {req.model!r} is not served here; this server serves {info['name']!r}")
        for name in ("prompt", "negative_prompt"):
            text = getattr(req, name)
            if text is not None and len(text) > self.settings.max_prompt_chars:
                raise invalid(name, f"{name} has {len(text)} characters; at most {self.settings.max_prompt_chars}")
        sizes = [tuple(s) for s in info["sizes"]]
        allowed_sizes = ", ".join(f"{w}x{h}" for w, h in sizes)
        if req.size is not None:
            w, h = (int(v) for v in req.size.split("x"))
            for name, v, given in (("width", w, req.width), ("height", h, req.height)):
                if given is not None and given != v:
                    raise invalid(name, f"{name}={given} contradicts size={req.size!r}")
            param = "size"
        else:  # the model's default size when the operator allows it, else the first allowed size
            dw, dh = (d["width"], d["height"]) if (d["width"], d["height"]) in sizes else sizes[0]
            w, h = req.width or dw, req.height or dh
            param = "width" if req.width is not None else "height" if req.height is not None else "size"
        if (w, h) not in sizes:
            given = f"{param}={w if param == 'width' else h} makes " if param in ("width", "height") else ""
            raise invalid(param, f"{given}size {w}x{h}, which is not allowed; allowed: {allowed_sizes}")
        fps = req.fps if getattr(req, "fps", None) is not None else d["fps"]
        frames = self._frames(req, info, fps) if kind == "video" else 1
        steps = req.num_inference_steps
        if steps is None and d["num_inference_steps"] > self.max_steps(info):
            steps = self.max_steps(info)  # the operator's cap is below the model's default
        if steps is not None and steps > self.max_steps(info):
            raise invalid("num_inference_steps", f"num_inference_steps={steps} is not allowed: an integer in "
                                                  f"[1, {self.max_steps(info)}]")
        try:
            params = UserParams.for_model(
                model_config_from_info(info), prompt=req.prompt, seed=req.seed,
                cache=req.cache.model_dump(exclude_none=True) if req.cache else None,
                negative_prompt=req.negative_prompt, num_inference_steps=steps, guidance_scale=req.guidance_scale,
                height=h, width=w, num_frames=frames, flow_shift=req.flow_shift, solver=req.solver)
        except ConfigError as e:
            raise _config_error(e) from None
        return {**dataclasses.asdict(params), "fps": fps}, info

    @staticmethod
    def _frames(req, info: dict, fps: int) -> int:
        allowed = info["frames"]
        if req.num_frames is not None:
            if req.num_frames not in allowed:
                raise invalid("num_frames", f"num_frames={req.num_frames} is not allowed; allowed: {allowed}")
            return req.num_frames
        if req.seconds is not None:  # seconds are approximate by nature: the nearest allowed length
            return min(allowed, key=lambda f: (abs(f - req.seconds * fps), f))
        default = info["defaults"]["num_frames"]
        return default if default in allowed else allowed[0]

    def submit(self, req, kind: str, tenant: str, idempotency_key: str | None) -> tuple[S.Job, bool]:
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise ApiError(503, "the server is draining; retry on another replica", type="server_error",
                           code="draining", headers={"Retry-After": str(self.settings.retry_after_s)})
        if idempotency_key is not None and not (1 <= len(idempotency_key) <= 256):
            raise invalid("Idempotency-Key", "Idempotency-Key must have 1 to 256 characters")
        try:
            params, info = self.resolve(req, kind)
        except ApiError as e:
            if e.status == 422:
                self.metrics.rejected.labels("invalid").inc()
            raise
        job = S.Job(id=S.new_job_id(kind), kind=kind, tenant=tenant, params=params, model=info["name"],
                    created_at=time.time(), idempotency_key=idempotency_key)
        try:
            job, created = self.store.create(job, limit=self.settings.queue_limit,
                                             idem_hash=S.body_hash({"kind": kind, **req.model_dump()}))
        except S.QueueFull as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except S.IdempotencyConflict:
            raise ApiError(409, "this Idempotency-Key was used with a different request body",
                           param="Idempotency-Key", code="idempotency_conflict") from None
        if created:
            self.metrics.submitted.labels(kind).inc()
            log.info("job created", extra={"job_id": job.id, "tenant": tenant, "kind": kind})
        return job, created

    def get(self, job_id: str, tenant: str, kind: str) -> S.Job:
        job = self.store.get(job_id)
        if job is None or job.tenant != tenant or job.kind != kind:  # other tenants' jobs do not exist for you
            raise ApiError(404, f"no {kind} with id {job_id!r}", param="video_id", code="not_found")
        return job

    def cancel(self, job_id: str, tenant: str, kind: str) -> S.Job:
        self.get(job_id, tenant, kind)
        job = self.store.cancel(job_id)
        if self.worker is not None:
            self.worker.notify_cancel(job_id)
        log.info("cancel requested", extra={"job_id": job_id, "status": job.status})
        return job

    async def wait(self, job_id: str, timeout: float) -> S.Job:
        deadline = time.monotonic() + timeout
        while True:
            job = await run_in_threadpool(self.store.get, job_id)
            if job.terminal:
                return job
            if time.monotonic() > deadline or self.stopping:
                raise ApiError(504, f"job {job_id} did not finish within {timeout:.0f} s; it keeps running",
                               type="server_error", code="timeout")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------------------ views
    def video_view(self, job: S.Job) -> dict:
        p, ttl = job.params, self.settings.result_ttl_s
        result = {k: v for k, v in (job.result or {}).items() if k != "filename"} or None
        return {
            "id": job.id, "object": "video", "status": job.status, "progress": job.progress, "stage": job.stage,
            "created_at": _ts(job.created_at), "started_at": _ts(job.started_at),
            "completed_at": _ts(job.finished_at), "model": job.model, "weights_version": job.weights_version,
            "prompt": p["prompt"], "negative_prompt": p["negative_prompt"], "seed": p["seed"],
            "size": f"{p['width']}x{p['height']}", "width": p["width"], "height": p["height"],
            "num_frames": p["num_frames"], "fps": p["fps"], "seconds": round(p["num_frames"] / p["fps"], 3),
            "num_inference_steps": p["num_inference_steps"], "guidance_scale": p["guidance_scale"],
            "cache": p["cache"], "steps_done": job.steps_done, "steps_total": job.steps_total,
            "queue_position": self.store.queue_position(job), "attempts": job.attempts,
            "cancel_requested": job.cancel_requested, "timings": job.timings, "result": result, "error": job.error,
            "expires_at": _ts(job.finished_at + ttl) if ttl and job.terminal else None,
        }

    def model_cards(self) -> list[dict]:
        info = self.require_model()
        return [{"id": info["name"], "object": "model", "created": _ts(info["updated_at"]), "owned_by": "sdjax",
                 "version": str(info["version"]), "sizes": [f"{w}x{h}" for w, h in info["sizes"]],
                 "frames": info["frames"], "fps": info["defaults"]["fps"], "max_steps": self.max_steps(info),
                 "defaults": info["defaults"]}]

    # ------------------------------------------------------------------------------ probes, drain
    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.worker is not None and not self.worker.ready:
            return False, f"worker {self.worker.state}" + (f": {self.worker.error}" if self.worker.error else "")
        try:
            self.store.ping()
        except Exception as e:
            return False, f"job store unavailable: {type(e).__name__}"
        if self.worker is None and self.model_info() is None:
            return False, "no worker has published a model yet"
        return True, "ready"

    def drain(self, timeout: float) -> None:
        """SIGTERM: readiness false, no new jobs, running jobs finish (up to timeout) or go back to the queue."""
        log.info("drain started", extra={"timeout_s": timeout})
        self.draining = True
        self.metrics.ready.set(0)
        if self.worker is not None:
            self.worker.drain(timeout)
        self.stopping = True
        log.info("drain finished")

    def close(self) -> None:
        self.stopping = True
        if self.worker is not None:
            self.worker.stop()
        self.store.close()

    # ------------------------------------------------------------------------------ reload
    def request_reload(self, model: str | None, version: str | None) -> int:
        seq = self.store.kv_incr("reload_seq")
        self.store.kv_set("reload", {"seq": seq, "model": model, "version": version, "requested_at": time.time()})
        log.info("reload requested", extra={"seq": seq, "model": model, "version": version})
        if self.worker is not None:
            self.worker.poke_reload()
        return seq

    def reload_status(self, seq: int | None = None) -> dict:
        if seq is None:
            seq = (self.store.kv_get("reload") or {}).get("seq", 0)
        live = self.store.workers(within_s=3 * self.settings.heartbeat_interval + 5)
        if self.worker is not None:
            live.setdefault(self.worker.id, {})
        reports = {w: self.store.kv_get(f"reload_status:{w}") or {"seq": 0, "status": "pending"} for w in live}
        mine = {w: r for w, r in reports.items() if r.get("seq", 0) >= seq}
        failed = [f"{w}: {r.get('error')}" for w, r in mine.items() if r.get("status") == "failed"]
        if failed:
            status = "failed"
        elif live and len(mine) == len(live) and all(r.get("status") == "ok" for r in mine.values()):
            status = "ok"
        else:
            status = "pending"
        return {"seq": seq, "status": status, "workers": reports, "error": "; ".join(failed) or None}

    async def wait_reload(self, seq: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = await run_in_threadpool(self.reload_status, seq)
            if status["status"] != "pending" or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.1)
