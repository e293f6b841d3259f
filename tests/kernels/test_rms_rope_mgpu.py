"""q/k RMSNorm + RoPE in one pass (sdjax/kernels/rms_rope_mgpu.py), against float64.

The Mosaic GPU kernel runs here in Pallas's GPU interpreter with race detection (TMA copies with out-of-bounds
rows, barriers, the warpgroups' exchange of partial sums and the ring's refills are simulated), so its numbers are
checked in CI; CI also builds its CUDA module at Wan shapes. Speed is measured by benchmarks/rms_rope.py on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from sdjax.kernels.rms_rope_mgpu import RmsRopeConfig, rms_norm_rope_mgpu, unsupported_reason

EPS = 1e-6


def inputs(B, L, heads, K, rope=True, seed=0):
    """y (B, L, D) bf16 with a nonzero mean per column (the bias shifts it further), fp32 bias, weight, angles."""
    D = heads * K
    ky, kb, kw, ka = jax.random.split(jax.random.key(seed), 4)
    y = (jax.random.normal(ky, (B, L, D)) + 0.3).astype(jnp.bfloat16)
    bias = 0.5 * jax.random.normal(kb, (D,))
    weight = 1.0 + 0.2 * jax.random.normal(kw, (D,))
    if not rope:
        return y, bias, weight, None, None
    angles = jax.random.uniform(ka, (L, K // 2), maxval=2 * np.pi)
    return y, bias, weight, jnp.cos(angles), jnp.sin(angles)


def reference(y, bias, weight, cos, sin, heads):
    """The semantics in float64: RMS over the whole of y + bias, times weight, RoPE on each head's halves."""
    x = np.asarray(y, np.float64) + np.asarray(bias, np.float64)
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    z = x * np.asarray(weight, np.float64)
    if cos is not None:
        B, L, D = z.shape
        z1, z2 = np.split(z.reshape(B, L, heads, D // heads), 2, axis=-1)
        c, s = (np.asarray(a, np.float64)[None, :, None, :] for a in (cos, sin))
        z = np.concatenate([z1 * c - z2 * s, z1 * s + z2 * c], axis=-1).reshape(B, L, D)
    return z * scale


@pytest.mark.parametrize("B, L, heads, K, rope, config", [
    # both warpgroups, 2 heads each, all resident; 200 tokens: the last row block is ragged (8 of 64 rows)
    (2, 200, 4, 128, True, RmsRopeConfig()),
    # one warpgroup, 12 chunks through 5 slots: refills in phase 1, refills from the back in phase 2 (slots wrap
    # twice, an odd ring so chunk parity alternates); 72 tokens: a second, nearly empty row block
    (1, 72, 6, 128, True, RmsRopeConfig(warpgroups=1, stages=5)),
    (2, 64, 6, 128, True, RmsRopeConfig(warpgroups=2, stages=4)),  # each warpgroup's ring refills
    (2, 200, 4, 64, True, RmsRopeConfig()),  # head dim 64: chunks of 32 columns, 64-byte swizzle
    (2, 200, 4, 128, False, RmsRopeConfig()),  # no RoPE (the cross-attention's q)
    (1, 72, 6, 128, False, RmsRopeConfig(warpgroups=3, stages=4)),  # three warpgroups exchange partial sums
], ids=["rope_ragged", "rope_ring_refills", "rope_two_rings", "rope_head_dim_64", "no_rope_ragged",
        "no_rope_three_warpgroups"])
def test_kernel_matches_float64_in_the_gpu_interpreter(B, L, heads, K, rope, config):
    y, bias, weight, cos, sin = inputs(B, L, heads, K, rope)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):  # a race raises
        out = rms_norm_rope_mgpu(y, bias, weight, cos, sin, heads=heads, eps=EPS, config=config)
    assert out.shape == y.shape and out.dtype == jnp.bfloat16
    ref = reference(y, bias, weight, cos, sin, heads)
    out = np.asarray(out, np.float64)
    # One bf16 rounding of an fp32 result: each element within half a bf16 ulp (2^-8 relative) plus fp32 noise.
    assert np.all(np.abs(out - ref) <= 2.0**-8 * np.abs(ref) + 1e-5)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 4e-3


@pytest.mark.parametrize("B, L, heads, K, config", [
    (2, 200, 4, 128, RmsRopeConfig()),  # the last row block ragged: its padding rows must not count
    (1, 72, 6, 128, RmsRopeConfig(warpgroups=1, stages=5)),  # phase 2 over refilled slots
], ids=["ragged", "ring_refills"])
def test_max_head_norms_of_the_result(B, L, heads, K, config):
    """`return_max_head_norms`: each head's largest norm over the tokens of the rounded result — what the attention
    kernel's held maxima would otherwise take in a pass over k (`flash_mgpu.max_key_norms`) — from the same pass,
    and the result itself unchanged."""
    from sdjax.kernels.flash_mgpu import max_key_norms

    y, bias, weight, cos, sin = inputs(B, L, heads, K)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        out, norms = rms_norm_rope_mgpu(y, bias, weight, cos, sin, heads=heads, eps=EPS, config=config,
                                        return_max_head_norms=True)
        plain = rms_norm_rope_mgpu(y, bias, weight, cos, sin, heads=heads, eps=EPS, config=config)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(plain, np.float32))
    assert norms.shape == (B, heads) and norms.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(norms), np.asarray(max_key_norms(out.reshape(B, L, heads, K))),
                               rtol=1e-6)


