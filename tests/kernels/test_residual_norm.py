"""residual_norm: the stream update and the next LayerNorm in one pass (and modulated_norm, the LayerNorm alone),
against a float64 reference.

The Pallas kernel runs in interpret mode here (its Triton lowering needs a GPU: benchmarks/residual_norm.py checks
it there against XLA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.kernels.residual_norm import modulated_norm, modulated_norm_pallas, residual_norm, residual_norm_pallas

EPS = 1e-6


def inputs(B, L, D, x_dtype=jnp.bfloat16, gate=True, per_batch=True, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = (4 * jax.random.normal(ks[0], (B, L, D)) + 1.5).astype(x_dtype)  # an offset: the mean matters
    y = jax.random.normal(ks[1], (B, L, D)).astype(jnp.bfloat16)
    y_bias = (0.2 * jax.random.normal(ks[2], (D,))).astype(jnp.bfloat16)
    g = jax.random.normal(ks[3], (B, D)) if gate else None
    shape = (B, D) if per_batch else (D,)
    return x, y, y_bias, g, 1 + 0.3 * jax.random.normal(ks[4], shape), 0.3 * jax.random.normal(ks[5], shape)


def reference(x, y, y_bias, gate, scale, shift):
    """float64, with x′ rounded to the stream's dtype before the norm reads it (as the model stores it)."""
    f = lambda a: np.asarray(a, np.float64)
    B, _, D = x.shape
    delta = f(y) + f(y_bias)
    if gate is not None:
        delta = delta * f(gate)[:, None]
    x_new = f(jnp.asarray(f(x) + delta, jnp.float32).astype(x.dtype))
    mean = x_new.mean(-1, keepdims=True)
    normed = (x_new - mean) / np.sqrt(((x_new - mean) ** 2).mean(-1, keepdims=True) + EPS)
    scale, shift = (np.broadcast_to(f(v), (B, D))[:, None] for v in (scale, shift))
    return x_new, normed * scale + shift


def check(out, x, y, y_bias, gate, scale, shift):
    x_new, u = out
    ref_x, ref_u = reference(x, y, y_bias, gate, scale, shift)
    assert x_new.dtype == x.dtype and u.dtype == y.dtype and x_new.shape == u.shape == x.shape
    # x′: one rounding of an fp32 sum, so within one ulp of the stream's dtype
    ulp = 2.0 ** -7 if x.dtype == jnp.bfloat16 else 2.0 ** -22
    np.testing.assert_allclose(np.asarray(x_new, np.float64), ref_x, rtol=ulp, atol=1e-6)
    # u: bf16 output of fp32 math
    u = np.asarray(u, np.float64)
    assert np.abs(u - ref_u).max() <= 2.0 ** -7 * np.abs(ref_u).max()
    assert np.linalg.norm(u - ref_u) / np.linalg.norm(ref_u) < 3e-3


@pytest.mark.parametrize("B, L, D, x_dtype, gate, per_batch", [
    (2, 24, 1536, jnp.bfloat16, True, False),   # Wan-1.3B: 3 chunks of 512; the self-attention site (norm2)
    (2, 24, 1536, jnp.bfloat16, False, True),   # the cross-attention site (the FFN's modulated norm)
    (1, 6, 5120, jnp.bfloat16, True, True),     # Wan-14B: 5 chunks of 1,024; 6 tokens: 2-token programs
    (2, 7, 192, jnp.float32, True, True),       # an fp32 stream; 7 tokens: 1-token programs; 3 chunks of 64
])
def test_kernel_matches_float64(B, L, D, x_dtype, gate, per_batch):
    args = inputs(B, L, D, x_dtype, gate, per_batch)
    check(residual_norm_pallas(*args[:4], *(jnp.broadcast_to(v, (B, D)) for v in args[4:]), eps=EPS,
                               interpret=True), *args)


@pytest.mark.parametrize("gate, per_batch", [(True, False), (False, True)])
def test_xla_and_auto_match_float64(gate, per_batch):
    args = inputs(2, 16, 256, gate=gate, per_batch=per_batch, seed=1)
    check(residual_norm(*args, eps=EPS, backend="xla"), *args)
    check(residual_norm(*args, eps=EPS), *args)  # auto: xla on this CPU


def test_kernel_and_xla_agree_to_rounding():
    """Same math, other summation order: x′ bit-identical, u off by at most one bf16 rounding here and there."""
    args = inputs(2, 40, 1536, seed=2)
    B, D = 2, 1536
    k_x, k_u = residual_norm_pallas(*args[:4], *(jnp.broadcast_to(v, (B, D)) for v in args[4:]), eps=EPS,
                                    interpret=True)
    x_x, x_u = residual_norm(*args, eps=EPS, backend="xla")
    np.testing.assert_array_equal(np.asarray(k_x, np.float32), np.asarray(x_x, np.float32))
    diff = np.asarray(k_u, np.float32) != np.asarray(x_u, np.float32)
    assert diff.mean() < 1e-3


