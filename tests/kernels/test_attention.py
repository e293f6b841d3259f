"""Attention kernels on CPU: our Pallas kernels in interpret mode, splash interpreted, and the dispatcher,
each against a float64 numpy reference on fresh random inputs (the seed is in every failure message).

Tolerances are relative L2 against float64 on the same (rounded) inputs: bfloat16 1e-2 (observed ~2e-3:
output rounding plus P rounded to bf16 before P·V), float16 2e-3 (observed ~3e-4), float32 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.attention import reference_f64
from sdjax.kernels import attention_table
from sdjax.kernels.attention import (
    BACKENDS,
    KEY_BIAS_BACKENDS,
    AttentionBackendError,
    attention,
    available_backends,
    choose_backend,
)
from sdjax.kernels.flash_pallas import flash_attention_tpu, flash_attention_triton
from sdjax.kernels.splash import splash_attention

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 1e-5}


def random_qkv(B, T, S, N, H, dtype):
    seed = int(np.random.SeedSequence().entropy % 2**32)  # fresh inputs every run, reproducible on failure
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, N, H)), dtype) for L in (T, S, S))
    return seed, q, k, v


def check(out, q, k, v, kv_len, seed, tol):
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), f"non-finite output (seed {seed})"
    ref = reference_f64(q, k, v, None if kv_len is None else np.asarray(kv_len))
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < tol, f"rel L2 {err:.2e} >= {tol} (seed {seed})"
    return err


# (B, T, S, N, H, kv_len): ragged lengths (not block multiples), cross-attention (T != S), kv_len masking,
# a q length below one block, and kv_len inside the first key block.
CASES = [
    (1, 100, 77, 2, 64, None),
    (2, 70, 150, 2, 128, [150, 33]),
    (1, 33, 200, 1, 128, None),
    (2, 130, 96, 2, 64, [5, 96]),
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_interpret_matches_f64(case, dtype):
    B, T, S, N, H, kv = case
    seed, q, k, v = random_qkv(B, T, S, N, H, dtype)
    kv_len = None if kv is None else jnp.asarray(kv)
    out = flash_attention_triton(q, k, v, kv_len, block_q=32, block_k=32, interpret=True)
    check(out, q, k, v, kv, seed, TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", CASES[:2])
def test_tpu_kernel_interpret_matches_f64(case, dtype):
    B, T, S, N, H, kv = case
    seed, q, k, v = random_qkv(B, T, S, N, H, dtype)
    kv_len = None if kv is None else jnp.asarray(kv)
    out = flash_attention_tpu(q, k, v, kv_len, block_q=128, block_k=128, interpret=True)
    check(out, q, k, v, kv, seed, TOL[dtype])


def test_tpu_kernel_several_key_blocks_interpret():
    """Key blocks past kv_len are skipped and their index clamped; the carry spans several blocks."""
    seed, q, k, v = random_qkv(1, 130, 300, 1, 64, jnp.bfloat16)
    out = flash_attention_tpu(q, k, v, jnp.asarray([260]), block_q=128, block_k=128, interpret=True)
    check(out, q, k, v, [260], seed, TOL[jnp.bfloat16])


@pytest.mark.parametrize("kernel", ["triton", "tpu"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]])
def test_portable_kernels_return_the_log_sum_exp(kernel, case):
    """`return_lse`: each row's log-sum-exp of its (unmasked) logits, (B, T, N) fp32 — ring attention's merge
    statistic — within 1e-5 (absolute) of float64's on the same rounded inputs; the output is unchanged."""
    B, T, S, N, H, kv = case
    seed, q, k, v = random_qkv(B, T, S, N, H, jnp.bfloat16)
    kv_len = None if kv is None else jnp.asarray(kv)
    if kernel == "triton":
        run = lambda **kw: flash_attention_triton(q, k, v, kv_len, block_q=32, block_k=32, interpret=True, **kw)
    else:
        run = lambda **kw: flash_attention_tpu(q, k, v, kv_len, block_q=128, block_k=128, interpret=True, **kw)
    out, lse = run(return_lse=True)
    assert lse.shape == (B, T, N) and lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(run(), np.float32))
    _, ref_lse = reference_f64(q, k, v, kv, return_lse=True)
    err = np.abs(np.asarray(lse, np.float64) - ref_lse).max()
    assert err < 1e-5, f"lse max abs err {err:.2e} (seed {seed})"


