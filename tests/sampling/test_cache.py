"""Feature caches in the jitted step (sdjax/sampling/cache.py): policies, decisions, CFG, parallelism, compiles.

The model is the tiny random Wan DiT of tests/fixtures/wan_pipeline_tiny (2 layers). It has no published
TeaCache coefficients, so TeaCache uses the plain relative L1 and the ret_steps variant (5 forced steps).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.config import ModelConfig
from sdjax.models.wan.loading import load_transformer
from sdjax.models.wan.transformer import WanTransformerConfig
from sdjax.sampling import cache, loop, solvers
from tests.conftest import FIXTURES, rel_l2

TINY = FIXTURES / "wan_pipeline_tiny"
N, M = 8, 12  # steps, padded schedule length
SHAPE = (1, 8, 2, 8, 10)  # (B, C, F, H, W): 2 x 4 x 5 = 40 tokens


@pytest.fixture(scope="module")
def model():
    return load_transformer(TINY / "transformer", "float32")


@pytest.fixture(scope="module")
def inputs(model):
    text_dim = model.config.text_dim
    latents = jax.random.normal(jax.random.key(0), SHAPE)
    cond = jax.random.normal(jax.random.key(1), (1, 6, text_dim))
    uncond = jax.random.normal(jax.random.key(2), (1, 6, text_dim))
    return latents, cond, uncond


def denoise(model, inputs, policy, threshold=0.0, *, steps=N, do_cfg=True):
    """The pipeline's loop: returns (final latents, cache summary)."""
    latents, cond, uncond = inputs
    schedule = jax.tree.map(jnp.asarray, solvers.make_schedule("unipc", steps, 3.0).padded(M))
    plan = jax.tree.map(jnp.asarray, cache.make_plan(policy, threshold, steps, M, model.config))
    state = loop.init_state("unipc", latents, policy, model=model, do_cfg=do_cfg, max_steps=M)
    for i in range(steps):
        state = loop.denoise_step(model, state, jnp.int32(i), schedule, cond, uncond if do_cfg else cond,
                                  jnp.float32(5.0), plan, solver="unipc", do_cfg=do_cfg, policy=policy)
    return np.asarray(state.latents), cache.summary(state.cache, steps)


def midpoint(values) -> float:
    """A threshold halfway between the two middle values: about half the steps under it, none right at it."""
    v = sorted(values)
    k = len(v) // 2
    return (v[k - 1] + v[k]) / 2


@pytest.fixture(scope="module")
def uncached(model, inputs):
    return denoise(model, inputs, "none")[0]


# ------------------------------------------------------------------------------------------ policy none


def test_none_is_the_uncached_step(model, inputs, uncached):
    """Policy none runs exactly the plain CFG forward + solver step (bitwise)."""
    latents, cond, uncond = inputs
    schedule = jax.tree.map(jnp.asarray, solvers.make_schedule("unipc", N, 3.0).padded(M))

    @jax.jit
    def plain_step(model, x, solver_state, i, schedule, cond, uncond, guidance):
        v = loop.guided_velocity(model, x, schedule.timesteps[i], cond, uncond, guidance, True)
        return solvers.step("unipc", schedule, solver_state, i, v, x)

    x, solver_state = latents, solvers.init_state("unipc", latents)
    for i in range(N):
        x, solver_state = plain_step(model, x, solver_state, jnp.int32(i), schedule, cond, uncond, jnp.float32(5.0))
    np.testing.assert_array_equal(uncached, np.asarray(x))
    assert loop.init_state("unipc", latents).cache is None  # the old two-argument form still works


@pytest.mark.parametrize("policy", ["teacache", "fbcache", "static"])
def test_threshold_zero_skips_nothing(model, inputs, uncached, policy):
    out, stats = denoise(model, inputs, policy, 0.0)
    assert stats["steps_computed"] == N and stats["steps_skipped"] == 0
    assert rel_l2(out, uncached) <= 1e-6  # the same math through embed -> blocks -> head (measured: 0)


# ------------------------------------------------------------------------------------------ large thresholds


@pytest.mark.parametrize("policy, expected", [
    ("teacache", [True] * 5 + [False] * (N - 5)),  # ret_steps variant: the first 5 steps are forced
    ("fbcache", [True] + [False] * (N - 1)),  # only step 0 (no reference before it)
    ("static", [True] + [False] * (N - 2) + [True]),  # warm-up ceil(N/10) = 1, then only the last step
])
def test_large_threshold_skips_what_the_policy_says(model, inputs, uncached, policy, expected):
    out, stats = denoise(model, inputs, policy, 1e9)
    assert stats["computed"] == expected
    assert stats["steps_computed"] == sum(expected) and stats["steps_skipped"] == N - sum(expected)
    assert np.isfinite(out).all() and rel_l2(out, uncached) > 1e-3  # skipping really changed the result


