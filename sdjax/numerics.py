"""The one numerics rule shared by every model and kernel: float32 mode is the parity mode.

In float32, matmuls and convolutions run at full fp32 precision (`Precision.HIGHEST`: no TF32 on GPUs, no bf16
passes on TPUs), so results match a float32 reference; in bf16/fp16 the backend's default applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul_precision(dtype) -> jax.lax.Precision | None:
    """`precision=` for a matmul or convolution whose inputs are `dtype`."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
