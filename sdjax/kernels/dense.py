"""gelu_tanh(x @ w + b), the first layer of a transformer FFN: one entry point, backends behind it.

| backend       | platform           | what                                                                 |
|---------------|--------------------|----------------------------------------------------------------------|
| `xla`         | any                | the GEMM (cuBLAS on GPUs), then bias + GELU as one XLA fusion: a     |
|               |                    | second pass over the (tokens × ffn_dim) hidden state                 |
| `pallas_mgpu` | GPU sm_90 (Hopper) | ours: bias + GELU in the GEMM's epilogue (`gelu_dense_mgpu.py`)      |
| `auto`        |                    | `pallas_mgpu` where it runs and was measured faster, else `xla`      |

Measured on an H200, device time (benchmarks/results/gemm_fused_fc1_coop_s6_NVIDIA_H200.md): at Wan-1.3B's
1,536 → 8,960 the fused kernel wins (fc1 + GELU 1.56 → 1.27 ms at 32,760 tokens, 3.11 → 2.53 at 65,520); at
Wan-14B's 5,120 → 13,824 it loses at 32,760 tokens (6.37 → 6.57; wins at 65,520, 14.18 → 13.42), so `auto` fuses
only up to `FUSE_MAX_K` input features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.kernels import gelu_dense_mgpu
from sdjax.kernels.platform import not_hopper_reason
from sdjax.numerics import matmul_precision

BACKENDS = ("auto", "xla", "pallas_mgpu")
FUSE_MAX_K = 2048  # measured: faster at K = 1,536, slower at K = 5,120


def _xla(x, w, b):
    y = jnp.einsum("...i,io->...o", x, w, precision=matmul_precision(x.dtype)) + b.astype(x.dtype)
    return jax.nn.gelu(y, approximate=True)


def unsupported_reason(backend: str, x, w) -> str | None:
    """Why `backend` can't run x @ w here (None if it can)."""
    if backend == "xla":
        return None
    if backend == "pallas_mgpu":
        return not_hopper_reason() or gelu_dense_mgpu.unsupported_reason(x, w)
    raise ValueError(f"gelu_dense backend {backend!r} unknown; allowed: {', '.join(BACKENDS)}")


def gelu_dense(x, w, b, *, backend: str = "auto"):
    """gelu_tanh(x @ w + b): x (..., K), w (K, N), b (N,) -> (..., N) in x's dtype."""
    if x.shape[-1] != w.shape[0] or b.shape != (w.shape[1],):
        raise ValueError(f"gelu_dense: incompatible shapes x{x.shape} w{w.shape} b{b.shape}")
    if backend == "auto":
        fuse = w.shape[0] <= FUSE_MAX_K and unsupported_reason("pallas_mgpu", x, w) is None
        backend = "pallas_mgpu" if fuse else "xla"
    elif (reason := unsupported_reason(backend, x, w)) is not None:
        raise ValueError(f"gelu_dense backend {backend!r} {reason}")
    return gelu_dense_mgpu.gelu_dense_mgpu(x, w, b) if backend == "pallas_mgpu" else _xla(x, w, b)
