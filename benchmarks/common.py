"""Shared helpers for the benchmarks: random weights on device, timing, card name, result files."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RESULTS = Path(__file__).parent / "results"


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
        if out:
            return f"{out[0]} x{len(out)}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return jax.devices()[0].device_kind


def random_like(abstract_module, seed: int = 0, scale: float = 0.02):
    """Fill an abstract (eval_shape) module with random weights, made on the device (no host copy)."""
    graphdef, state = nnx.split(abstract_module)
    leaves, treedef = jax.tree.flatten(state)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(leaves))
        return [(scale * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
                for k, leaf in zip(keys, leaves, strict=True)]

    return nnx.merge(graphdef, jax.tree.unflatten(treedef, make(jax.random.key(seed))))


def timed(fn, *args, warmup: int = 2, iters: int = 5) -> list[float]:
    """Seconds per call (host clock around a block_until_ready), after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


def torch_timing(fn, *, warmup: int = 2, iters: int = 5) -> tuple[float, float]:
    """(median seconds per call, peak GiB allocated) of a torch CUDA function, without autograd, synchronised
    around each call after warm-up: the diffusers side of a comparison, timed like `timed`."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
    return float(np.median(out)), torch.cuda.max_memory_allocated() / 2**30


class GpuSampler:
    """GPU 0's SM clock and board power, sampled by nvidia-smi every `period_ms` while inside the `with` block.

    The cards run power-capped under sustained load (benchmarks/NOTES.md), so a long run's speed depends on its
    clock; `summary()` says what it was: {sm_clock_MHz, sm_clock_MHz_min, power_W, samples} ({} without
    nvidia-smi, e.g. on CPU)."""

    def __init__(self, period_ms: int = 500):
        self.period_ms = period_ms
        self.proc = None
        self.text = ""

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--id=0", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 f"-lms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.text, _ = self.proc.communicate(timeout=10)
        return False

    def summary(self) -> dict:
        return clock_power_summary(self.text)


def clock_power_summary(text: str) -> dict:
    """nvidia-smi's "clocks.sm, power.draw" csv lines (no header, no units) -> means, min clock, sample count."""
    samples = []
    for line in text.splitlines():
        try:
            mhz, watts = (float(v) for v in line.split(","))
        except ValueError:
            continue  # "[N/A]" fields or a line cut off when the sampler stopped
        samples.append((mhz, watts))
    if not samples:
        return {}
    mhz, watts = np.asarray(samples).T
    return {"sm_clock_MHz": float(mhz.mean()), "sm_clock_MHz_min": float(mhz.min()), "power_W": float(watts.mean()),
            "samples": len(samples)}


def use_long_kv_variant(spec: str | None) -> None:
    """Benchmark A/B: the exact attention kernel for long keys runs as `spec` (benchmarks/attention.py's variant
    syntax, e.g. "mgpu:64,192,2,0,1" = one CTA, no cluster) in this process instead of the library default."""
    if spec is None:
        return
    from benchmarks.attention import _mgpu_config
    from sdjax.kernels import flash_mgpu

    flash_mgpu.LONG_KV_CONFIG = _mgpu_config(spec)


def use_key_bias_backend(name: str | None) -> None:
    """Benchmark A/B: `auto` runs attention calls with a key_bias (the folded text) on `name` in this process."""
    if name is None:
        return
    from sdjax.kernels import attention

    choose = attention.choose_backend
    attention.choose_backend = lambda q, k, kv_len=None, key_bias=None: (
        name if key_bias is not None else choose(q, k, kv_len))


def use_xla_norm(on: bool) -> None:
    """Benchmark A/B: the q/k RMSNorm + RoPE through XLA in this process (`auto` does not pick our kernel)."""
    if not on:
        return
    from sdjax.kernels import norm

    reason = norm.unsupported_reason
    norm.unsupported_reason = lambda backend, y, heads: ("off for this A/B" if backend == "pallas_mgpu"
                                                         else reason(backend, y, heads))


def use_xla_residual_norm(on: bool) -> None:
    """Benchmark A/B: a block's residual adds + LayerNorms through XLA in this process (`auto` does not pick our
    kernel)."""
    if not on:
        return
    from sdjax.kernels import residual_norm

    reason = residual_norm.unsupported_reason
    residual_norm.unsupported_reason = lambda backend, x, y: ("off for this A/B" if backend == "pallas_triton"
                                                              else reason(backend, x, y))


def use_plain_ffn_add(on: bool) -> None:
    """Benchmark A/B: the FFN's gated residual add as its own element-wise pass in this process (the gate not folded
    into fc2, whose epilogue then does not add the stream)."""
    if not on:
        return
    from sdjax.models.wan import transformer

    transformer.FeedForward.into_stream = lambda self, x, u, gate: transformer._residual_add(x, self(u), gate)


def parse_xla_options(texts) -> dict | None:
    """["name=value", ...] -> XLA compiler options for `.compile(compiler_options=...)` (None for none)."""
    def value(v):
        return {"true": True, "false": False}.get(v.lower(), v)

    return {name: value(v) for name, _, v in (t.partition("=") for t in texts)} or None


def peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def write_results(name: str, rows: list[dict], header: str = "") -> Path:
    """JSON + markdown table under $OUT (device runs) or benchmarks/results/."""
    out_dir = Path(os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = card_name()
    stem = f"{name}_{card.split(' x')[0].replace(' ', '_').replace('/', '_')}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"card": card, "rows": rows}, indent=1, default=float))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {name} on {card}", "", header, "", "| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out_dir / f"{stem}.md"


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return "" if v is None else str(v)
