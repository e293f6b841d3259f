"""A block output joins the residual stream, and the next sublayer's LayerNorm reads it: one entry point for both.

    x′ = x + gate · (y + y_bias)              stored in x's dtype (the residual stream's)
    u  = LayerNorm(x′) · scale + shift        in y's dtype (the next projection's input)

y is a projection's output without its bias; `gate` (B, D) or None (= 1); `scale`, `shift` (B, D) or (D,): an
affine LayerNorm's weight and bias, or a modulated one's (1 + scale) and shift. LayerNorm is in fp32, two-pass
(mean, then the mean square of x′ − mean), on x′ as stored. Where nothing joins the stream (a block's first
sublayer: the previous FFN already added its output in its GEMM's epilogue), `modulated_norm` writes u alone.

| backend         | platform       | what                                                                       |
|-----------------|----------------|----------------------------------------------------------------------------|
| `xla`           | any            | jnp. XLA does not store x′ between the norms of a Wan block: its fusions  |
|                 |                | recompute it from the block's outputs, reading them again at each norm     |
| `pallas_triton` | GPUs           | ours, below: each program reads R rows of x and y once and writes x′ and u |
| `auto`          |                | `pallas_triton` on GPUs up to `KERNEL_MAX_DIM` model dims, else `xla`     |

Why: in a Wan-1.3B CFG step on an H100, XLA's four element-wise passes of a block move 2.8 GB at 1.76-3.1 TB/s
(benchmarks/NOTES.md, session 12); two of them are these. Measured there, device time, B=2 × 32,760 tokens
(benchmarks/results/residual_norm_s12_*_NVIDIA_H100_80GB_HBM3.md): Wan-1.3B 0.449 → 0.278 ms after the
self-attention and 0.427 → 0.278 after the cross-attention (2.9 TB/s; programs of 2 tokens on one warp beat 4-8
tokens on 2-8 warps), Wan-14B 1.62 → 1.19 and 1.48 → 1.20 (2 tokens, 8 warps); the 1.3B CFG step 878.3 → 872.6 ms.
Inside the 14B forward (B=1) it gains nothing (2,470 vs 2,464 ms): `auto` keeps XLA above `KERNEL_MAX_DIM`.
The block-start norm alone (`modulated_norm`, 1.3B CFG batch): XLA's normalization fusion 0.177 ms, the kernel
0.137 (2.9 TB/s), −1.0 ms a CFG step (H100, benchmarks/NOTES.md, session 14).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("auto", "xla", "pallas_triton")
ROWS = (2, 1)  # tokens of a program: the largest that divides the token count (2 measured fastest)
KERNEL_MAX_DIM = 2048  # measured in the forward: faster at 1,536 model dims, not at 5,120


def layer_norm(x, eps):
    """LayerNorm without affine parameters, in fp32 (two-pass)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _xla(x, y, y_bias, gate, scale, shift, eps):
    delta = y.astype(jnp.float32) + y_bias.astype(jnp.float32)
    if gate is not None:
        delta = delta * gate[:, None]
    x_new = (x.astype(jnp.float32) + delta).astype(x.dtype)
    u = layer_norm(x_new, eps) * scale[:, None] + shift[:, None]
    return x_new, u.astype(y.dtype)


def _chunks(D: int) -> tuple[int, int]:
    """D = C · W with W the largest power of two <= 1,024 that divides D (Triton's arrays are powers of two)."""
    W = 1024
    while D % W:
        W //= 2
    return D // W, W


def unsupported_reason(backend: str, x, y) -> str | None:
    """Why `backend` can't run on these inputs here (None if it can)."""
    if backend == "xla":
        return None
    if backend == "pallas_triton":
        if jax.devices()[0].platform != "gpu":
            return f"needs a GPU, got {jax.devices()[0].device_kind}"
        if _chunks(x.shape[-1])[1] < 8:  # chunks of a power of two: fewer than 8 columns would unroll too far
            return f"needs the model dim to be a multiple of 8, got {x.shape[-1]}"
        return None
    raise ValueError(f"residual_norm backend {backend!r} unknown; allowed: {', '.join(BACKENDS)}")


def _resolve(backend: str, x, y) -> str:
    """The backend that runs: `auto` -> our kernel where it fits, else XLA; an explicit one must be able to."""
    if backend == "auto":
        fits = x.shape[-1] <= KERNEL_MAX_DIM and unsupported_reason("pallas_triton", x, y) is None
        return "pallas_triton" if fits else "xla"
    if (reason := unsupported_reason(backend, x, y)) is not None:
        raise ValueError(f"residual_norm backend {backend!r} {reason}")
    return backend


def residual_norm(x, y, y_bias, gate, scale, shift, *, eps: float, backend: str = "auto"):
    """(x′, u) as in the module docstring. x, y (B, L, D); y_bias (D,); gate (B, D) or None; scale, shift (B, D)
    or (D,)."""
    B, L, D = x.shape
    if y.shape != x.shape or y_bias.shape != (D,) or (gate is not None and gate.shape != (B, D)):
        raise ValueError(f"residual_norm: x{x.shape}, y{y.shape}, y_bias{y_bias.shape} and gate "
                         f"{None if gate is None else gate.shape} disagree")
    scale, shift = (jnp.broadcast_to(v.astype(jnp.float32), (B, D)) for v in (scale, shift))
    if _resolve(backend, x, y) == "xla":
        return _xla(x, y, y_bias, gate, scale, shift, eps)
    return residual_norm_pallas(x, y, y_bias, gate, scale, shift, eps=eps)