@pytest.mark.parametrize("B, L, D, x_dtype", [
    (2, 24, 1536, jnp.bfloat16),  # Wan-1.3B's block start: per-sample (1 + scale), shift
    (1, 6, 5120, jnp.bfloat16),   # Wan-14B's dims
    (2, 7, 192, jnp.float32),     # an fp32 stream; 1-token programs
])
def test_modulated_norm_kernel_and_xla_match_float64(B, L, D, x_dtype):
    x, _, _, _, scale, shift = inputs(B, L, D, x_dtype, seed=3)
    f = lambda a: np.asarray(a, np.float64)
    xf = f(x)
    mean = xf.mean(-1, keepdims=True)
    ref = (xf - mean) / np.sqrt(((xf - mean) ** 2).mean(-1, keepdims=True) + EPS) * f(scale)[:, None] \
        + f(shift)[:, None]
    outs = [modulated_norm_pallas(x, scale, shift, eps=EPS, out_dtype=jnp.bfloat16, interpret=True),
            modulated_norm(x, scale, shift, eps=EPS, out_dtype=jnp.bfloat16, backend="xla")]
    for u in outs:
        assert u.dtype == jnp.bfloat16 and u.shape == x.shape
        u = f(u)
        assert np.abs(u - ref).max() <= 2.0 ** -7 * np.abs(ref).max()
        assert np.linalg.norm(u - ref) / np.linalg.norm(ref) < 3e-3
    assert (f(outs[0]) != f(outs[1])).mean() < 1e-3  # same math, another summation order


def test_bad_inputs_are_named():
    x, y, y_bias, gate, scale, shift = inputs(2, 8, 128)
    with pytest.raises(ValueError, match="residual_norm: .*disagree"):
        residual_norm(x, y[:, :4], y_bias, gate, scale, shift, eps=EPS)
    with pytest.raises(ValueError, match="residual_norm: .*disagree"):
        residual_norm(x, y, y_bias, gate[:1], scale, shift, eps=EPS)
    with pytest.raises(ValueError, match="unknown; allowed: auto, xla, pallas_triton"):
        residual_norm(x, y, y_bias, gate, scale, shift, eps=EPS, backend="cuda")
    with pytest.raises(ValueError, match="pallas_triton.*needs a GPU"):
        residual_norm(x, y, y_bias, gate, scale, shift, eps=EPS, backend="pallas_triton")
    with pytest.raises(ValueError, match="unknown; allowed: auto, xla, pallas_triton"):
        modulated_norm(x, scale, shift, eps=EPS, out_dtype=jnp.bfloat16, backend="cuda")


def test_auto_takes_the_kernel_only_where_it_was_measured_faster(monkeypatch):
    """On a GPU `auto` runs the kernel at Wan-1.3B's 1,536 dims but keeps XLA at 14B's 5,120 (no gain in the
    forward there)."""
    import sdjax.kernels.residual_norm as rn

    used = []
    monkeypatch.setattr(rn, "unsupported_reason", lambda backend, x, y: None)  # as on a GPU
    monkeypatch.setattr(rn, "residual_norm_pallas", lambda x, *args, **kw: used.append(x.shape[-1]) or rn._xla(
        x, *args, kw["eps"]))
    for D in (1536, 5120):
        residual_norm(*inputs(1, 2, D), eps=EPS)
    assert used == [1536]


@pytest.mark.parametrize("case", ["heads3_b2", "heads4_deep"])
def test_the_dit_runs_the_kernel_at_its_three_sites(monkeypatch, case):
    """The bf16 DiT with the kernels (interpreted) at each block's three norms — the block-start norm alone, then
    the two where a sublayer's output joins the stream — gives XLA's output up to rounding, and stays as close to
    diffusers' fp32 output as the bf16 parity test asks (tests/models)."""
    import functools

    import sdjax.kernels.residual_norm as rn
    from sdjax.models.wan import load_transformer
    from tests.conftest import FIXTURES, rel_l2

    io = np.load(FIXTURES / "wan_dit" / case / "io.npz")
    model = load_transformer(FIXTURES / "wan_dit" / case, dtype="bfloat16")
    forward = lambda: np.asarray(jax.jit(lambda m, x, t, c: m(x, t, c))(
        model, jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"])))
    with_xla = forward()
    calls, norm_calls = [], []
    kernel = functools.partial(rn.residual_norm_pallas, interpret=True)
    norm_kernel = functools.partial(rn.modulated_norm_pallas, interpret=True)
    monkeypatch.setattr(rn, "unsupported_reason", lambda backend, x, y: None)  # as on a GPU
    monkeypatch.setattr(rn, "residual_norm_pallas", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    monkeypatch.setattr(rn, "modulated_norm_pallas",
                        lambda *a, **kw: norm_calls.append(a[0].shape) or norm_kernel(*a, **kw))
    with_kernel = forward()
    assert len(calls) == 2 and len(norm_calls) == 1  # traced once: the scan's body has the three sites
    assert rel_l2(with_kernel, with_xla) <= 2e-3
    assert rel_l2(with_kernel, io["output"]) <= 1e-2
