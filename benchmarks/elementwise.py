"""The element-wise passes of a Wan block that XLA runs as separate kernels, in alternative formulations.

    python benchmarks/elementwise.py

At Wan-1.3B 480p (L=32,760, D=1,536, 12×128, FFN 8,960, bf16), one layer's worth of:
- the attention prologue — q/k RMSNorm across heads + RoPE, the bound of fusing it into the attention kernel —
  with RoPE pairs interleaved (the checkpoint's column order), as halves sliced and concatenated, as halves
  swapped by a flip of a size-2 axis (no concatenate), and (the model's form) rotating x⊙w before the RMS
  scale so that one pass does both and rounds once;
- the FFN's fc1 bias + tanh-GELU pass over the 32,760 × 8,960 hidden state, in bf16, in fp32, and as the
  identical x·sigmoid(2u) form;
- a gated residual add into the fp32 stream followed by the next modulated LayerNorm (three per block), with
  the model's two-pass statistics and with one-pass statistics (E[x²] − E[x]², one reduction kernel), next to
  a plain fp32 scale of the stream (the copy rate this timing method reaches).
Each row: ms, GB/s against the minimum traffic (read the inputs and write the outputs once), ms × 30 layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import timed, write_results
from sdjax.kernels.norm import apply_rope, rms_norm_rope
from sdjax.kernels.residual_norm import layer_norm
from sdjax.models.wan.transformer import rope_angles

L, D, N, K, F = 32760, 1536, 12, 128, 8960


def rope_interleaved(x, cos, sin):
    """RoPE on interleaved pairs (x[2i], x[2i+1]), as the checkpoint's column order needs it (fp32)."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x32[..., 0] * c - x32[..., 1] * s, x32[..., 0] * s + x32[..., 1] * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def rope_halves_flip(x, cos, sin):
    """RoPE on halves written without slices: [x1, x2]·[c, c] + [x2, x1]·[−s, s] (the swap is a flip)."""
    x4 = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, -1)  # (B, L, N, 2, K/2)
    c = cos[None, :, None, None, :]
    s = jnp.stack([-sin, sin], axis=1)[None, :, None]  # (1, L, 1, 2, K/2)
    return (x4 * c + jnp.flip(x4, axis=-2) * s).reshape(x.shape).astype(x.dtype)


def gelu_tanh_fp32(x):
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def gelu_sigmoid_fp32(x):
    """0.5·(1 + tanh u) = sigmoid(2u): the same function, one exp and one reciprocal."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.nn.sigmoid(1.5957691216057308 * (x32 + 0.044715 * x32 * x32 * x32))).astype(x.dtype)


def residual_layer_norm(x, delta, gate, scale, shift, eps=1e-6):
    """The model's form: x += delta·gate (fp32 stream), u = LayerNorm(x)·(1 + scale) + shift in bf16."""
    x = x + delta.astype(jnp.float32) * gate
    return x, (layer_norm(x, eps) * (1 + scale) + shift).astype(jnp.bfloat16)


def residual_layer_norm_one_pass(x, delta, gate, scale, shift, eps=1e-6):
    """Same, with the mean and mean square in one reduction: var = E[x²] − E[x]²."""
    x = x + delta.astype(jnp.float32) * gate
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    return x, ((x - mean) * jax.lax.rsqrt(var + eps) * (1 + scale) + shift).astype(jnp.bfloat16)


def row(what, fn, *args, min_bytes):
    ms = float(np.median(timed(jax.jit(fn), *args, warmup=3, iters=20))) * 1e3
    return {"what": what, "ms": ms, "GB_per_s_vs_min_bytes": min_bytes / ms / 1e6, "x30_layers_ms": 30 * ms}


def main():
    q = jax.random.normal(jax.random.key(0), (1, L, D), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (1, L, D), jnp.bfloat16)
    cos, sin = map(jnp.asarray, rope_angles((21, 30, 52), K, 10000.0))
    w = jnp.ones((D,), jnp.float32)
    norm = lambda x, rope=None: rms_norm_rope(x, None, w, rope, heads=N, eps=1e-6, backend="xla")
    rows = []
    for what, rope in (("interleaved pairs (checkpoint order)", rope_interleaved),
                       ("halves, slice + concatenate", apply_rope), ("halves, flip", rope_halves_flip)):
        fn = lambda q, k, rope=rope: (rope(norm(q).reshape(1, L, N, K), cos, sin),
                                      rope(norm(k).reshape(1, L, N, K), cos, sin))
        rows.append(row(f"q/k RMSNorm + RoPE, {what}", fn, q, k, min_bytes=4 * L * D * 2))
    fn = lambda q, k: (norm(q, (cos, sin)), norm(k, (cos, sin)))  # the model's XLA form
    rows.append(row("q/k RMSNorm + RoPE, halves, scale after the rotation (one rounding)", fn, q, k,
                    min_bytes=4 * L * D * 2))

    h = jax.random.normal(jax.random.key(2), (L, F), jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(3), (F,), jnp.bfloat16)
    for what, gelu in (("bf16 (jax.nn.gelu)", lambda x: jax.nn.gelu(x, approximate=True)),
                       ("fp32 tanh", gelu_tanh_fp32), ("fp32 x·sigmoid(2u)", gelu_sigmoid_fp32)):
        rows.append(row(f"fc1 bias + GELU, {what}", lambda h, b, g=gelu: g(h + b), h, bias, min_bytes=2 * L * F * 2))

    x = jax.random.normal(jax.random.key(4), (1, L, D), jnp.float32)
    delta = jax.random.normal(jax.random.key(5), (1, L, D), jnp.bfloat16)
    gate, scale, shift = (0.1 * jax.random.normal(jax.random.key(6 + i), (1, 1, D), jnp.float32) for i in range(3))
    rows.append(row("fp32 stream ×2 (copy rate reference)", lambda x: 2 * x, x, min_bytes=2 * L * D * 4))
    for what, fn in (("two-pass statistics (the model's)", residual_layer_norm),
                     ("one-pass statistics", residual_layer_norm_one_pass)):
        rows.append(row(f"residual + gate, LayerNorm + modulation, {what}", fn, x, delta, gate, scale, shift,
                        min_bytes=L * D * (4 + 2 + 4 + 2)))
    write_results("elementwise", rows, "One layer's element-wise passes, Wan-1.3B 480p, bf16; minimum traffic = "
                                       "inputs read and outputs written once.")


if __name__ == "__main__":
    main()
