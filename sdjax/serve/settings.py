"""Launch args (system params of the service) -> one frozen `Settings`.

Everything the process is told at start-up lives here; nothing else reads argv or the environment.
Secrets (API keys) may come from the environment so that they do not show in `ps`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sdjax.config import ATTENTION_BACKEND_HELP, RESIDUAL_DTYPE_HELP

ROLES = ("both", "api", "worker")
BACKENDS = ("sqlite", "redis")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 832x480)") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return w, h


def _csv(conv):
    def parse(text: str):
        return tuple(conv(v.strip()) for v in text.split(",") if v.strip())

    return parse


def parse_keys(entries: list[str]) -> dict[str, str]:
    """`[NAME:]SECRET` entries -> {secret: tenant}. A bare secret gets a tenant derived from its hash."""
    keys = {}
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
        if not secret:
            raise ValueError(f"API key entry {entry!r} has an empty secret")
        keys[secret] = name
    return keys


@dataclass(frozen=True)
class Settings:
    """System params of one service process (frozen after start)."""

    # model / engine (system params of the pipeline)
    model: str | None = None  # model dir or built-in name; None = the embedded default model
    dtype: str | None = None  # None: the model's usual dtype (float32 for the embedded demo, else bfloat16)
    residual_dtype: str | None = None  # None: the DiT's residual stream in `dtype`
    attention_backend: str = "auto"
    cfg_parallel: int = 1
    ulysses: int = 1
    ring: int = 1
    shard_weights: bool = False
    multihost: bool = False  # jax.distributed is up: process 0 serves, the others follow (serve/multihost.py)
    compile_cache_dir: str | None = None
    engine: str | None = None  # "module:callable" engine factory hook (tests, custom engines)
    # network / roles
    host: str = "127.0.0.1"
    port: int = 8000
    role: str = "both"
    backend: str = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "sdjax"
    data_dir: str = "sdjax-data"
    worker_id: str = ""
    # security
    api_keys: dict = field(default_factory=dict)  # secret -> tenant; empty = auth disabled
    admin_keys: dict = field(default_factory=dict)  # secret -> name; empty = admin routes disabled
    # limits
    queue_limit: int = 64
    sizes: tuple = ()  # allowed (width, height); () = the model's default size
    frames: tuple = ()  # allowed video frame counts; () = the model's default
    max_steps: int | None = None  # cap below the model's limit
    max_prompt_chars: int = 4000
    max_body_bytes: int = 64 * 1024
    retry_after_s: int = 10
    # scheduling / durability
    overlap_stages: bool = True
    prefetch_at: float = 0.9  # lease the next job when the current denoise is this far along
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 0.0  # 0 = lease_seconds / 4
    poll_seconds: float = 0.2
    max_attempts: int = 3
    drain_timeout_s: float = 600.0
    image_timeout_s: float = 300.0
    result_ttl_s: float = 0.0  # delete ended jobs and their results this long after they end; 0 = keep
    # logging
    log_level: str = "info"
    log_format: str = "json"

    @property
    def serves_api(self) -> bool:
        return self.role in ("both", "api")

    @property
    def runs_worker(self) -> bool:
        return self.role in ("both", "worker")

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 4

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def system_config(self):
        """The pipeline's `SystemConfig` (imports the kernels, so only workers call it)."""
        from sdjax.config import SystemConfig

        return SystemConfig(
            dtype=self.dtype or "bfloat16", residual_dtype=self.residual_dtype,
            attention_backend=self.attention_backend, cfg_parallel=self.cfg_parallel,
            ulysses=self.ulysses, ring=self.ring, shard_weights=self.shard_weights,
            compile_cache_dir=self.compile_cache_dir or str(Path(self.data_dir) / "compile-cache"), weights=self.model,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdjax.serve", description="sdjax video/image generation service")
    g = p.add_argument_group("model (system params)")
    g.add_argument("--model", default=None, help="model dir (or built-in name); default: the embedded demo model")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="default: float32 for the embedded demo model, bfloat16 otherwise")
    g.add_argument("--residual-dtype", default=None, choices=("float32", "bfloat16"), help=RESIDUAL_DTYPE_HELP)
    g.add_argument("--attention-backend", default="auto",
                   help=ATTENTION_BACKEND_HELP)
    g.add_argument("--compile-cache-dir", default=None,
                   help="JAX persistent compilation cache (default: DATA_DIR/compile-cache)")
    g.add_argument("--engine", default=os.environ.get("SDJAX_ENGINE"),
                   help="engine factory 'module:callable' (default: sdjax.pipeline.Pipeline); env SDJAX_ENGINE")
    from sdjax.sharding.launch import add_args as add_layout_args

    add_layout_args(p)  # --cfg-parallel / --ulysses / --ring / --shard-weights and the multi-host flags
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--role", default="both", choices=ROLES, help="api, worker or both in one process")
    g.add_argument("--backend", default="sqlite", choices=BACKENDS, help="job store: embedded sqlite or redis")
    g.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    g.add_argument("--redis-prefix", default="sdjax")
    g.add_argument("--data-dir", default="sdjax-data", help="job store, results and caches")
    g.add_argument("--worker-id", default="", help="stable worker name (default: host-pid-random)")
    g.add_argument("--api-key", action="append", default=[],
                   help="[NAME:]SECRET, repeatable; also env SDJAX_API_KEYS (comma separated). None = no auth")
    g.add_argument("--admin-key", action="append", default=[],
                   help="[NAME:]SECRET for /admin routes; also env SDJAX_ADMIN_KEYS. None = admin routes off")
    g = p.add_argument_group("limits")
    g.add_argument("--queue-limit", type=int, default=64, help="max queued jobs; beyond -> 429")
    g.add_argument("--sizes", type=_csv(_parse_size), default=(), help="allowed WxH list (default: model's)")
    g.add_argument("--frames", type=_csv(int), default=(), help="allowed video frame counts (default: model's)")
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--max-prompt-chars", type=int, default=4000)
    g.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    g.add_argument("--retry-after", dest="retry_after_s", type=int, default=10)
    g = p.add_argument_group("scheduling and durability")
    g.add_argument("--no-overlap", dest="overlap_stages", action="store_false",
                   help="run one job's stages at a time (no encode/decode overlap with another's denoise)")
    g.add_argument("--prefetch-at", type=float, default=0.9)
    g.add_argument("--lease-seconds", type=float, default=30.0)
    g.add_argument("--heartbeat-seconds", type=float, default=0.0)
    g.add_argument("--poll-seconds", type=float, default=0.2)
    g.add_argument("--max-attempts", type=int, default=3)
    g.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, default=600.0,
                   help="on SIGTERM, wait this long for running jobs, then hand them back to the queue")
    g.add_argument("--image-timeout", dest="image_timeout_s", type=float, default=300.0)
    g.add_argument("--result-ttl", dest="result_ttl_s", type=float, default=0.0,
                   help="seconds after a job ends until it and its result are deleted (0 = keep them)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", default="json", choices=("json", "text"))
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = build_parser()
    a = parser.parse_args(argv)
    env_keys = [k for k in os.environ.get("SDJAX_API_KEYS", "").split(",") if k.strip()]
    env_admin = [k for k in os.environ.get("SDJAX_ADMIN_KEYS", "").split(",") if k.strip()]
    try:
        api_keys = parse_keys(a.api_key + env_keys)
        admin_keys = parse_keys(a.admin_key + env_admin)
    except ValueError as e:
        parser.error(str(e))
    try:
        from sdjax.sharding.launch import initialize_from_args

        multihost = initialize_from_args(a)  # before anything touches a device
    except ValueError as e:
        parser.error(str(e))
    for name in ("queue_limit", "max_attempts", "max_prompt_chars", "max_body_bytes"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.lease_seconds <= 0 or a.poll_seconds <= 0:
        parser.error("--lease-seconds and --poll-seconds must be > 0")
    if a.result_ttl_s < 0:
        parser.error("--result-ttl must be >= 0 (0 = keep results)")
    worker_id = a.worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
    return Settings(
        model=a.model, dtype=a.dtype, residual_dtype=a.residual_dtype, attention_backend=a.attention_backend,
        cfg_parallel=a.cfg_parallel,
        multihost=multihost,
        ulysses=a.ulysses, ring=a.ring, shard_weights=a.shard_weights, compile_cache_dir=a.compile_cache_dir,
        engine=a.engine,
        host=a.host, port=a.port, role=a.role, backend=a.backend, redis_url=a.redis_url,
        redis_prefix=a.redis_prefix, data_dir=a.data_dir, worker_id=worker_id,
        api_keys=api_keys, admin_keys=admin_keys,
        queue_limit=a.queue_limit, sizes=tuple(a.sizes), frames=tuple(a.frames), max_steps=a.max_steps,
        max_prompt_chars=a.max_prompt_chars, max_body_bytes=a.max_body_bytes, retry_after_s=a.retry_after_s,
        overlap_stages=a.overlap_stages, prefetch_at=a.prefetch_at, lease_seconds=a.lease_seconds,
        heartbeat_seconds=a.heartbeat_seconds, poll_seconds=a.poll_seconds, max_attempts=a.max_attempts,
        drain_timeout_s=a.drain_timeout_s, image_timeout_s=a.image_timeout_s, result_ttl_s=a.result_ttl_s,
        log_level=a.log_level, log_format=a.log_format,
    )
