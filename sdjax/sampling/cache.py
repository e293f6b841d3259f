"""Feature caches inside the jitted denoising step: TeaCache, first-block cache and static step masks.

A cached step still runs the cheap pieces of the model (`embed`, `head`) and replaces the expensive blocks by
a residual saved at the last fully computed step: `blocks(x) ≈ x + residual`. Per policy:

- "none": the plain forward (`loop.denoise_step` does not even enter this module).
- "teacache" (TeaCache, ali-vilab/TeaCache, its Wan2.1 rule): the indicator is the timestep's modulation
  input — the time embedding `temb` (B, D), or the six modulation vectors `e0` (B, 6, D) in the "ret_steps"
  variant. Each step adds `poly(rel_l1(indicator, previous indicator))` to an accumulated distance; the
  blocks are skipped while it stays under the threshold, else computed and the distance reset to 0. The
  previous indicator is updated every step. Forced steps: the first and last ("default"), the first 5
  ("ret_steps").
- "fbcache" (first-block cache, ParaAttention): block 0 always runs; its residual r1 = block0(x) − x is
  compared with r1 at the last fully computed step, `rel_l1 = Σ|r1 − r1_ref| / Σ|r1_ref|`. Under the
  threshold the other blocks are skipped (their cached residual is added), else they run and r1_ref is
  refreshed. Forced: step 0.
- "static": a step mask fixed before the loop. `threshold` τ is the mean interval between computed steps
  after a warm-up of k = ⌈N/10⌉ steps: computed are steps 0..k−1, then k−1 + ⌈jτ⌉ (j = 1, 2, …), and the
  last step. τ <= 1 computes every step; τ = 2 every other step; τ = 1.5 two steps of three. N = 50, τ = 2:
  28 steps computed (1.79× fewer); τ = 3: 20 (2.5×).

For every policy a threshold <= 0 computes every step (the distances are >= 0; TeaCache's polynomial may
go negative, so "< 0" alone would not be enough).

Everything per request is a traced value in a `CachePlan` (threshold, TeaCache polynomial and indicator
choice, the forced-steps mask padded to the model's max steps): changing any of them never recompiles. The
policy name is static (one compiled step per policy). The decision is a `lax.cond` on the device — both
branches compile, one runs — with no host round-trip per step.

CFG (the two branches batched in one forward, batch B' = 2B): every branch keeps its own state (residuals,
reference, accumulated distance: rows of the batched arrays); a batched forward is either computed or
skipped as a whole, so the step is computed when ANY branch asks for it, and then every branch refreshes
its state. This is the conservative choice: each branch is computed at least as often as it would be alone
(quality never below the per-branch rule), and computing the other branch costs nothing extra since it is
in the same forward. For TeaCache the branches see the same timestep, so they always agree anyway.

Parallelism: the decision quantities are reductions over whole global arrays (all tokens, the batch) in a
`jit` program; under GSPMD / `shard_map` (`sdjax.sharding`), XLA reduces across the devices, so the
predicate of `lax.cond` is one global scalar and every device takes the same branch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import CACHE_POLICIES

POLICIES = CACHE_POLICIES  # the user-param list (sdjax.config) is the one list
TEACACHE_VARIANTS = ("default", "ret_steps")

# TeaCache rescale polynomials for Wan2.1 T2V (highest power first), from ali-vilab/TeaCache
# TeaCache4Wan2.1/teacache_generate.py (the same values ship in FastVideo / SGLang `WanTeaCacheParams`).
# "default" rescales the rel. L1 of the time embedding `e`; "ret_steps" that of the modulation `e0`.
TEACACHE_COEFFS = {
    ("1.3b", "default"): (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    ("1.3b", "ret_steps"): (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    ("14b", "default"): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("14b", "ret_steps"): (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
}
# Models without published coefficients (the demo model, test models): the plain relative L1, unrescaled.
IDENTITY_POLY = (0.0, 0.0, 0.0, 1.0, 0.0)
# The default variant per size, as FastVideo / SGLang ship it (1.3B: ret_steps, 14B: default).
TEACACHE_DEFAULT_VARIANT = {"1.3b": "ret_steps", "14b": "default", None: "ret_steps"}
TEACACHE_RET_STEPS = 5  # steps always computed first in the "ret_steps" variant
STATIC_WARMUP_FRACTION = 0.1  # static masks always compute the first ⌈N/10⌉ steps


def model_size(cfg) -> str | None:
    """"1.3b" / "14b" for the published Wan2.1 T2V architectures (`WanTransformerConfig`), else None."""
    return {(1536, 30): "1.3b", (5120, 40): "14b"}.get((cfg.dim, cfg.num_layers))


# ---------------------------------------------------------------------------------------------- host side


class CachePlan(NamedTuple):
    """Per-request cache settings, all traced (a pytree of arrays). M = the padded schedule length.

    threshold: () f32; <= 0 computes every step.
    coeffs: (5,) f32, TeaCache's rescale polynomial, highest power first.
    use_e0: () bool, TeaCache indicator: e0 (ret_steps variant) instead of temb.
    forced: (M,) bool, steps that are always computed (for "static": exactly the computed steps).
    """

    threshold: jax.Array | np.ndarray
    coeffs: jax.Array | np.ndarray
    use_e0: jax.Array | np.ndarray
    forced: jax.Array | np.ndarray


def static_mask(num_steps: int, interval: float) -> np.ndarray:
    """(N,) bool, True = computed: the warm-up steps 0..k−1 (k = ⌈N/10⌉), then steps k−1 + ⌈jτ⌉ (j = 1, 2, …:
    one computed step every τ = `interval` steps on average), and the last step."""
    n = int(num_steps)
    if interval <= 1:
        return np.ones(n, bool)
    k = min(n, max(1, math.ceil(STATIC_WARMUP_FRACTION * n)))
    mask = np.zeros(n, bool)
    mask[:k] = True
    j = 1
    while (i := k - 1 + math.ceil(j * interval - 1e-9)) < n:  # the 1e-9 keeps j·τ = 3.0000000001 at 3
        mask[i] = True
        j += 1
    mask[-1] = True
    return mask


def forced_steps(policy: str, num_steps: int, threshold: float, variant: str) -> np.ndarray:
    """(N,) bool: the steps the policy always computes (step 0 always: no cache exists before it)."""
    n = int(num_steps)
    if policy == "static":
        return static_mask(n, threshold)
    forced = np.zeros(n, bool)
    forced[0] = True
    if policy == "teacache":
        if variant == "ret_steps":
            forced[:TEACACHE_RET_STEPS] = True
        else:
            forced[-1] = True
    return forced


def make_plan(policy: str, threshold: float, num_steps: int, max_steps: int, model_config=None,
              variant: str | None = None) -> CachePlan | None:
    """The traced settings of one request (None for "none"). `model_config` (a `WanTransformerConfig`) picks
    the published TeaCache coefficients; `variant` ("default" | "ret_steps", None: the size's default)."""
    if policy not in POLICIES:
        raise ValueError(f"cache.policy={policy!r} is not allowed: one of {', '.join(POLICIES)}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.number) or not (
            math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"cache.threshold={threshold!r} is not allowed: a finite number >= 0")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < num_steps:
        raise ValueError(f"max_steps: must be an int >= num_steps={num_steps}, got {max_steps!r}")
    if policy == "none":
        return None
    size = None if model_config is None else model_size(model_config)
    variant = TEACACHE_DEFAULT_VARIANT[size] if variant is None else variant
    if variant not in TEACACHE_VARIANTS:
        raise ValueError(f"teacache variant={variant!r} is not allowed: one of {', '.join(TEACACHE_VARIANTS)}")
    coeffs = IDENTITY_POLY if size is None else TEACACHE_COEFFS[size, variant]
    forced = np.ones(int(max_steps), bool)  # padded steps never run; True keeps them trivially "computed"
    forced[:num_steps] = forced_steps(policy, num_steps, float(threshold), variant)
    return CachePlan(threshold=np.float32(threshold), coeffs=np.asarray(coeffs, np.float32),
                     use_e0=np.bool_(variant == "ret_steps"), forced=forced)


# ---------------------------------------------------------------------------------------------- device side


class CacheState(NamedTuple):
    """Carried between steps (rows = the batched forward's batch B', e.g. cond and uncond). Unused: (0,).

    residual: (B', L, D) f32, what the skipped blocks added at the last computed step (fbcache: blocks 1..).
    ref: (B', L, D) f32, fbcache: the first block's residual at the last computed step.
    prev_temb, prev_e0: (B', D), (B', 6, D) f32, teacache: the previous step's indicators.
    acc: (B',) f32, teacache: the accumulated rescaled distance.
    computed: (M,) bool, step i was fully computed (a log, for `summary`).
    metric: (M,) f32, step i's decision quantity, max over the branches (teacache: the accumulated distance
        before any reset; fbcache: the first-block rel. L1; static: 0).
    """

    residual: jax.Array
    ref: jax.Array
    prev_temb: jax.Array
    prev_e0: jax.Array
    acc: jax.Array
    computed: jax.Array
    metric: jax.Array


def init_cache(policy: str, model, latent_shape, batch: int, max_steps: int) -> CacheState | None:
    """Zero cache state for `batch` rows of the forward (2B with batched CFG); None for "none"."""
    if policy not in POLICIES:
        raise ValueError(f"cache.policy={policy!r} is not allowed: one of {', '.join(POLICIES)}")
    if policy == "none":
        return None
    L, D = math.prod(model.token_grid(latent_shape)), model.config.dim
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # a fresh buffer each: the step donates its state
    empty = lambda: zeros(0)
    return CacheState(
        residual=zeros(batch, L, D),
        ref=zeros(batch, L, D) if policy == "fbcache" else empty(),
        prev_temb=zeros(batch, D) if policy == "teacache" else empty(),
        prev_e0=zeros(batch, 6, D) if policy == "teacache" else empty(),
        acc=zeros(batch),
        computed=jnp.zeros((max_steps,), bool),
        metric=zeros(max_steps),
    )


def _rel_l1(a, ref):
    """Σ|a − ref| / Σ|ref| per batch row (B',), fp32; 0 where the reference is all zeros (no cache yet)."""
    axes = tuple(range(1, a.ndim))
    num = jnp.abs(a.astype(jnp.float32) - ref).sum(axes)
    den = jnp.abs(ref).sum(axes)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# The residual stream may be stored in bf16 (`residual_dtype`); the cached residuals stay fp32.
def _minus(a, b):
    return a.astype(jnp.float32) - b.astype(jnp.float32)


def _plus(h, residual):
    return (h.astype(jnp.float32) + residual).astype(h.dtype)


def forward(model, policy: str, latents, timestep, context, cache: CacheState, plan: CachePlan, i,
            cfg_batch: bool = False):
    """`model(latents, timestep, context, cfg_batch)` under the cache policy at step i: returns (velocity, new
    cache).

    Composes the model's pieces: embed → (blocks, or the cached residual) → head.
    """
    x, temb, e0, text, rope = model.embed(latents, timestep, context)
    forced = plan.forced[i] | (plan.threshold <= 0)
    run = lambda h, layers=None: model.run_blocks(h, e0, text, rope, layers=layers, cfg_batch=cfg_batch)

    if policy == "fbcache":
        h1 = run(x, layers=(0, 1))
        r1 = _minus(h1, x)
        metric = _rel_l1(r1, cache.ref)  # (B',)
        compute = forced | jnp.any(metric >= plan.threshold)

        def full(h1, r1, residual, ref):
            out = run(h1, layers=(1, None))
            return out, _minus(out, h1), r1

        def reuse(h1, r1, residual, ref):
            return _plus(h1, residual), residual, ref

        h, residual, ref = jax.lax.cond(compute, full, reuse, h1, r1, cache.residual, cache.ref)
        new = cache._replace(residual=residual, ref=ref)
    elif policy in ("teacache", "static"):
        if policy == "teacache":
            rel = jnp.where(plan.use_e0, _rel_l1(e0, cache.prev_e0), _rel_l1(temb, cache.prev_temb))
            metric = cache.acc + jnp.polyval(plan.coeffs, rel)  # (B',)
            compute = forced | jnp.any(metric >= plan.threshold)
        else:
            metric = jnp.zeros_like(cache.acc)
            compute = plan.forced[i]

        def full(x, residual):
            out = run(x)
            return out, _minus(out, x)

        def reuse(x, residual):
            return _plus(x, residual), residual

        h, residual = jax.lax.cond(compute, full, reuse, x, cache.residual)
        new = cache._replace(residual=residual, acc=jnp.where(compute, 0.0, metric))
        if policy == "teacache":
            new = new._replace(prev_temb=temb.astype(jnp.float32), prev_e0=e0.astype(jnp.float32))
    else:
        raise ValueError(f"cache.policy={policy!r} has no cached forward (one of teacache, fbcache, static)")

    new = new._replace(computed=new.computed.at[i].set(compute), metric=new.metric.at[i].set(jnp.max(metric)))
    return model.head(h, temb, latents.shape), new


def summary(cache: CacheState | None, num_steps: int) -> dict:
    """Host-side counts after the loop (one device→host read): steps computed / skipped, per-step log."""
    n = int(num_steps)
    if cache is None:
        return {"steps_computed": n, "steps_skipped": 0, "computed": [True] * n, "metric": [0.0] * n}
    computed = np.asarray(cache.computed)[:n]
    return {"steps_computed": int(computed.sum()), "steps_skipped": int(n - computed.sum()),
            "computed": computed.tolist(), "metric": np.asarray(cache.metric)[:n].astype(float).tolist()}