def test_bias_and_angles_of_any_float_dtype():
    """bf16 bias / weight / angles are used as their fp32 values (the wrapper upcasts them)."""
    y, bias, weight, cos, sin = inputs(1, 64, 2, 128)
    bias, weight, cos, sin = (a.astype(jnp.bfloat16) for a in (bias, weight, cos, sin))
    with plgpu.force_gpu_interpret_mode():
        out = rms_norm_rope_mgpu(y, bias, weight, cos, sin, heads=2, eps=EPS)
    ref = reference(y, bias.astype(jnp.float32), weight.astype(jnp.float32), cos.astype(jnp.float32),
                    sin.astype(jnp.float32), 2)
    assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) <= 4e-3


def test_ring_depth_at_wan_shapes():
    """How much of a 64-token row block stays in shared memory (the rest is read again, from L2)."""
    config = RmsRopeConfig()  # two warpgroups
    assert config.slots(1536, 12, rope=True) == 11  # 1.3B q/k: 11 of each warpgroup's 12 chunks
    assert config.slots(1536, 12, rope=False) == 12  # 1.3B cross-attention q: all
    assert config.slots(5120, 40, rope=True) == 9  # 14B: 9 of 40
    assert RmsRopeConfig(warpgroups=1).slots(1536, 12, rope=True) == 22  # 22 of 24
    assert RmsRopeConfig(stages=4).slots(1536, 12, rope=True) == 4


@pytest.mark.parametrize("B, L, D, heads, rope", [
    (1, 32760, 1536, 12, True), (1, 32760, 1536, 12, False), (2, 32760, 5120, 40, True), (2, 200, 256, 4, True)],
    ids=["wan_1.3b_qk", "wan_1.3b_cross_q", "wan_14b_qk_cfg_batch", "head_dim_64"])
def test_kernel_lowers_for_cuda(B, L, D, heads, rope):
    """The whole Pallas and Mosaic GPU lowering (layouts, TMA, barriers; shared memory checked against 227 KB)."""
    K = D // heads
    y = jax.ShapeDtypeStruct((B, L, D), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((D,), jnp.float32)
    if rope:
        angles = jax.ShapeDtypeStruct((L, K // 2), jnp.float32)
        f, args = (lambda y, b, w, c, s: rms_norm_rope_mgpu(y, b, w, c, s, heads=heads, eps=EPS),
                   (y, vec, vec, angles, angles))
    else:
        f, args = lambda y, b, w: rms_norm_rope_mgpu(y, b, w, heads=heads, eps=EPS), (y, vec, vec)
    module = jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in module


def test_unsupported_inputs_and_configs_are_named():
    y = jnp.zeros((1, 64, 256), jnp.bfloat16)
    cos = jnp.zeros((64, 64), jnp.float32)
    assert unsupported_reason(y, 2) is None
    assert unsupported_reason(y, 2, cos, cos) is None
    assert "bfloat16" in unsupported_reason(y.astype(jnp.float32), 2)
    assert "(B, L, D)" in unsupported_reason(y[0], 2)
    assert "split into heads" in unsupported_reason(y, 3)
    assert "multiple of 64" in unsupported_reason(jnp.zeros((1, 64, 192), jnp.bfloat16), 2)  # head dim 96
    assert "multiple of 8" in unsupported_reason(jnp.zeros((1, 60, 256), jnp.bfloat16), 2)
    assert "both cos and sin" in unsupported_reason(y, 2, cos, None)
    assert "shape (64, 64)" in unsupported_reason(y, 2, cos[:, :32], cos[:, :32])
    assert "split evenly over 2 warpgroups" in unsupported_reason(jnp.zeros((1, 64, 384), jnp.bfloat16), 3)
    assert unsupported_reason(jnp.zeros((1, 64, 384), jnp.bfloat16), 3, config=RmsRopeConfig(warpgroups=3)) is None
    big = jax.ShapeDtypeStruct((1, 64, 128 * 240), jnp.bfloat16)  # bias and weight alone fill shared memory
    assert "shared memory" in unsupported_reason(big, 240)
    with pytest.raises(ValueError, match="rms_norm_rope_mgpu needs a token count"):
        rms_norm_rope_mgpu(jnp.zeros((1, 60, 256), jnp.bfloat16), jnp.zeros(256), jnp.ones(256), heads=2, eps=EPS)
    with pytest.raises(ValueError, match="bias and weight of shape"):
        rms_norm_rope_mgpu(y, jnp.zeros(128), jnp.ones(256), heads=2, eps=EPS)
    with pytest.raises(ValueError, match="warpgroups must be 1 to 4"):
        RmsRopeConfig(warpgroups=5)
    with pytest.raises(ValueError, match="stages must be >= 4"):
        RmsRopeConfig(stages=3)
