"""gelu(x @ w + b) with bias + GELU in the GEMM epilogue (sdjax/kernels/gelu_dense_mgpu.py), against float64.

The Mosaic GPU kernel runs here in Pallas's GPU interpreter (barriers, TMA copies with out-of-bounds rows, the
cluster's multicast and wgmma are simulated), so its numbers — ragged row counts included — are checked in CI;
speed is measured by benchmarks/gemm.py on a GPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from sdjax.kernels.dense import gelu_dense, unsupported_reason
from sdjax.kernels.gelu_dense_mgpu import GeluDenseConfig, gelu_dense_mgpu, gelu_tanh
from sdjax.kernels.gelu_dense_mgpu import unsupported_reason as kernel_reason


def reference(x, w, b):
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    return 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))


def inputs(M, K, N, seed=0):
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (K, N), jnp.float32) / math.sqrt(K)).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (N,), jnp.float32)
    return x, w, b


@pytest.mark.parametrize("M, K, N, config", [
    # ragged rows (the CTA tile's second half is mostly past the end); one cluster, both CTAs, a 2-slot ring
    (200, 192, 256, GeluDenseConfig(stages=2, clusters=1)),
    # 6 tiles on 2 clusters, 4 reduction steps on a 3-slot ring: slots and barrier phases wrap across tiles
    (600, 256, 1024, GeluDenseConfig(stages=3, clusters=2)),
    (61, 128, 256, GeluDenseConfig(block_m=64, stages=2, clusters=1)),  # rows not a multiple of 8
], ids=["ragged", "ring_wraps_across_tiles", "odd_rows"])
def test_kernel_matches_float64_in_the_gpu_interpreter(M, K, N, config):
    x, w, b = inputs(M, K, N)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):  # a race raises
        out = gelu_dense_mgpu(x, w, b, config=config)
    assert out.shape == (M, N) and out.dtype == jnp.bfloat16
    ref = reference(x, w, b)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err <= 4e-3  # bf16 output rounding (2^-9 relative) dominates


def test_epilogue_gelu_is_the_tanh_form():
    y = np.linspace(-8, 8, 1001, dtype=np.float32)
    got = np.asarray(gelu_tanh(jnp.asarray(y)), np.float64)
    np.testing.assert_allclose(got, reference(y[:, None], np.ones((1, 1)), np.zeros(1))[:, 0], atol=2e-6)


def test_leading_dims_and_the_xla_backend_agree():
    x, w, b = inputs(2 * 40, 192, 256, seed=1)
    x3 = x.reshape(2, 40, 192)
    with plgpu.force_gpu_interpret_mode():
        fused = gelu_dense_mgpu(x3, w, b)
    plain = gelu_dense(x3, w, b, backend="xla")
    assert fused.shape == plain.shape == (2, 40, 256)
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(plain, np.float32), atol=0.05, rtol=0.02)


def test_unsupported_inputs_and_configs_are_named():
    x, w, _ = inputs(16, 96, 256)
    assert "multiple of 64" in kernel_reason(x, w)
    assert "multiple of 256 (a cluster's columns)" in kernel_reason(*inputs(16, 128, 384)[:2])
    with pytest.raises(ValueError, match="bytes of shared memory"):
        GeluDenseConfig(stages=4)
    assert "Hopper" in unsupported_reason("pallas_mgpu", x, w)  # this machine has no GPU
    assert gelu_dense(x, w, jnp.zeros(256)).shape == (16, 256)  # auto falls back to XLA here
    with pytest.raises(ValueError, match="pallas_mgpu.*Hopper"):
        gelu_dense(x, w, jnp.zeros(256), backend="pallas_mgpu")
    with pytest.raises(ValueError, match="unknown; allowed: auto, xla, pallas_mgpu"):
        gelu_dense(x, w, jnp.zeros(256), backend="cublas")
    with pytest.raises(ValueError, match="incompatible shapes"):
        gelu_dense(x, w, jnp.zeros(255))


def test_kernel_lowers_for_cuda_at_wan_shapes():
    x = jax.ShapeDtypeStruct((1, 32760, 1536), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1536, 8960), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((8960,), jnp.bfloat16)
    module = jax.export.export(jax.jit(gelu_dense_mgpu), platforms=["cuda"])(x, w, b).mlir_module()
    assert "mosaic_gpu" in module


def test_auto_fuses_only_where_it_was_measured_faster(monkeypatch):
    """`auto` picks the fused kernel for Wan-1.3B's fc1 (K = 1,536) but keeps cuBLAS + XLA for 14B's (5,120)."""
    import sdjax.kernels.dense as dense

    fused = []
    monkeypatch.setattr(dense, "unsupported_reason", lambda backend, x, w: None)  # as on a Hopper GPU
    monkeypatch.setattr(dense.gelu_dense_mgpu, "gelu_dense_mgpu",
                        lambda x, w, b: fused.append(w.shape[0]) or dense._xla(x, w, b))
    for K in (1536, 5120):
        gelu_dense(jnp.ones((8, K), jnp.bfloat16), jnp.ones((K, 256), jnp.bfloat16), jnp.zeros(256))
    assert fused == [1536]