def test_intermediate_threshold_and_its_log(model, inputs):
    """fbcache at a threshold inside the range of its metric: some steps skipped, the log explains them."""
    _, ref = denoise(model, inputs, "fbcache", 0.0)
    tau = midpoint(ref["metric"][1:])
    _, stats = denoise(model, inputs, "fbcache", tau)
    assert 0 < stats["steps_skipped"] < N - 1
    for i in range(1, N):
        assert stats["computed"][i] == (stats["metric"][i] >= tau)


def test_static_mask_reuses_the_residual(model, inputs):
    """A skipped static step is embed -> x + residual of the last computed step -> head (not a stale output)."""
    out, stats = denoise(model, inputs, "static", 2.0)
    assert stats["computed"] == cache.static_mask(N, 2.0).tolist() == [True, False, True, False, True, False,
                                                                          True, True]
    assert np.isfinite(out).all()


@pytest.mark.parametrize("policy", ["teacache", "fbcache", "static"])
def test_a_bf16_residual_stream_caches_like_the_fp32_one(inputs, policy):
    """With the stream stored in bf16 the cached residuals stay fp32: both branches of the step's cond agree, and a
    threshold of 0 is still the uncached step."""
    bf16 = load_transformer(TINY / "transformer", "bfloat16", residual_dtype="bfloat16")
    plain = denoise(bf16, inputs, "none")[0]
    out, stats = denoise(bf16, inputs, policy, 0.0)
    assert stats["steps_skipped"] == 0 and rel_l2(out, plain) <= 1e-6
    out, stats = denoise(bf16, inputs, policy, 1e9)
    assert stats["steps_skipped"] > 0 and np.isfinite(out).all() and rel_l2(out, plain) > 1e-3


# ------------------------------------------------------------------------------------------ CFG


def test_cfg_branches_keep_their_own_state_and_skip_together(model, inputs):
    """Batched CFG: rows of the cache are the branches; the forward is skipped only if every branch says so."""
    latents, cond, uncond = inputs
    x = jnp.concatenate([latents, latents])
    ctx = jnp.concatenate([cond, uncond])
    t0, t1 = jnp.full((2,), 999.0), jnp.full((2,), 990.0)
    plan = jax.tree.map(jnp.asarray, cache.make_plan("fbcache", 0.3, N, M, model.config))
    state = cache.init_cache("fbcache", model, SHAPE, 2, M)
    assert state.residual.shape == state.ref.shape == (2, 40, model.config.dim)
    fwd = jax.jit(lambda s, t, i, th: cache.forward(model, "fbcache", x, t, ctx, s, plan._replace(threshold=th), i))
    _, state = fwd(state, t0, jnp.int32(0), jnp.float32(0.3))
    assert bool(state.computed[0]) and not np.allclose(state.ref[0], state.ref[1])  # per-branch references

    # Step 1 at the same timestep: block 0 reproduces the reference exactly (metric 0 in both branches).
    # Scale branch 1's reference by 2: its rel. L1 becomes |r - 2r| / |2r| = 0.5, branch 0's stays 0.
    r1 = state.ref
    scaled = state._replace(ref=r1.at[1].multiply(2.0))
    _, s = fwd(scaled, t0, jnp.int32(1), jnp.float32(0.3))
    assert bool(s.computed[1]) and s.metric[1] == pytest.approx(0.5, rel=1e-5)  # branch 1 asks: compute
    np.testing.assert_allclose(s.ref, r1, rtol=1e-6)  # both branches refreshed
    _, s = fwd(scaled, t0, jnp.int32(1), jnp.float32(0.6))
    assert not bool(s.computed[1])  # every branch is under 0.6: skip
    np.testing.assert_array_equal(s.ref, scaled.ref)  # references kept (ParaAttention: compare with last full)
    np.testing.assert_array_equal(s.residual, state.residual)
    _, s = fwd(state, t1, jnp.int32(1), jnp.float32(0.0))
    assert bool(s.computed[1])  # threshold 0 never skips


# ------------------------------------------------------------------------------------------ compiles


def test_changing_the_threshold_or_steps_does_not_recompile(model, inputs):
    denoise(model, inputs, "teacache", 0.1, steps=6)
    size = loop.denoise_step._cache_size()
    _, a = denoise(model, inputs, "teacache", 1e9, steps=7)
    _, b = denoise(model, inputs, "teacache", 0.0, steps=6)
    assert loop.denoise_step._cache_size() == size
    assert a["steps_skipped"] == 2 and b["steps_skipped"] == 0


# ------------------------------------------------------------------------------------------ host side