def test_splash_interpret_matches_f64():
    seed, q, k, v = random_qkv(2, 70, 300, 2, 128, jnp.bfloat16)
    out = splash_attention(q, k, v, jnp.asarray([300, 33]), block_q=128, block_kv=128, interpret=True)
    check(out, q, k, v, [300, 33], seed, TOL[jnp.bfloat16])


# ------------------------------------------------------------------------------------------ dispatcher


@pytest.mark.parametrize("backend", ["xla", "pallas", "pallas_triton", "auto"])
def test_dispatch_backends_on_cpu_match_f64(backend):
    seed, q, k, v = random_qkv(2, 50, 70, 2, 64, jnp.bfloat16)
    kv = [70, 9]
    out = attention(q, k, v, kv_len=jnp.asarray(kv), backend=backend)
    check(out, q, k, v, kv, seed, TOL[jnp.bfloat16])


def test_xla_float32_is_tight():
    seed, q, k, v = random_qkv(1, 3000, 40, 2, 32, jnp.float32)  # > one 2048-query chunk
    err = check(attention(q, k, v, backend="xla"), q, k, v, None, seed, TOL[jnp.float32])
    assert err < 1e-5


def test_kv_len_is_clipped_to_at_least_one_key():
    seed, q, k, v = random_qkv(1, 20, 30, 1, 64, jnp.bfloat16)
    for backend in ("xla", "pallas"):
        out = attention(q, k, v, kv_len=jnp.asarray([0]), backend=backend)
        check(out, q, k, v, [1], seed, TOL[jnp.bfloat16])


def test_cpu_backends_and_auto():
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert available_backends(q) == ["xla", "pallas", "pallas_triton"]
    assert choose_backend(q, q) == "xla"  # nothing measured on CPU: the unmeasured order says xla
    assert set(BACKENDS) == {"auto", "xla", "cudnn", "pallas", "pallas_mgpu", "pallas_mgpu_int8",
                             "pallas_mgpu_int8_fp8", "pallas_triton", "splash"}


@pytest.mark.parametrize(("backend", "dtype", "H", "message"), [
    ("cudnn", jnp.bfloat16, 64, "needs a GPU"),
    ("pallas_mgpu", jnp.bfloat16, 64, "needs an sm_90"),
    ("pallas_mgpu_int8", jnp.bfloat16, 128, "needs an sm_90"),
    ("pallas_mgpu_int8_fp8", jnp.bfloat16, 128, "needs an sm_90"),
    ("splash", jnp.bfloat16, 64, "needs a TPU"),
    ("pallas", jnp.float32, 64, "needs bfloat16 or float16"),
    ("pallas_triton", jnp.bfloat16, 96, "head_dim 64 and 128"),
    ("flash3", jnp.bfloat16, 64, "unknown; allowed: auto, xla"),
])
def test_unsupported_inputs_raise_clear_errors(backend, dtype, H, message):
    q = jnp.zeros((1, 8, 2, H), dtype)
    with pytest.raises(AttentionBackendError, match=message):
        attention(q, q, q, backend=backend)


def test_bad_shapes_and_kv_len_raise():
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\(B, T, N, H\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="incompatible shapes"):
        attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="kv_len must be an integer array of shape"):
        attention(q, q, q, kv_len=jnp.asarray([1.0]))
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, q.astype(jnp.float16), q)
    with pytest.raises(ValueError, match=r"k_norms must have shape \(B, N\) = \(1, 2\)"):
        attention(q, q, q, k_norms=jnp.ones((1, 8)))


