"""What the lossy int8 Q Kᵀ attention (`pallas_mgpu_int8`) costs in output quality, on trained weights.

    python benchmarks/attention_quality.py            # CPU: the demo model, 8 prompts, PSNR / SSIM vs exact

The Hopper kernel computes exact attention of its dequantized q and k (int8 values × block scales, k smoothed):
on the GPU it matches a float64 reference of exactly that to the bf16 level (benchmarks/NOTES.md, session 4).
So this script runs the same recipe's reference on any platform: every self-attention call (as many keys as
queries) of the model gets `int8_reference_attention`, the cross-attention stays exact, as in the model. The
reference of each video is the same prompt, seed and settings with exact attention (no feature cache, so
nothing else differs). Writes benchmarks/results/attention_int8_quality_<model>_<device>.md.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def int8_self_attention():
    """Inside: the `xla` backend's self-attention calls run `int8_reference_attention` (compiled programs are
    dropped on entry and exit, so nothing compiled with the other attention is reused)."""
    exact = attention_lib._RUN["xla"]
    attention_lib._RUN["xla"] = lambda q, k, v, kv_len: (
        int8_reference_attention(q, k, v, kv_len) if q.shape[1] == k.shape[1] else exact(q, k, v, kv_len))
    jax.clear_caches()
    try:
        yield
    finally:
        attention_lib._RUN["xla"] = exact
        jax.clear_caches()


def main():
    from sdjax.config import SystemConfig
    from sdjax.pipeline import Pipeline

    pipe = Pipeline.default(system=SystemConfig(attention_backend="xla"))
    kw = dict(progress=False, cache={"policy": "none", "threshold": 0.0})
    exact = [pipe(p, seed=i, **kw).frames for i, p in enumerate(DEMO_PROMPTS)]
    with int8_self_attention():
        lossy = [pipe(p, seed=i, **kw).frames for i, p in enumerate(DEMO_PROMPTS)]
    rows = [{"prompt": p, "psnr_dB": psnr(a, b), "ssim": ssim(a, b)}
            for p, a, b in zip(DEMO_PROMPTS, lossy, exact, strict=True)]
    rows.append({"prompt": "(mean)", "psnr_dB": float(np.mean([r["psnr_dB"] for r in rows])),
                 "ssim": float(np.mean([r["ssim"] for r in rows]))})
    write_results(f"attention_int8_quality_{pipe.config.name}", rows,
                  "Frames with the int8 Q Kᵀ recipe in every self-attention against exact attention (same prompt, "
                  "seed, default steps, no cache), the demo model's trained weights; device "
                  f"{jax.devices()[0].device_kind}.")


if __name__ == "__main__":
    main()