def test_teacache_coefficients_and_forced_steps():
    small = WanTransformerConfig.from_dict(ModelConfig.named("wan2.1-t2v-1.3b").transformer)
    big = WanTransformerConfig.from_dict(ModelConfig.named("wan2.1-t2v-14b").transformer)
    assert cache.model_size(small) == "1.3b" and cache.model_size(big) == "14b"
    p = cache.make_plan("teacache", 0.08, 50, 100, small)  # 1.3B default: ret_steps, e0, 5 forced steps
    np.testing.assert_array_equal(p.coeffs, np.float32([-5.21862437e04, 9.23041404e03, -5.28275948e02,
                                                        1.36987616e01, -4.99875664e-02]))
    assert bool(p.use_e0) and p.forced[:50].tolist() == [True] * 5 + [False] * 45 and p.forced[50:].all()
    p = cache.make_plan("teacache", 0.2, 50, 100, big)  # 14B default: temb, first and last step forced
    assert p.coeffs[0] == np.float32(-5784.54975374) and not bool(p.use_e0)
    assert np.flatnonzero(p.forced[:50]).tolist() == [0, 49]
    p = cache.make_plan("teacache", 0.2, 50, 100, big, variant="ret_steps")
    assert p.coeffs[0] == np.float32(-3.03318725e05) and bool(p.use_e0)
    assert cache.make_plan("none", 0.5, 50, 100, small) is None


@pytest.mark.parametrize("n, tau, computed", [
    (50, 0.0, 50), (50, 1.0, 50), (50, 2.0, 28), (50, 3.0, 20), (10, 1e9, 2), (1, 5.0, 1),
])
def test_static_mask_counts(n, tau, computed):
    mask = cache.static_mask(n, tau)
    assert mask.shape == (n,) and mask.sum() == computed and mask[0] and mask[-1]
    k = max(1, -(-n // 10))
    assert mask[:k].all()


def test_static_mask_fractional_interval():
    # τ = 1.5 after a warm-up of 2 steps (N=20): then 1 + ⌈1.5 j⌉ = 3, 4, 6, 7, ...: two of every three
    mask = cache.static_mask(20, 1.5)
    assert np.flatnonzero(mask).tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19]


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="magcache", threshold=0.1), "cache.policy='magcache'.*teacache"),
    (dict(policy="teacache", threshold=-1.0), "cache.threshold=-1.0.*>= 0"),
    (dict(policy="teacache", threshold=float("nan")), "cache.threshold"),
    (dict(policy="teacache", threshold=0.1, variant="fast"), "variant='fast'"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cache.make_plan(num_steps=10, max_steps=20, **kwargs)


def test_step_without_cache_state_is_a_clear_error(model, inputs):
    latents, cond, _ = inputs
    schedule = jax.tree.map(jnp.asarray, solvers.make_schedule("unipc", 2, 3.0).padded(M))
    with pytest.raises(ValueError, match="cache.policy='fbcache'.*init_state"):
        loop.denoise_step(model, loop.init_state("unipc", latents), jnp.int32(0), schedule, cond, cond,
                          jnp.float32(1.0), None, solver="unipc", do_cfg=False, policy="fbcache")


# ------------------------------------------------------------------------------------------ pipeline


def test_pipeline_reports_steps_computed_and_skipped():
    from sdjax.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    result = pipe("a cat", cache={"policy": "fbcache", "threshold": 1e9}, height=16, width=16, num_frames=1,
                  num_inference_steps=4, seed=0, progress=False)
    assert (result.info["steps_computed"], result.info["steps_skipped"]) == (1, 3)
    assert result.info["params"]["cache"] == {"policy": "fbcache", "threshold": 1e9}
    assert cache.summary(None, 4)["steps_computed"] == 4  # policy none (the model default): all computed


# ------------------------------------------------------------------------------------------ parallelism

MULTI_DEVICE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from tests.sampling.test_cache import TINY, denoise, midpoint
from sdjax.config import SystemConfig
from sdjax.models.wan.loading import load_transformer
from sdjax.sharding import make_mesh, shard_transformer

assert jax.device_count() == 8
one = load_transformer(TINY / "transformer", "float32")
mesh = make_mesh(SystemConfig(cfg_parallel=2, ulysses=2, ring=2))
par = shard_transformer(load_transformer(TINY / "transformer", "float32"), mesh)
text = (1, 6, one.config.text_dim)
inputs = (jax.random.normal(jax.random.key(0), (1, 8, 2, 8, 10)), jax.random.normal(jax.random.key(1), text),
          jax.random.normal(jax.random.key(2), text))
_, ref = denoise(one, inputs, "fbcache", 0.0)
tau = midpoint(ref["metric"][1:])
a, sa = denoise(one, inputs, "fbcache", tau)
b, sb = denoise(par, inputs, "fbcache", tau)
print(json.dumps({"tau": tau, "one": sa, "par": sb, "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a))}))
"""


def test_same_decisions_on_8_devices_as_on_1():
    """cfg 2 x ulysses 2 x ring 2 on 8 fake CPU devices (a subprocess: this one keeps its device count)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    one, par, tau = r["one"], r["par"], r["tau"]
    # the threshold is far from every metric value, so a decision can only differ through a real bug
    margin = min(abs(m - tau) for m in one["metric"][1:])
    assert margin > 1e-4, f"threshold {tau} too close to a metric value ({margin}): pick another"
    assert 0 < one["steps_skipped"] < N - 1
    assert par["computed"] == one["computed"]
    np.testing.assert_allclose(par["metric"], one["metric"], rtol=1e-5, atol=1e-6)
    assert r["rel_l2"] <= 1e-5  # sharded attention sums in another order (measured ~4e-7)