# ------------------------------------------------------------------------------------------ auto table


def _row(device_kind, T, S, N, ms, dtype="bfloat16", kv_len=False, key_bias=False):
    return {"device_kind": device_kind, "platform": "gpu", "arch": "9.0", "shape": "x", "dtype": dtype,
            "head_dim": 128, "B": 1, "T": T, "S": S, "N": N, "kv_len": kv_len, "ms": ms,
            **({"key_bias": True} if key_bias else {})}


def test_ranking_picks_nearest_measured_shape_fastest_first():
    rows = [_row("NVIDIA H100 80GB HBM3", 32760, 32760, 12, {"cudnn": 11.0, "pallas_mgpu": 10.0, "xla": 40.0}),
            _row("NVIDIA H100 80GB HBM3", 32760, 512, 12, {"cudnn": 0.2, "pallas_mgpu": 0.3, "xla": None})]
    common = dict(platform="gpu", arch="9.0", dtype="bfloat16", head_dim=128, B=1, N=12, has_kv_len=False,
                  rows=rows)
    assert attention_table.ranking(device_kind="NVIDIA H100 80GB HBM3", T=30000, S=30000, **common) == \
        ["pallas_mgpu", "cudnn", "xla"]
    assert attention_table.ranking(device_kind="NVIDIA H100 80GB HBM3", T=32760, S=512, **common) == \
        ["cudnn", "pallas_mgpu"]  # failed (None) backends are not ranked
    # kv_len masking on a self-attention-sized call still ranks by the nearest self-attention row
    assert attention_table.ranking(device_kind="NVIDIA H100 80GB HBM3", T=32760, S=32760,
                                   **{**common, "has_kv_len": True})[0] == "pallas_mgpu"
    # another Hopper card falls back to rows of the same architecture; another platform gets nothing
    assert attention_table.ranking(device_kind="NVIDIA H200", T=75600, S=75600, **common)[0] == "pallas_mgpu"
    assert attention_table.ranking(device_kind="TPU v5p", **{**common, "platform": "tpu", "arch": ""},
                                   T=100, S=100) == []


def test_ranking_with_a_key_bias_uses_the_rows_measured_with_one():
    """A bias costs backends differently (cuDNN reads a materialized (B, 1, T, S) one): calls with a key_bias rank
    by the rows measured with one, calls without by the others, even where the other kind is nearer or of this
    very card."""
    rows = [_row("NVIDIA H200", 32760, 128, 12, {"cudnn": 0.11, "pallas_mgpu": 0.14}),
            _row("NVIDIA H100 80GB HBM3", 32760, 512, 12, {"cudnn": 0.27, "pallas_mgpu": 0.16, "xla": 1.0},
                 key_bias=True)]
    common = dict(device_kind="NVIDIA H200", platform="gpu", arch="9.0", dtype="bfloat16", head_dim=128,
                  B=1, T=32760, S=128, N=12, has_kv_len=False, rows=rows)
    # a biased row of another card of the architecture beats this card's unbiased one, and the other way round
    assert attention_table.ranking(**common, has_key_bias=True) == ["pallas_mgpu", "cudnn", "xla"]
    assert attention_table.ranking(**common) == ["cudnn", "pallas_mgpu"]
    assert attention_table.ranking(**{**common, "device_kind": "NVIDIA H100 80GB HBM3"}) == ["cudnn", "pallas_mgpu"]
    # no biased row measured at all: the unbiased ones still rank
    assert attention_table.ranking(**{**common, "rows": rows[:1]}, has_key_bias=True) == ["cudnn", "pallas_mgpu"]


def test_measured_table_rows_are_well_formed():
    for row in attention_table.MEASUREMENTS:
        assert {"device_kind", "platform", "arch", "dtype", "head_dim", "B", "T", "S", "N", "kv_len",
                "ms"} <= set(row)
        if row.get("key_bias"):
            assert set(row["ms"]) <= set(KEY_BIAS_BACKENDS)
        assert set(row["ms"]) <= set(BACKENDS) - {"auto", "pallas"}


