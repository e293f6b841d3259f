"""What fusing q/k RMSNorm + RoPE into the attention kernel's prologue could save, measured.

    python benchmarks/prologue.py

Times, at Wan-1.3B 480p (L=32,760, D=1,536, 12×128, bf16), the work between the q/k projections and the
attention kernel as XLA runs it today (RMSNorm across heads on q and k, RoPE on both), i.e. the most a
prologue fusion could remove, and compares it with one DiT forward (30 layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import timed, write_results
from sdjax.models.wan.transformer import RMSNorm, apply_rope, rope_angles


def main():
    L, D, N, K = 32760, 1536, 12, 128
    key = jax.random.key(0)
    q = jax.random.normal(key, (1, L, D), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (1, L, D), jnp.bfloat16)
    cos, sin = map(jnp.asarray, rope_angles((21, 30, 52), K, 10000.0))
    norm_q, norm_k = RMSNorm(D, 1e-6), RMSNorm(D, 1e-6)

    @jax.jit
    def prologue(q, k):
        q = apply_rope(norm_q(q).reshape(1, L, N, K), cos, sin)
        k = apply_rope(norm_k(k).reshape(1, L, N, K), cos, sin)
        return q, k

    ms = float(np.median(timed(prologue, q, k, warmup=3, iters=20))) * 1e3
    bytes_min = 4 * L * D * 2  # read q, k and write them back once, bf16
    rows = [{"what": "q/k RMSNorm + RoPE (XLA, one layer)", "ms": ms,
             "GB_per_s_vs_min_bytes": bytes_min / ms / 1e6, "x30_layers_ms": 30 * ms}]
    write_results("prologue", rows, "Upper bound of a prologue fusion's saving, Wan-1.3B 480p, bf16.")


if __name__ == "__main__":
    main()
