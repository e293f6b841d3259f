"""The q/k RMSNorm (+ RoPE) entry point (sdjax/kernels/norm.py): its XLA backend against float64, dispatch, errors.

The Mosaic GPU backend's numbers are checked in tests/kernels/test_rms_rope_mgpu.py (GPU interpreter)."""

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.kernels.norm import rms_norm_rope
from tests.kernels.test_rms_rope_mgpu import EPS, inputs, reference


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_xla_backend_matches_float64(rope, backend):
    heads, K = 3, 64
    y, bias, weight, cos, sin = inputs(2, 40, heads, K, rope=rope)
    out = rms_norm_rope(y, bias, weight, None if cos is None else (cos, sin), heads=heads, eps=EPS, backend=backend)
    assert out.shape == y.shape and out.dtype == jnp.bfloat16
    ref = reference(y, bias, weight, cos, sin, heads)
    # one bf16 rounding of the result (2^-8 relative, rounding to nearest: 2^-9) over fp32 math
    np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - ref), 2.0**-8 * np.abs(ref) + 1e-5)


def test_xla_backend_returns_the_heads_max_norms():
    """`return_max_head_norms` on XLA: each head's largest norm over the tokens of the result (B, heads)."""
    heads, K = 3, 64
    y, bias, weight, cos, sin = inputs(2, 40, heads, K)
    out, norms = rms_norm_rope(y, bias, weight, (cos, sin), heads=heads, eps=EPS, backend="xla",
                               return_max_head_norms=True)
    want = np.linalg.norm(np.asarray(out, np.float64).reshape(2, 40, heads, K), axis=-1).max(axis=1)
    np.testing.assert_allclose(np.asarray(norms), want, rtol=1e-6)


def test_without_bias_is_a_zero_bias():
    y, bias, weight, cos, sin = inputs(1, 16, 2, 64)
    no_bias = rms_norm_rope(y, None, weight, (cos, sin), heads=2, eps=EPS)
    zero = rms_norm_rope(y, jnp.zeros_like(bias), weight, (cos, sin), heads=2, eps=EPS)
    np.testing.assert_array_equal(np.asarray(no_bias, np.float32), np.asarray(zero, np.float32))


def test_errors_name_the_backend_and_the_shapes():
    y, bias, weight, *_ = inputs(1, 16, 2, 64, rope=False)
    with pytest.raises(ValueError, match="backend 'cudnn' unknown; allowed: auto, xla, pallas_mgpu"):
        rms_norm_rope(y, bias, weight, heads=2, eps=EPS, backend="cudnn")
    with pytest.raises(ValueError, match="backend 'pallas_mgpu' needs an sm_90"):  # this machine has no Hopper GPU
        rms_norm_rope(y, bias, weight, heads=2, eps=EPS, backend="pallas_mgpu")
    with pytest.raises(ValueError, match="disagree"):
        rms_norm_rope(y, bias[:-1], weight, heads=2, eps=EPS)