def test_auto_is_traceable_under_jit():
    seed, q, k, v = random_qkv(1, 40, 40, 2, 64, jnp.bfloat16)
    out = jax.jit(lambda q, k, v: attention(q, k, v))(q, k, v)
    check(out, q, k, v, None, seed, TOL[jnp.bfloat16])


def _exact(q, k, v):
    s = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") / jnp.sqrt(q.shape[-1])
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v, precision="highest")


def test_int8_qk_quantization_is_close_and_ignores_a_common_key_offset():
    """What the int8 kernel computes (exact attention of its dequantized q, k) against exact attention: within 2%
    on random data, and a large offset shared by every key (the bias real models have) costs nothing extra —
    the smoothing removes it before the rounding."""
    from sdjax.kernels.flash_mgpu import dequantized_qk_int8, quantize_qk_int8

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    B, T, S, N, H = 1, 300, 500, 2, 64
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, S, N, H), jnp.float32)
    v = jax.random.normal(kv, (B, S, N, H), jnp.float32)
    exact = _exact(q, k, v)
    err = lambda out: float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
    plain = err(_exact(*dequantized_qk_int8(q, k, 64, 128), v))
    shifted = err(_exact(*dequantized_qk_int8(q, k + 20.0 * jax.random.normal(kv, (1, 1, N, H)), 64, 128), v))
    assert plain < 2e-2 and shifted < 2e-2
    q8, k8, q_scale, k_scale = quantize_qk_int8(q, k, 64, 128)
    assert (q8.dtype, k8.dtype, q_scale.shape, k_scale.shape) == (jnp.int8, jnp.int8, (B, N, 384), (B, 4, N))
    assert quantize_qk_int8(q, k, 64, 128, cluster=4)[2].shape == (B, N, 512)  # whole clusters of 4 CTAs
    # q: one scale a token and head (absmax / 127), heads first, padded with ones to whole 128-row CTAs;
    # k: one a 128-key block and head, the ragged tail (500 = 3 · 128 + 116 keys) included, after the smoothing
    np.testing.assert_allclose(q_scale[0, :, :T], (jnp.abs(q[0]).max(axis=-1) / 127).T, rtol=1e-6)
    np.testing.assert_allclose(q_scale[0, :, T:], 1.0)
    smoothed = k - k.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(k_scale[0, 3], jnp.abs(smoothed[0, 384:]).max(axis=(0, 2)) / 127, rtol=1e-5)
    assert int(jnp.abs(q8).max()) == 127 and int(jnp.abs(k8).max()) == 127


def test_fp8_v_quantization_transposes_and_is_close():
    """`quantize_v_fp8` (the fp8 P V mode): e4m3 V transposed to (B, N, H, keys) in natural key order, keys padded
    to whole 128-key blocks; its values are `dequantized_v_fp8`'s, within e4m3's 2⁻⁴ relative rounding of v."""
    from sdjax.kernels.flash_mgpu import dequantized_v_fp8, quantize_v_fp8

    B, S, N, H = 2, 300, 3, 64
    v = jax.random.normal(jax.random.key(1), (B, S, N, H), jnp.float32).astype(jnp.bfloat16)
    v8, scale = quantize_v_fp8(v)
    assert (v8.dtype, v8.shape, scale.shape) == (jnp.float8_e4m3fn, (B, N, H, 384), (B, N))
    back = np.asarray(v8.astype(jnp.float32) * scale[:, :, None, None])
    deq = np.asarray(dequantized_v_fp8(v))  # (B, S, N, H)
    np.testing.assert_array_equal(back[..., :S], deq.transpose(0, 2, 3, 1))
    assert not back[..., S:].any()  # padded keys are zeros
    vf = np.asarray(v, np.float32)
    assert np.abs(deq - vf).max() <= 2.0**-4 * np.abs(vf).max() and np.linalg.norm(deq - vf) < 0.04 * np.linalg.norm(vf)


