"""Our accelerator kernels lower for their targets on a CPU-only machine.

Pallas's GPU interpreter cannot run the Hopper attention kernel yet, so its numbers are only checked on a GPU
(benchmarks/attention.py); here CI at least builds its Mosaic GPU module (all Pallas-level lowering:
layouts, barriers, TMA slices) for both schedules, ragged lengths and kv_len, and the Triton and Mosaic
TPU modules of the portable kernels. Final compilation (ptxas / libtpu) needs the device.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention as attention_benchmark
from sdjax.kernels import flash_mgpu
from sdjax.kernels.flash_mgpu import MgpuConfig, flash_attention_mgpu
from sdjax.kernels.flash_pallas import flash_attention_tpu, flash_attention_triton


def _export(fn, platform, B, T, S, N, H, kv_len):
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = v = jax.ShapeDtypeStruct((B, S, N, H), jnp.bfloat16)
    # Triton kernels have no export-compatibility guarantee; we only want the module built.
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    if kv_len:
        f = jax.jit(lambda q, k, v, l: fn(q, k, v, l))
        args = (q, kv, v, jax.ShapeDtypeStruct((B,), jnp.int32))
    else:
        f = jax.jit(lambda q, k, v: fn(q, k, v, None))
        args = (q, kv, v)
    return jax.export.export(f, platforms=[platform], disabled_checks=checks)(*args).mlir_module()


@pytest.mark.parametrize("config", [MgpuConfig(), MgpuConfig(overlap=True), MgpuConfig(block_kv=192, cluster=2),
                                    MgpuConfig(block_kv=192, cluster=4), MgpuConfig(chained=True),
                                    MgpuConfig(block_kv=192, frozen_max=True, chained=True),
                                    flash_mgpu.LONG_KV_CONFIG,
                                    dataclasses.replace(flash_mgpu.LONG_KV_CONFIG, overlap=False),
                                    dataclasses.replace(flash_mgpu.LONG_KV_CONFIG, overlap=False, pingpong=True)],
                         ids=["pingpong", "overlap", "cluster2", "cluster4", "chained", "frozen_max_192", "long_kv",
                              "long_kv_chained", "long_kv_chained_pingpong"])
@pytest.mark.parametrize("shape", [(1, 1000, 1000, 2, 128, False), (2, 300, 77, 1, 64, True)],
                         ids=["ragged", "short_kv_len"])
def test_mgpu_kernel_lowers_for_cuda(config, shape):
    module = _export(lambda q, k, v, l: flash_attention_mgpu(q, k, v, l, config=config), "cuda", *shape)
    assert "mosaic_gpu" in module
    # clusters multicast K/V and release slots to the peer CTAs (remote mbarrier arrivals)
    assert ("multicast" in module and "mapa.shared::cluster" in module) == (config.cluster > 1)


@pytest.mark.parametrize("config", [MgpuConfig(), MgpuConfig(overlap=True), flash_mgpu.LONG_KV_CONFIG],
                         ids=["pingpong", "overlap", "long_kv_cluster2"])
def test_mgpu_kernel_with_log_sum_exp_lowers_for_cuda(config):
    """The exact kernel also returns each row's log-sum-exp (B, T, N) fp32 (ring attention's merge), written from
    registers: the long-key configs' K/V ring leaves no shared memory to stage it (the test's 1000 x 1000 shape
    takes their 2 stages of 192 keys)."""
    B, T, S, N, H = 2, 1000, 1000, 2, 128
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, S, N, H), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    fn = jax.jit(lambda q, k, v, l: flash_attention_mgpu(q, k, v, l, config=config, return_lse=True))
    exported = jax.export.export(fn, platforms=["cuda"])(q, kv, kv, lengths)
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [((B, T, N, H), jnp.bfloat16), ((B, T, N), jnp.float32)]
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out_and_lse"])
def test_mgpu_kernel_with_a_split_tail_lowers_for_cuda(return_lse):
    """The long-key config splits the last wave's clusters over key ranges (`tail_split`): with 6 cluster slots the
    8 clusters of this shape (2 heads x 4 query clusters, ragged keys) run as 1 whole wave + 2 clusters in 3 key
    ranges each; the kernel then also returns the pieces, merged after it (a scatter into O and the log-sum-exp)."""
    B, T, S, N, H = 1, 1000, 4000, 2, 128
    assert flash_mgpu.plan_tail(B * N * 4, 6, -(-S // 128), 128) == (2, 3)
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, S, N, H), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: flash_attention_mgpu(q, k, v, config=flash_mgpu.LONG_KV_CONFIG, cluster_slots=6,
                                                      return_lse=return_lse))
    exported = jax.export.export(fn, platforms=["cuda"])(q, kv, kv)
    want = [((B, T, N, H), jnp.bfloat16)] + ([((B, T, N), jnp.float32)] if return_lse else [])
    assert [(a.shape, a.dtype) for a in exported.out_avals] == want
    module = exported.mlir_module()
    assert "mosaic_gpu" in module and "stablehlo.scatter" in module


def test_plan_tail_splits_the_last_wave():
    """`plan_tail` in its lock-step model (a unit's time 1, a piece's 1 / pieces + a CTA's fixed cost)."""
    plan = flash_mgpu.plan_tail
    fixed = flash_mgpu.TAIL_PIECE_FIXED_KEYS / (256 * 128)

    def modelled(units, m, pieces, slots=66):
        return (units - m) // slots + -(-m * pieces // slots) * (1 / pieces + fixed)

    # Wan-1.3B 480p at B=1 on a 132-SM Hopper card, clusters of 2: 12 heads x 128 query clusters = 23.27 waves of 66;
    # the last 18 clusters as 7 key ranges each run in 2 rounds of a seventh after 23 whole waves
    assert plan(12 * 128, 66, 256, 128) == (18, 7)
    assert modelled(12 * 128, 18, 7) < modelled(12 * 128, 18, 3) < 24
    # every (m, pieces) it may choose is no better than the plan
    for units in (12 * 128, 2 * 12 * 128, 40 * 128):
        m_best, p_best = plan(units, 66, 256, 128)
        for m in (units % 66, units % 66 + 66):
            assert all(modelled(units, m_best, p_best) <= modelled(units, m, p) + 1e-9 for p in range(2, 9))
    assert plan(66 * 23, 66, 256, 128) is None  # whole waves: nothing to split
    assert plan(12 * 128, 66, 15, 128) is None  # a piece would have fewer than 8 key blocks
    assert plan(3, 66, 256, 128) == (3, 8)  # less than a wave: each unit over 8 key ranges


def test_tail_pieces_merge_into_the_attention_over_all_keys():
    """`_merge_tail` against float64: the tail units' pieces — O over a key range (normalized) and its log-sum-exp,
    here from a reference, in the kernel's order (units with query clusters fastest, then heads, then batch rows;
    piece i of the tail is unit whole + i // pieces over key blocks [r · n // pieces, (r + 1) · n // pieces),
    r = i % pieces) — merge into the attention over all keys, and land at the units' rows (T ragged)."""
    rng = np.random.default_rng(3)
    B, T, S, N, H, rows, block_kv, pieces = 2, 600, 1000, 2, 16, 256, 128, 3
    q, k, v = (rng.normal(size=(B, L, N, H)) for L in (T, S, S))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)

    def attend(keys):  # (B, T, N, H) output and (B, N, T) log-sum-exp over these keys
        x = logits[..., keys]
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        return np.einsum("bnts,bsnh->btnh", np.exp(x - lse[..., None]), v[:, keys]), lse

    o_all, lse_all = attend(slice(None))
    grid_q, n_kv = -(-T // rows), -(-S // block_kv)
    units, m = B * N * grid_q, 5
    whole = units - m
    o_part, lse_part = np.zeros((m * pieces, rows, H)), np.zeros((m * pieces, rows))
    for i in range(m * pieces):
        unit, r = whole + i // pieces, i % pieces
        b, h, qi = unit // (N * grid_q), unit // grid_q % N, unit % grid_q
        o_r, lse_r = attend(slice(r * n_kv // pieces * block_kv, (r + 1) * n_kv // pieces * block_kv))
        tokens = np.arange(qi * rows, min((qi + 1) * rows, T))
        o_part[i, : len(tokens)], lse_part[i, : len(tokens)] = o_r[b, tokens, h], lse_r[b, h, tokens]
    o_kernel, lse_kernel = np.zeros_like(o_all), np.zeros((B, N, grid_q * rows))  # the tail's rows: not yet written
    done = np.ones((B, N, grid_q), bool)
    done.reshape(-1)[whole:] = False
    for b, h, qi in zip(*np.nonzero(done), strict=True):
        tokens = np.arange(qi * rows, min((qi + 1) * rows, T))
        o_kernel[b, tokens, h], lse_kernel[b, h, tokens] = o_all[b, tokens, h], lse_all[b, h, tokens]
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    o, lse = flash_mgpu._merge_tail(f32(o_kernel), f32(lse_kernel), f32(o_part), f32(lse_part), whole=whole,
                                    heads=N, grid_q=grid_q)
    np.testing.assert_allclose(np.asarray(o), o_all, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse)[..., :T], lse_all, rtol=2e-6)


def test_held_maxima_need_their_bound_and_the_chained_schedule():
    """frozen_max is exact only where the kernel has the rows' logit bounds: the exact mode without a key_bias; it
    runs in the chained schedule (exact-mode and two-phase only), with or without the ping-pong."""
    assert flash_mgpu.LONG_KV_CONFIG.frozen_max and not flash_mgpu.SHORT_KV_CONFIG.frozen_max
    for schedule in (dict(overlap=True), dict(chained=False)):
        with pytest.raises(ValueError, match="frozen_max needs the chained schedule"):
            MgpuConfig(frozen_max=True, **schedule)
    MgpuConfig(frozen_max=True, chained=True, pingpong=False)  # allowed: the hold test is serialized instead
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    held = MgpuConfig(frozen_max=True, chained=True)
    with pytest.raises(ValueError, match="frozen_max only in exact mode without key_bias"):
        flash_mgpu.flash_attention_mgpu(q, q, q, int8_qk=True, config=held)
    with pytest.raises(ValueError, match="frozen_max only in exact mode without key_bias"):
        flash_mgpu.flash_attention_mgpu(q, q, q, key_bias=jnp.zeros((1, 64)), config=held)
    with pytest.raises(ValueError, match="chained only in exact mode"):
        flash_mgpu.flash_attention_mgpu(q, q, q, int8_qk=True, config=MgpuConfig(block_kv=192, chained=True))
    # the FA3 overlap inside the chained schedule is for held blocks (O untouched between them) without the ping-pong
    MgpuConfig(overlap=True, chained=True, frozen_max=True, pingpong=False)
    for config in (dict(), dict(frozen_max=True)):
        with pytest.raises(ValueError, match="chained with overlap .* needs frozen_max and no ping-pong"):
            MgpuConfig(overlap=True, chained=True, **config)


def test_max_key_norms_bound_every_logit():
    """max_j |k_j| per (batch, head): with |q_i| it bounds every logit q_i · k_j (Cauchy–Schwarz)."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 50, 3, 64)) * np.array([1.0, 4.0, 0.1])[:, None]
    k = rng.normal(size=(2, 70, 3, 64)) * rng.uniform(0.1, 5.0, size=(1, 70, 1, 1))
    got = np.asarray(flash_mgpu.max_key_norms(jnp.asarray(k, jnp.float32)))
    np.testing.assert_allclose(got, np.linalg.norm(k, axis=-1).max(axis=1), rtol=1e-5)
    logits = np.einsum("btnh,bsnh->bnts", q, k)
    bound = np.linalg.norm(q, axis=-1).transpose(0, 2, 1)[..., None] * got[:, :, None, None]
    assert (logits <= bound * (1 + 1e-6)).all()


def test_held_max_slack_is_the_kernels_hold_test():
    """`held_max_slack` (the diagnostic of benchmarks/attention_hold.py) against numpy: per tile of block_q query
    rows, the largest |q_i|·max|k| - max over the first block_kv keys of q_i·k_j, in log2 units (ragged T: the last
    tile's missing rows do not count); unit-normal q and k pass the kernel's test, q x 16 fails it."""
    cfg = MgpuConfig(block_q=64, block_kv=192, frozen_max=True, chained=True)
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 150, 3, 64)).astype(np.float32) * np.array([1.0, 3.0, 0.5])[:, None]
    k = rng.normal(size=(2, 400, 3, 64)).astype(np.float32)
    got = np.asarray(flash_mgpu.held_max_slack(jnp.asarray(q), jnp.asarray(k), cfg))
    c = flash_mgpu.LOG2_E / np.sqrt(64)
    bound = np.linalg.norm(q, axis=-1) * np.linalg.norm(k, axis=-1).max(axis=1)[:, None, :] * c
    m0 = np.einsum("btnh,bsnh->btns", q, k[:, :192]).max(axis=-1) * c
    slack = bound - m0  # (B, T, N)
    want = np.stack([slack[:, i:i + 64].max(axis=1) for i in range(0, 150, 64)], axis=-1)  # (B, N, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    limit = flash_mgpu.FROZEN_MAX_SLACK
    q_unit, k_unit = (jnp.asarray(rng.normal(size=(1, 512, 2, 128)), jnp.float32) for _ in range(2))
    assert (np.asarray(flash_mgpu.held_max_slack(q_unit, k_unit)) <= limit).all()
    assert (np.asarray(flash_mgpu.held_max_slack(16 * q_unit, k_unit)) > limit).all()


def test_mgpu_log_sum_exp_only_in_exact_mode():
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="return_lse only in exact mode"):
        flash_attention_mgpu(q, q, q, int8_qk=True, return_lse=True)


@pytest.mark.parametrize("config", [MgpuConfig(), flash_mgpu.SHORT_KV_CONFIG], ids=["pingpong", "overlap"])
@pytest.mark.parametrize("S, kv_len", [(128, False), (300, True)], ids=["one_block", "kv_len"])
def test_mgpu_kernel_with_key_bias_lowers_for_cuda(config, S, kv_len):
    """A (B, S) key_bias (folded text padding) read once into shared memory, in TMA boxes of <= 256 keys."""
    fn = lambda q, k, v, l: flash_attention_mgpu(q, k, v, l, key_bias=jnp.linspace(0.0, 1.0, 2 * S).reshape(2, S),
                                                 config=config)
    module = _export(fn, "cuda", 2, 1000, S, 2, 128, kv_len)
    assert "mosaic_gpu" in module


def test_mgpu_kernel_refuses_a_key_bias_it_cannot_take():
    q, k = jnp.zeros((1, 64, 1, 128), jnp.bfloat16), jnp.zeros((1, 2048, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="key_bias only in exact mode with at most 1024 keys, got 2048"):
        flash_attention_mgpu(q, k, k, key_bias=jnp.zeros((1, 2048)))
    with pytest.raises(ValueError, match="key_bias only in exact mode"):
        flash_attention_mgpu(q, q, q, key_bias=jnp.zeros((1, 64)), int8_qk=True)


@pytest.mark.parametrize("config", [MgpuConfig(block_kv=192), MgpuConfig(block_kv=128, overlap=True, pingpong=False),
                                    MgpuConfig(block_kv=192, cluster=2)],
                         ids=["pingpong192", "overlap128", "cluster2"])
@pytest.mark.parametrize("kv_len", [False, True], ids=["full", "kv_len"])
def test_mgpu_kernel_with_int8_qk_lowers_for_cuda(config, kv_len):
    """S = Q Kᵀ on int8 tensor cores from per-block quantized q, k; per-block scales read in the kernel."""
    module = _export(lambda q, k, v, l: flash_attention_mgpu(q, k, v, l, config=config, int8_qk=True), "cuda",
                     2, 1000, 777, 2, 128, kv_len)
    assert "mosaic_gpu" in module


@pytest.mark.parametrize("kv_len", [False, True], ids=["full", "kv_len"])
def test_mgpu_kernel_with_int8_qk_and_fp8_pv_lowers_for_cuda(kv_len):
    """+ O = P V on fp8 tensor cores: P packed into wgmma's 8-bit register layout (inline PTX), V transposed."""
    module = _export(lambda q, k, v, l: flash_attention_mgpu(q, k, v, l, int8_qk=True, fp8_pv=True), "cuda",
                     2, 1000, 777, 2, 128, kv_len)
    assert "mosaic_gpu" in module
    assert "cvt.rn.satfinite.e4m3x2.f32" in module


def test_mgpu_kernel_refuses_what_it_cannot_run():
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="inputs of one dtype"):
        flash_mgpu.flash_attention_mgpu(q, q, q.astype(jnp.float16))
    with pytest.raises(ValueError, match="with int8 q/k supports head_dim 128"):
        flash_mgpu.flash_attention_mgpu(q[..., :64], q[..., :64], q[..., :64], int8_qk=True)
    with pytest.raises(ValueError, match="fp8_pv needs int8_qk"):
        flash_mgpu.flash_attention_mgpu(q, q, q, fp8_pv=True)
    with pytest.raises(ValueError, match="cluster must be 1, 2 or 4"):
        MgpuConfig(cluster=3)
    with pytest.raises(ValueError, match="128-key blocks"):
        flash_mgpu.flash_attention_mgpu(q, q, q, int8_qk=True, fp8_pv=True, config=MgpuConfig(block_kv=192))


def _abstract_device(kind, platform):
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out_and_lse"])
def test_triton_kernel_lowers_for_cuda(return_lse):
    fn = functools.partial(flash_attention_triton, return_lse=return_lse)
    with _abstract_device("NVIDIA H100", "gpu"):
        module = _export(fn, "cuda", 1, 1000, 777, 2, 128, True)
    assert "xla.gpu.triton" in module


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out_and_lse"])
def test_tpu_kernel_lowers_for_tpu(return_lse):
    fn = functools.partial(flash_attention_tpu, return_lse=return_lse)
    with _abstract_device("TPU v5p", "tpu"):
        module = _export(fn, "tpu", 1, 1000, 777, 2, 128, True)
    assert "tpu_custom_call" in module


def test_default_config_by_key_length():
    assert flash_mgpu.default_config(75600) == flash_mgpu.LONG_KV_CONFIG
    assert flash_mgpu.default_config(75600, int8_qk=True) == flash_mgpu.LONG_KV_INT8_CONFIG
    assert flash_mgpu.default_config(512) == flash_mgpu.SHORT_KV_CONFIG
    assert attention_benchmark.LONG_KV_FROM == flash_mgpu.LONG_KV_FROM  # the benchmark's key-length classes