def modulated_norm(x, scale, shift, *, eps: float, out_dtype, backend: str = "auto"):
    """u = LayerNorm(x) · scale + shift in `out_dtype`, fp32 math; x (B, L, D), scale and shift (B, D) or (D,)."""
    B, L, D = x.shape
    scale, shift = (jnp.broadcast_to(v.astype(jnp.float32), (B, D)) for v in (scale, shift))
    if _resolve(backend, x, x) == "xla":
        return (layer_norm(x, eps) * scale[:, None] + shift[:, None]).astype(out_dtype)
    return modulated_norm_pallas(x, scale, shift, eps=eps, out_dtype=out_dtype)


def residual_norm_pallas(x, y, y_bias, gate, scale, shift, *, eps: float, rows: int | None = None,
                         num_warps: int | None = None, interpret: bool = False):
    """The Pallas kernel (Triton on GPUs; `interpret=True` runs it anywhere, for tests). Arguments as
    `residual_norm`'s, scale and shift (B, D); `rows` tokens a program (a divisor of L; default: the largest of
    ROWS that divides it) and `num_warps` (default: 1, 8 above 2,048 dims; measured) are for benchmarks."""
    B, L, D = x.shape
    (C, W), row_spec, batch_spec, call = _programs("residual_norm_pallas", x, rows, num_warps, interpret)
    gate = jnp.ones((B, D), jnp.float32) if gate is None else gate.astype(jnp.float32)
    by_rows = lambda a: a.reshape(B, L, C, W)  # free: D split into C chunks of W
    per_batch = lambda a: a.reshape(B, C, W)
    x_new, u = call(
        functools.partial(_kernel, eps=eps, C=C),
        out_shape=(jax.ShapeDtypeStruct((B, L, C, W), x.dtype), jax.ShapeDtypeStruct((B, L, C, W), y.dtype)),
        in_specs=[row_spec, row_spec, pl.BlockSpec((C, W), lambda b, i: (0, 0)), batch_spec, batch_spec,
                  batch_spec],
        out_specs=(row_spec, row_spec),
    )(by_rows(x), by_rows(y), y_bias.astype(jnp.float32).reshape(C, W), per_batch(gate), per_batch(scale),
      per_batch(shift))
    return x_new.reshape(B, L, D), u.reshape(B, L, D)


def modulated_norm_pallas(x, scale, shift, *, eps: float, out_dtype, rows: int | None = None,
                          num_warps: int | None = None, interpret: bool = False):
    """`modulated_norm`'s kernel: `residual_norm_pallas` without the residual (one read of x, one write of u)."""
    B, L, D = x.shape
    (C, W), row_spec, batch_spec, call = _programs("modulated_norm_pallas", x, rows, num_warps, interpret)
    u = call(
        functools.partial(_norm_kernel, eps=eps, C=C),
        out_shape=jax.ShapeDtypeStruct((B, L, C, W), out_dtype),
        in_specs=[row_spec, batch_spec, batch_spec],
        out_specs=row_spec,
    )(x.reshape(B, L, C, W), scale.astype(jnp.float32).reshape(B, C, W), shift.astype(jnp.float32).reshape(B, C, W))
    return u.reshape(B, L, D)


def _programs(name: str, x, rows: int | None, num_warps: int | None, interpret: bool):
    """How both kernels split x (B, L, D): D into C chunks of W, R tokens a program (a divisor of L; default the
    largest of ROWS), num_warps 1 (8 above 2,048 dims; measured). -> ((C, W), the rows' and the per-batch vectors'
    block specs, `pallas_call` with the grid and compiler settings bound)."""
    B, L, D = x.shape
    C, W = _chunks(D)
    R = rows or next(r for r in ROWS if L % r == 0)
    if L % R:
        raise ValueError(f"{name}: rows={R} must divide the token count {L}")
    row_spec = pl.BlockSpec((None, R, C, W), lambda b, i: (b, i, 0, 0))
    batch_spec = pl.BlockSpec((None, C, W), lambda b, i: (b, 0, 0))
    params = pltriton.CompilerParams(num_warps=num_warps or (1 if D <= 2048 else 8), num_stages=1)
    call = functools.partial(pl.pallas_call, grid=(B, L // R), compiler_params=params, interpret=interpret)
    return (C, W), row_spec, batch_spec, call


def _kernel(x_ref, y_ref, bias_ref, gate_ref, scale_ref, shift_ref, x_out, u_out, *, eps: float, C: int):
    """R tokens: refs (R, C, W) for the rows, (C, W) for the vectors. Every array op is on one (R, W) chunk."""
    parts = []
    for c in range(C):
        delta = (y_ref[:, c, :].astype(jnp.float32) + bias_ref[c, :][None]) * gate_ref[c, :][None]
        x_new = (x_ref[:, c, :].astype(jnp.float32) + delta).astype(x_out.dtype)
        x_out[:, c, :] = x_new
        parts.append(x_new.astype(jnp.float32))  # the norm sees the stream as stored
    _store_norm(parts, scale_ref, shift_ref, u_out, eps)


def _norm_kernel(x_ref, scale_ref, shift_ref, u_out, *, eps: float, C: int):
    _store_norm([x_ref[:, c, :].astype(jnp.float32) for c in range(C)], scale_ref, shift_ref, u_out, eps)


def _store_norm(parts, scale_ref, shift_ref, u_out, eps: float):
    """u = LayerNorm of the row chunks `parts` (fp32, two-pass) · scale + shift, into u_out."""
    C = len(parts)
    D = C * parts[0].shape[-1]
    mean = sum(p.sum(-1) for p in parts)[:, None] / D
    var = sum(jnp.square(p - mean).sum(-1) for p in parts)[:, None] / D
    rstd = jax.lax.rsqrt(var + eps)
    for c, p in enumerate(parts):
        u_out[:, c, :] = ((p - mean) * rstd * scale_ref[c, :][None] + shift_ref[c, :][None]).astype(u_out.dtype)
