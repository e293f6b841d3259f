"""Serving on several hosts: process 0 takes requests, every process runs each engine call.

JAX is multi-controller: a model on a mesh that spans hosts runs only when every process issues the same
programs in the same order. So on process 0 the scheduler's engine is a `LeaderEngine`: each engine call
(build, warm-up, encode, denoise, decode) is sent to the other processes (`sdjax.sharding.multihost.lead`)
and then run locally, one call at a time. The other processes run `follow_forever`: no HTTP, no store —
they execute the calls in the order received. Stage results stay on each process under a job key; only keys
cross processes. Cancellation is decided by process 0 and broadcast before every denoising step, so every
process stops at the same step.

    # every host (same code, same weights, same args); process 0 serves HTTP
    python -m sdjax.serve --model DIR --coordinator-address host0:7777 --num-processes 2 --process-id $RANK \\
        --ulysses 8 --cfg-parallel 2
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

from sdjax.sharding import multihost

log = logging.getLogger("sdjax.serve.multihost")


@dataclass(frozen=True)
class Handle:
    """A stage result that lives on every process under `key` (text embeddings, latents)."""

    key: int


class Executor:
    """Runs engine calls on this process; the same requests, in the same order, on every process."""

    def __init__(self, factory, settings, *, leader: bool):
        self.factory, self.settings, self.leader = factory, settings, leader
        self.engines: dict[int, object] = {}
        self.results: dict[int, object] = {}
        self.should_stop = None  # the leader's cancellation check of the denoise in flight
        self.on_step = None
        self.stats = None

    def run(self, request):
        op, engine_id, *args = request
        if op == "build":
            self.engines[engine_id] = self.factory(self.settings, *args)
            while len(self.engines) > 2:  # a reload keeps the old engine until the swap; older ones are gone
                self.engines.pop(min(self.engines))
            return None
        engine = self.engines[engine_id]
        if op == "warmup":
            return engine.warmup(*args)
        if op == "encode":
            key, params = args
            self.results[key] = engine.encode_text(params)
            return Handle(key)
        if op == "denoise":
            key, params = args
            text = self.results.pop(key)
            stop = self.should_stop if self.leader else None
            # The leader's decision, the same on every process, before each step.
            synced = lambda: multihost.broadcast(bool(stop()) if stop is not None else False)
            self.results[key] = engine.denoise(params, text, on_step=self.on_step if self.leader else None,
                                               should_stop=synced, stats=self.stats if self.leader else None)
            return Handle(key)
        if op == "decode":
            key, output_type = args
            return engine.decode(self.results.pop(key), output_type)
        raise ValueError(f"multi-host engine: unknown call {op!r}")


class _Leader:
    """What the leader's engines share: one executor, one call at a time, fresh keys."""

    def __init__(self, factory, settings):
        self.executor = Executor(factory, settings, leader=True)
        self.lock = threading.Lock()  # the scheduler's stage threads take turns: one order for every process
        self.keys = itertools.count()

    def call(self, op, engine_id, *args):
        return multihost.lead((op, engine_id, *args), self.executor.run)


class LeaderEngine:
    """The scheduler's engine on process 0: every call is mirrored on all processes."""

    def __init__(self, leader: _Leader, model: str | None):
        self.leader = leader
        with leader.lock:
            self.id = next(leader.keys)
            leader.call("build", self.id, model)
        inner = leader.executor.engines[self.id]
        self.config = inner.config
        self.version = getattr(inner, "version", None)

    def user_params(self, **kw):
        return self.leader.executor.engines[self.id].user_params(**kw)

    def warmup(self, params, output_type: str = "np") -> None:
        with self.leader.lock:
            self.leader.call("warmup", self.id, params, output_type)

    def encode_text(self, params) -> Handle:
        with self.leader.lock:
            return self.leader.call("encode", self.id, next(self.leader.keys), params)

    def denoise(self, params, text: Handle, *, on_step=None, should_stop=None, stats=None) -> Handle:
        ex = self.leader.executor
        with self.leader.lock:
            ex.on_step, ex.should_stop, ex.stats = on_step, should_stop, stats
            try:
                return self.leader.call("denoise", self.id, text.key, params)
            finally:
                ex.on_step = ex.should_stop = ex.stats = None

    def decode(self, latents: Handle, output_type: str = "np"):
        with self.leader.lock:
            return self.leader.call("decode", self.id, latents.key, output_type)


def leader_factory(factory):
    """Wrap an engine factory so that its engines (the first and every reload) are mirrored on every process."""
    shared = {}

    def make(settings, model=None):
        if "leader" not in shared:
            shared["leader"] = _Leader(factory, settings)
        return LeaderEngine(shared["leader"], model)

    return make


def follow_forever(factory, settings) -> int:
    """Processes other than 0: execute the leader's engine calls until it stops."""
    executor = Executor(factory, settings, leader=False)

    def run(request):
        try:
            executor.run(request)
        except Exception as e:  # the leader sees the same failure and reports it; keep following
            log.warning("engine call failed on this process", extra={"call": request[0], "error": str(e)})

    return multihost.follow(run)