def test_fp8_pv_key_order_of_k_undoes_the_register_packing_of_p():
    """In the fp8 P V mode the kernel hands P's accumulator columns to the tensor core in FP8_PV_KEY_ORDER (operand
    position i <- column FP8_PV_KEY_ORDER[i] of each 16). With K stored by `keys_in_fp8_pv_order`, P (as the
    tensor core sees it) times V in natural order is the attention with natural K; masks see the right keys."""
    from sdjax.kernels.flash_mgpu import FP8_PV_KEY_ORDER, fp8_pv_key_of_column, keys_in_fp8_pv_order

    B, S, N, H = 1, 45, 2, 8  # 45 keys: the last 16-group is ragged and padded with zero keys
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (B, 7, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, S, N, H), jnp.float32)
    v = jax.random.normal(kv, (B, S, N, H), jnp.float32)
    stored = np.asarray(keys_in_fp8_pv_order(k))
    assert stored.shape == (B, 48, N, H)
    cols = np.arange(48)
    keys = np.asarray(fp8_pv_key_of_column(jnp.asarray(cols)))
    np.testing.assert_array_equal(keys[:16], np.argsort(FP8_PV_KEY_ORDER))  # the packing's inverse order
    np.testing.assert_array_equal(keys, 16 * (cols // 16) + keys[cols % 16])  # within each 16
    s = np.einsum("btnh,bsnh->bnts", np.asarray(q), stored) / np.sqrt(H)  # the kernel's S: column c is key keys[c]
    s = np.where(keys < S, s, -np.inf)  # the kernel's mask of the last block, on key indices
    p = np.exp(s - s.max(-1, keepdims=True))
    operand = p[..., np.concatenate([16 * g + np.asarray(FP8_PV_KEY_ORDER) for g in range(3)])]
    v_padded = np.pad(np.asarray(v), ((0, 0), (0, 3), (0, 0), (0, 0)))  # natural key order
    got = np.einsum("bnts,bsnh->btnh", operand, v_padded) / operand.sum(-1).transpose(0, 2, 1)[..., None]
    np.testing.assert_allclose(got, _exact(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_key_bias_is_added_to_every_querys_logits(backend):
    """key_bias (B, S): softmax(q kᵀ / sqrt(H) + bias) v, against float64; with kv_len masking too."""
    seed, q, k, v = random_qkv(2, 40, 24, 2, 64, jnp.float32)
    bias = jnp.asarray(np.random.default_rng(seed).uniform(-2, 2, (2, 24)), jnp.float32)
    kv_len = jnp.asarray([24, 10])
    out = np.asarray(attention(q, k, v, kv_len=kv_len, key_bias=bias, backend=backend), np.float64)
    q64, k64, v64, b64 = (np.asarray(a, np.float64) for a in (q, k, v, bias))
    logits = np.einsum("bqnh,bknh->bnqk", q64, k64) / np.sqrt(64) + b64[:, None, None, :]
    logits[1, :, :, 10:] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v64)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5, f"seed {seed}"


def test_key_bias_names_the_backends_that_take_it():
    _, q, k, v = random_qkv(1, 8, 8, 1, 64, jnp.bfloat16)
    with pytest.raises(AttentionBackendError, match="takes no key_bias; those that do: xla, cudnn, pallas_mgpu"):
        attention(q, k, v, key_bias=jnp.zeros((1, 8)), backend="pallas_triton")
    with pytest.raises(AttentionBackendError, match="takes no key_bias"):
        attention(q, k, v, key_bias=jnp.zeros((1, 8)), backend="pallas_mgpu_int8")
    with pytest.raises(ValueError, match=r"key_bias must have shape \(B, S\) = \(1, 8\)"):
        attention(q, k, v, key_bias=jnp.zeros((1, 7)))
