"""What fusing q/k RMSNorm + RoPE into the attention kernel's prologue could save, measured.

    python benchmarks/prologue.py

Times, at Wan-1.3B 480p (L=32,760, D=1,536, 12×128, bf16), the work between the q/k projections and the
attention kernel as XLA runs it (RMSNorm across heads on q and k, RoPE on both), i.e. the most a prologue
fusion could remove, in two column orders: the checkpoint's interleaved RoPE pairs, and the halves order the
model now loads into (`rope_pair_permutation`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import timed, write_results
from sdjax.models.wan.transformer import RMSNorm, apply_rope, rope_angles


def rope_interleaved(x, cos, sin):
    """RoPE on interleaved pairs (x[2i], x[2i+1]), as the checkpoint's column order needs it (fp32)."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x32[..., 0] * c - x32[..., 1] * s, x32[..., 0] * s + x32[..., 1] * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def main():
    L, D, N, K = 32760, 1536, 12, 128
    key = jax.random.key(0)
    q = jax.random.normal(key, (1, L, D), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (1, L, D), jnp.bfloat16)
    cos, sin = map(jnp.asarray, rope_angles((21, 30, 52), K, 10000.0))
    norm_q, norm_k = RMSNorm(D, 1e-6), RMSNorm(D, 1e-6)

    def prologue(rope):
        return jax.jit(lambda q, k: (rope(norm_q(q).reshape(1, L, N, K), cos, sin),
                                     rope(norm_k(k).reshape(1, L, N, K), cos, sin)))

    bytes_min = 4 * L * D * 2  # read q, k and write them back once, bf16
    rows = []
    orders = (("interleaved pairs (checkpoint order)", rope_interleaved), ("halves (sdjax order)", apply_rope))
    for what, rope in orders:
        ms = float(np.median(timed(prologue(rope), q, k, warmup=3, iters=20))) * 1e3
        rows.append({"what": f"q/k RMSNorm + RoPE, {what}, one layer", "ms": ms,
                     "GB_per_s_vs_min_bytes": bytes_min / ms / 1e6, "x30_layers_ms": 30 * ms})
    write_results("prologue", rows, "q/k RMSNorm + RoPE (the bound of a prologue fusion), Wan-1.3B 480p, bf16.")


if __name__ == "__main__":
    main()
