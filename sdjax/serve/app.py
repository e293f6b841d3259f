"""The HTTP layer: thin routes over the `Service` (store + worker) injected by `create_app`.

Routes: /v1/videos (jobs), /v1/images/generations (synchronous PNG), /v1/models, /admin/* (admin key),
/healthz and /readyz (no auth), /metrics (any key). Errors use OpenAI's envelope.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import sqlite3
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import redis
from fastapi import Depends, FastAPI, Header, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdjax.serve import schemas as M
from sdjax.serve.engine import resolve_factory
from sdjax.serve.metrics import Metrics
from sdjax.serve.scheduler import Worker
from sdjax.serve.service import ApiError, Service
from sdjax.serve.store import open_store

_bearer = HTTPBearer(auto_error=False, description="API key (admin routes: admin key)")
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 10.0


def _errors(*codes: int) -> dict:
    return {c: {"model": M.ErrorResponse} for c in codes}


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 (read up front: our bodies are small JSON)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_bytes:
                err = ApiError(413, f"request body is over {self.max_bytes} bytes", param="body", code="too_large")
                return await JSONResponse(err.body(), status_code=413)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _match(given: str, keys: dict) -> str | None:
    """Constant-time lookup of a bearer secret; returns its tenant/name."""
    found = None
    for secret, name in keys.items():
        if hmac.compare_digest(secret.encode(), given.encode()):
            found = name
    return found


def create_app(settings, engine_factory=None, store=None) -> FastAPI:
    """The service app. `engine_factory(settings, model) -> Engine` (default: `--engine` or the pipeline);
    `store` defaults to the backend in settings."""
    metrics = Metrics()
    store = store or open_store(settings)
    worker = None
    if settings.runs_worker:
        worker = Worker(settings, store, engine_factory or resolve_factory(settings.engine), metrics)
    service = Service(settings, store, worker, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker is not None:
            worker.start()
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(title="sdjax", version="0.1.0", lifespan=lifespan,
                  description="Text-to-video and text-to-image diffusion jobs (OpenAI-style, with extensions).")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    # ------------------------------------------------------------------------------ auth
    def unauthorized(message: str) -> ApiError:
        return ApiError(401, message, type="authentication_error", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    def tenant(creds: Creds) -> str:
        if not settings.api_keys:
            return "default"
        if creds is None:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        name = _match(creds.credentials, settings.api_keys)
        if name is None:
            raise unauthorized("invalid API key")
        return name

    def admin(creds: Creds) -> str:
        if creds is None:
            raise unauthorized("missing admin key: send 'Authorization: Bearer <admin key>'")
        name = _match(creds.credentials, settings.admin_keys)
        if name is not None:
            return name
        if not settings.admin_keys or _match(creds.credentials, settings.api_keys) is not None:
            reason = "admin routes are disabled (no --admin-key)" if not settings.admin_keys else \
                "this API key may not use admin routes"
            raise ApiError(403, reason, type="permission_error", code="forbidden")
        raise unauthorized("invalid admin key")

    def any_key(creds: Creds) -> None:
        if not settings.api_keys and not settings.admin_keys:
            return
        if creds is None or (_match(creds.credentials, settings.api_keys) is None
                             and _match(creds.credentials, settings.admin_keys) is None):
            raise unauthorized("missing or invalid key")

    # ------------------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        err = ApiError(422, f"{param or 'request'}: {first.get('msg')}", param=param, code="invalid_value")
        body = err.body()
        body["detail"] = json.loads(json.dumps(errs, default=str))
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req, e: StarletteHTTPException):
        err = ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    async def store_down(_req, e: Exception):
        err = ApiError(503, f"job store unavailable ({type(e).__name__})", type="server_error",
                       code="store_unavailable")
        return JSONResponse(err.body(), status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    app.add_exception_handler(redis.exceptions.ConnectionError, store_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, store_down)
    app.add_exception_handler(sqlite3.OperationalError, store_down)

    # ------------------------------------------------------------------------------ probes and ops
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        """Alive: the process and its event loop answer (never touches the engine)."""
        return {"status": "alive", "role": settings.role}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "not ready (warming up, draining)"}})
    def readyz():
        """Ready only after the warm-up compile of every allowed shape, and not while draining."""
        ok, reason = service.readiness()
        metrics.ready.set(1 if ok else 0)
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(any_key)], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                        **_errors(401)})
    def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/admin/status", tags=["admin"], dependencies=[Depends(admin)], responses=_errors(401, 403))
    def admin_status() -> dict:
        return {"role": settings.role, "draining": service.draining, "queue_depth": store.queue_depth(),
                "worker": worker.status() if worker else None, "model": service.model_info(),
                "workers": store.workers(within_s=3 * settings.heartbeat_interval + 5)}

    @app.post("/admin/reload", tags=["admin"], dependencies=[Depends(admin)], response_model=M.ReloadStatus,
              responses={202: {"model": M.ReloadStatus}, **_errors(401, 403, 422)})
    async def reload(body: M.ReloadRequest | None = None, wait: bool = Query(False),
                     timeout: float = Query(600.0, gt=0, le=3600)):
        """Load a new model/weights beside the old one on every worker, warm it, swap between jobs.
        On failure the old model keeps serving and the error is reported (422 with `wait=true`)."""
        body = body or M.ReloadRequest()
        seq = await run_in_threadpool(service.request_reload, body.model, body.version)
        status = await service.wait_reload(seq, timeout) if wait else await run_in_threadpool(
            service.reload_status, seq)
        code = {"ok": 200, "failed": 422, "pending": 202}[status["status"]]
        return JSONResponse(status, status_code=code)

    @app.get("/admin/reload", tags=["admin"], dependencies=[Depends(admin)], response_model=M.ReloadStatus,
             responses=_errors(401, 403))
    def reload_status() -> dict:
        return service.reload_status()

    if not settings.serves_api:
        return app

    # ------------------------------------------------------------------------------ models
    @app.get("/v1/models", tags=["models"], response_model=M.ModelList, responses=_errors(401, 503))
    def models(_t: str = Depends(tenant)) -> dict:
        return {"object": "list", "data": service.model_cards()}

    # ------------------------------------------------------------------------------ videos
    job_errors = _errors(401, 404)

    @app.post("/v1/videos", tags=["videos"], response_model=M.Video,
              responses=_errors(401, 409, 413, 422, 429, 503))
    def create_video(req: M.VideoCreate, response: Response, t: str = Depends(tenant),
                     idempotency_key: str | None = Header(None, max_length=256)) -> dict:
        """Queue a video job. The same Idempotency-Key (and body) returns the same job."""
        job, created = service.submit(req, "video", t, idempotency_key)
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        response.headers["openai-poll-after-ms"] = "1000"
        return service.video_view(job)

    @app.get("/v1/videos", tags=["videos"], response_model=M.VideoList, responses=_errors(401))
    def list_videos(t: str = Depends(tenant), limit: int = Query(20, ge=1, le=100),
                    after: str | None = Query(None, max_length=64),
                    order: Literal["asc", "desc"] = Query("desc")) -> dict:
        jobs, more = store.list(t, "video", limit=limit, after=after, descending=order == "desc")
        data = [service.video_view(j) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get("/v1/videos/{video_id}", tags=["videos"], response_model=M.Video, responses=job_errors)
    def get_video(video_id: str, t: str = Depends(tenant)) -> dict:
        return service.video_view(service.get(video_id, t, "video"))

    @app.get("/v1/videos/{video_id}/content", tags=["videos"], response_class=FileResponse,
             responses={200: {"content": {"video/mp4": {}}, "description": "the MP4 (Range requests work)"},
                        206: {"description": "partial content"}, 416: {"description": "range not satisfiable"},
                        **_errors(401, 404, 409)})
    def video_content(video_id: str, t: str = Depends(tenant), variant: Literal["video"] = Query("video")):
        job = service.get(video_id, t, "video")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}; content exists once it is completed",
                           code="not_completed")
        path = store.result_path(job)
        if path is None:
            raise ApiError(404, f"the content of {video_id} is gone", code="content_missing")
        return FileResponse(path, media_type=job.result["content_type"], filename=job.result["filename"],
                            headers={"Cache-Control": "private, max-age=86400, immutable"})

    @app.get("/v1/videos/{video_id}/events", tags=["videos"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "progress events until the "
                              "job ends (event: progress | completed | failed | cancelled)"}, **job_errors})
    async def video_events(video_id: str, t: str = Depends(tenant)):
        await run_in_threadpool(service.get, video_id, t, "video")

        async def stream():
            last, beat = None, time.monotonic()
            while not service.stopping:
                job = await run_in_threadpool(store.get, video_id)
                view = await run_in_threadpool(service.video_view, job)
                key = (view["status"], view["progress"], view["stage"], view["steps_done"], view["queue_position"])
                if key != last:
                    last, beat = key, time.monotonic()
                    event = view["status"] if job.terminal else "progress"
                    yield f"event: {event}\ndata: {json.dumps(view)}\n\n"
                if job.terminal:
                    return
                if time.monotonic() - beat > SSE_KEEPALIVE_S:  # keeps proxies from closing a quiet stream
                    beat = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.delete("/v1/videos/{video_id}", tags=["videos"], response_model=M.Video, responses=job_errors)
    def delete_video(video_id: str, t: str = Depends(tenant)) -> dict:
        """Cancel: a queued job ends at once; a running one stops at its next denoising step."""
        return service.video_view(service.cancel(video_id, t, "video"))

    @app.post("/v1/videos/{video_id}/cancel", tags=["videos"], response_model=M.Video, responses=job_errors)
    def cancel_video(video_id: str, t: str = Depends(tenant)) -> dict:
        return service.video_view(service.cancel(video_id, t, "video"))

    # ------------------------------------------------------------------------------ images
    @app.post("/v1/images/generations", tags=["images"], response_model=M.ImageResponse,
              responses=_errors(401, 409, 413, 422, 429, 500, 503, 504))
    async def create_image(req: M.ImageCreate, t: str = Depends(tenant),
                           idempotency_key: str | None = Header(None, max_length=256)) -> dict:
        """Synchronous image (one frame through the same queue): PNG as base64."""
        job, _ = await run_in_threadpool(service.submit, req, "image", t, idempotency_key)
        job = await service.wait(job.id, settings.image_timeout_s)
        if job.status != "completed":
            err = job.error or {"code": job.status, "message": f"the image job was {job.status}"}
            status = 422 if err["code"] == "invalid_request" else 409 if job.status == "cancelled" else 500
            raise ApiError(status, err["message"], type="server_error" if status == 500 else "invalid_request_error",
                           code=err["code"])
        path = await run_in_threadpool(store.result_path, job)
        if path is None:
            raise ApiError(500, "the image result is missing", type="server_error", code="content_missing")
        data = base64.b64encode(await run_in_threadpool(path.read_bytes)).decode()
        p = job.params
        return {"id": job.id, "created": int(job.created_at), "output_format": "png", "timings": job.timings,
                "size": f"{p['width']}x{p['height']}", "data": [{"b64_json": data, "seed": p["seed"]}]}

    return app
