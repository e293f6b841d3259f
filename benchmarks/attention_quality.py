"""What the lossy attention backends cost in output quality, on trained weights.

    python benchmarks/attention_quality.py            # CPU: the demo model, 8 prompts, PSNR / SSIM vs exact

The Hopper kernel's int8 mode (`pallas_mgpu_int8`) computes exact attention of its dequantized q and k (int8
values × block scales, k smoothed): on the GPU it matches a float64 reference of exactly that to the bf16 level
(benchmarks/NOTES.md, session 4). So this script runs the recipes' references on any platform: every
self-attention call (as many keys as queries) of the model gets the recipe, the cross-attention stays exact, as
in the model. `pallas_mgpu_int8_fp8` adds P and V in e4m3: V as the kernel rounds it, P rounded after scaling
by 2⁸ against the row's final max (the kernel's running max differs per key block; e4m3's relative precision
is the same). The reference of each video is the same prompt, seed and settings with exact attention (no
feature cache, so nothing else differs). Writes benchmarks/results/attention_lossy_quality_<model>_<device>.md.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.cache import DEMO_PROMPTS, psnr, ssim  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from sdjax.kernels import attention as attention_lib  # noqa: E402
from sdjax.kernels import flash_mgpu  # noqa: E402


def int8_reference_attention(q, k, v, kv_len=None):
    """Exact attention (fp32) of q, k as the int8 kernel sees them: quantized with its block sizes, dequantized."""
    q8, k8 = flash_mgpu.dequantized_qk_int8(q, k)
    out = attention_lib._xla_attention(q8, k8, v.astype(jnp.float32), kv_len)
    return out.astype(v.dtype)


def int8_fp8_reference_attention(q, k, v, kv_len=None):
    """Attention (fp32) as the int8 Q Kᵀ + fp8 P V kernel computes it: its q, k, v roundings and P's e4m3 one."""
    q8, k8 = flash_mgpu.dequantized_qk_int8(q, k, block_kv=flash_mgpu.FP8_PV_CONFIG.block_kv)
    v8 = flash_mgpu.dequantized_v_fp8(v)
    logits = jnp.einsum("bqnh,bknh->bnqk", q8, k8) / math.sqrt(q.shape[-1])
    if kv_len is not None:
        keys = jnp.arange(k.shape[1])[None, :] < kv_len[:, None]
        logits = jnp.where(keys[:, None, None, :], logits, -jnp.inf)
    p = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    p_scale = 2.0**flash_mgpu.P_FP8_LOG2_SCALE
    p8 = jnp.clip(p * p_scale, 0.0, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    out = jnp.einsum("bnqk,bknh->bqnh", p8, v8) / jnp.einsum("bnqk->bqn", p * p_scale)[..., None]
    return out.astype(v.dtype)


RECIPES = {"pallas_mgpu_int8": int8_reference_attention, "pallas_mgpu_int8_fp8": int8_fp8_reference_attention}


@contextlib.contextmanager
def self_attention_replaced(fn):
    """Inside: the `xla` backend's self-attention calls (as many keys as queries) run `fn(q, k, v, kv_len, exact)`
    (`exact` the backend's own), the cross-attention stays as it is; compiled programs are dropped on entry and
    exit, so nothing compiled with the other attention is reused."""
    exact = attention_lib._RUN["xla"]
    attention_lib._RUN["xla"] = lambda q, k, v, kv_len: (
        fn(q, k, v, kv_len, exact) if q.shape[1] == k.shape[1] else exact(q, k, v, kv_len))
    jax.clear_caches()
    try:
        yield
    finally:
        attention_lib._RUN["xla"] = exact
        jax.clear_caches()


def lossy_self_attention(backend: str):
    """Inside: the self-attention calls run the reference of lossy `backend` (RECIPES)."""
    recipe = RECIPES[backend]
    return self_attention_replaced(lambda q, k, v, kv_len, _exact: recipe(q, k, v, kv_len))


def main():
    from sdjax.config import SystemConfig
    from sdjax.pipeline import Pipeline

    pipe = Pipeline.default(system=SystemConfig(attention_backend="xla"))
    kw = dict(progress=False, cache={"policy": "none", "threshold": 0.0})
    exact = [pipe(p, seed=i, **kw).frames for i, p in enumerate(DEMO_PROMPTS)]
    rows = []
    for backend in RECIPES:
        with lossy_self_attention(backend):
            lossy = [pipe(p, seed=i, **kw).frames for i, p in enumerate(DEMO_PROMPTS)]
        mine = [{"backend": backend, "prompt": p, "psnr_dB": psnr(a, b), "ssim": ssim(a, b)}
                for p, a, b in zip(DEMO_PROMPTS, lossy, exact, strict=True)]
        mean = {key: float(np.mean([r[key] for r in mine])) for key in ("psnr_dB", "ssim")}
        rows += [*mine, {"backend": backend, "prompt": "(mean)", **mean}]
    write_results(f"attention_lossy_quality_{pipe.config.name}", rows,
                  "Frames with each lossy backend's recipe in every self-attention against exact attention (same "
                  "prompt, seed, default steps, no cache), the demo model's trained weights; device "
                  f"{jax.devices()[0].device_kind}.")


if __name__ == "__main__":
    main()
