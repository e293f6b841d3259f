"""q/k RMSNorm (+ RoPE) of an attention layer: one entry point, backends behind it.

rms_norm_rope(y, bias, weight, rope) = rotate((y + bias) ⊙ weight) · rsqrt(mean((y + bias)²) + eps), rounded
to y's dtype once; y is a projection's output without its bias, the statistics run over the whole model dim
(Wan's "rms_norm_across_heads") and `rope` = (cos, sin) rotates the pairs (i, K/2 + i) of each head. The
per-token RMS scale commutes with the rotation, so both are one pass over y.

| backend       | platform           | what                                                                   |
|---------------|--------------------|------------------------------------------------------------------------|
| `xla`         | any                | jnp. XLA makes the statistics their own reduction kernel, so y (larger |
|               |                    | than the L2 at video lengths) is read from memory twice               |
| `pallas_mgpu` | GPU sm_90 (Hopper) | ours (`rms_rope_mgpu.py`): a 64-token row block stays in shared memory |
| `auto`        |                    | `pallas_mgpu` where it runs, else `xla`                                |

Measured on an H200, device time (benchmarks/results/rms_rope_s9_NVIDIA_H200.md, 32,760 tokens): Wan-1.3B q or k
+ RoPE 0.085 → 0.069 ms (B=1), 0.175 → 0.126 (B=2); Wan-14B B=2 0.549 → 0.498. Without RoPE (the cross-attention's
q) XLA made one pass in that lone benchmark (1.3B B=1 0.058 vs the kernel's 0.060), but inside the model it makes
two (a reduction, then the element-wise pass): in the H100 profile of a CFG step the kernel there saved ~3 ms
(fusions 52.2 → 45.7 ms; benchmarks/NOTES.md, session 10), so `auto` takes it with or without RoPE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.kernels import flash_mgpu, rms_rope_mgpu
from sdjax.kernels.platform import not_hopper_reason

BACKENDS = ("auto", "xla", "pallas_mgpu")


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[i], x[K/2 + i]) of x (B, L, N, K) by the angles (L, K/2), in fp32.

    The checkpoint's pairs are interleaved; loading reorders q/k columns into halves (`rope_pair_permutation`)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(x.dtype)


def _xla(y, bias, weight, rope, heads, eps):
    x = y.astype(jnp.float32)
    if bias is not None:
        x = x + bias.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
    z = x * weight.astype(jnp.float32)
    if rope is not None:
        z = apply_rope(z.reshape(*z.shape[:-1], heads, -1), *rope).reshape(z.shape)
    return (z * scale).astype(y.dtype)


def unsupported_reason(backend: str, y, heads: int) -> str | None:
    """Why `backend` can't normalize y here (None if it can)."""
    if backend == "xla":
        return None
    if backend == "pallas_mgpu":
        return not_hopper_reason() or rms_rope_mgpu.unsupported_reason(y, heads)
    raise ValueError(f"rms_norm_rope backend {backend!r} unknown; allowed: {', '.join(BACKENDS)}")


def rms_norm_rope(y, bias, weight, rope=None, *, heads: int = 1, eps: float, backend: str = "auto",
                  return_max_head_norms: bool = False):
    """y (..., D) [+ bias (D,)] RMS-normalized with weight (D,) and, given rope = (cos, sin) (L, K/2) for
    y (B, L, D), rotated per head; -> (..., D) in y's dtype. `return_max_head_norms` (y (B, L, D)): also each
    head's largest norm over the tokens of the result, (B, heads) fp32 — keys' bound for the attention kernel's
    held maxima, taken inside our kernel's pass."""
    if weight.shape != y.shape[-1:] or (bias is not None and bias.shape != weight.shape):
        raise ValueError(f"rms_norm_rope: y{y.shape}, bias {None if bias is None else bias.shape} and "
                         f"weight{weight.shape} disagree")
    if backend == "auto":
        backend = "pallas_mgpu" if unsupported_reason("pallas_mgpu", y, heads) is None else "xla"
    elif (reason := unsupported_reason(backend, y, heads)) is not None:
        raise ValueError(f"rms_norm_rope backend {backend!r} {reason}")
    if backend == "xla":
        out = _xla(y, bias, weight, rope, heads, eps)
        if not return_max_head_norms:
            return out
        return out, flash_mgpu.max_key_norms(out.reshape(*out.shape[:2], heads, -1))
    bias = jnp.zeros_like(weight) if bias is None else bias
    cos, sin = (None, None) if rope is None else rope
    return rms_rope_mgpu.rms_norm_rope_mgpu(y, bias, weight, cos, sin, heads=heads, eps=eps,
                                            return_max_head_norms=return_max_head_norms)
