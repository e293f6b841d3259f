"""How matmuls run, for every model and kernel: float32 mode is the parity mode; bf16 GEMMs go to cuBLASLt.

In float32, matmuls and convolutions run at full fp32 precision (`Precision.HIGHEST`: no TF32 on GPUs, no bf16
passes on TPUs), so results match a float32 reference; in bf16/fp16 the backend's default applies.

Every jit that runs a model's GEMMs compiles with `GEMM_COMPILER_OPTIONS`: on GPUs XLA then sends them to cuBLASLt
and its GEMM rewriter puts a following bias + tanh-GELU (a transformer FFN's first layer, written as
`gelu(x @ w + b, approximate=True)` in the GEMM's dtype) into cuBLASLt's epilogue — one pass over the hidden
state instead of two, the GELU computed in fp32 before the one rounding — and a following bias + same-shape
addend (`(x @ w + b) + c`, the FFN's residual add in `FeedForward.into_stream`) into its bias and C inputs. Triton
GEMMs are off because XLA's Triton GEMM fusion claims the dot before the rewriter sees the GELU. Measured
(benchmarks/NOTES.md, session 13; Wan-1.3B at 65,520 tokens, H100): fc1 + GELU 3.16 → 2.43 ms (our own fused
Hopper kernel: 2.64; 14B 6.34 → 5.79), its relative error against fp32 halved (3.1e-3 → 1.7e-3); fc2 and the
residual add 2.34 ms + a pass over the stream → 2.20 ms. Other backends ignore the options.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GEMM_COMPILER_OPTIONS = {"xla_gpu_enable_cublaslt": True, "xla_gpu_enable_triton_gemm": False}


def matmul_precision(dtype) -> jax.lax.Precision | None:
    """`precision=` for a matmul or convolution whose inputs are `dtype`."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
