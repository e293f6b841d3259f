"""The denoising step: one jitted function of (model, state, per-request values) -> state.

Compiled once per latent shape, CFG on/off and cache policy. Everything that varies per request — the step
index, the schedule (padded to the model's max steps), the guidance scale, the text embeddings, the cache
settings (`cache.CachePlan`: threshold, forced steps) — is a traced value, so a new step count, shift,
guidance or threshold never recompiles. The host drives the loop step by step: that is where progress is
reported and cancellation is checked, without forcing a device sync. The feature cache (`sdjax.sampling.cache`)
lives in the state and decides on the device whether the blocks run.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.numerics import GEMM_COMPILER_OPTIONS
from sdjax.sampling import cache as cache_lib
from sdjax.sampling import solvers


class DenoiseState(NamedTuple):
    latents: jax.Array  # (B, C, F, H, W) fp32
    solver: solvers.SolverState
    cache: cache_lib.CacheState | None = None  # None: policy "none"


def init_state(solver: str, latents, policy: str = "none", *, model=None, do_cfg: bool = False,
               max_steps: int | None = None) -> DenoiseState:
    """Fresh state for a loop over `latents`. A cache policy other than "none" needs the `model` (token count,
    width), `do_cfg` (the forward's batch is 2B) and `max_steps` (the padded schedule length)."""
    latents = jnp.array(latents, jnp.float32)  # a fresh buffer: the step donates its state
    fresh = lambda a: jnp.array(a, copy=True)  # the solver's zero histories must not share one donated buffer
    if policy not in cache_lib.POLICIES:
        raise ValueError(f"cache.policy={policy!r} is not allowed: one of {', '.join(cache_lib.POLICIES)}")
    cache = None
    if policy != "none":
        if model is None or max_steps is None:
            raise ValueError(f"cache.policy={policy!r}: init_state needs the model and max_steps")
        batch = latents.shape[0] * (2 if do_cfg else 1)
        cache = cache_lib.init_cache(policy, model, latents.shape, batch, max_steps)
    state = DenoiseState(latents, jax.tree.map(fresh, solvers.init_state(solver, latents)), cache)
    mesh = _mesh_of(model)
    if mesh is not None:  # start replicated on the model's mesh, as every step returns it: one compile, not two
        from sdjax.sharding import put_replicated

        state = jax.tree.map(lambda a: put_replicated(a, mesh), state)
    return state


def _mesh_of(model):
    parallel = getattr(model, "parallel", None)  # set by `sdjax.sharding.shard_transformer`
    return None if parallel is None else parallel.mesh


def _guided(forward, latents, timestep, cond, uncond, guidance, do_cfg: bool):
    """CFG around `forward(latents, t, context, cfg_batch) -> (v, aux)`: both branches in one batched forward,
    which knows it (`cfg_batch=True`: the model then runs block 0's self-attention once for both)."""
    B = latents.shape[0]
    t = jnp.full((B,), timestep, jnp.float32)
    if not do_cfg:
        return forward(latents, t, cond, False)
    context = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)  # arrays or `FoldedText`s
    v, aux = forward(jnp.concatenate([latents, latents]), jnp.concatenate([t, t]), context, True)
    v_cond, v_uncond = v[:B], v[B:]
    return v_uncond + guidance * (v_cond - v_uncond), aux


def guided_velocity(model, latents, timestep, cond, uncond, guidance, do_cfg: bool):
    """v = v_u + g (v_c - v_u), both branches in one batched forward (batched CFG)."""
    forward = lambda x, t, c, cfg_batch: (model(x, t, c, cfg_batch=cfg_batch), None)
    return _guided(forward, latents, timestep, cond, uncond, guidance, do_cfg)[0]


@partial(jax.jit, static_argnames=("solver", "do_cfg", "policy"), donate_argnames=("state",),
         compiler_options=GEMM_COMPILER_OPTIONS)
def denoise_step(model, state: DenoiseState, i, schedule: solvers.Schedule, cond, uncond, guidance,
                 plan: cache_lib.CachePlan | None = None, *, solver: str, do_cfg: bool,
                 policy: str = "none") -> DenoiseState:
    """Step i: model velocity (with CFG, through the cache `policy`) at schedule.timesteps[i], then one solver
    update. `plan` holds the request's cache settings (`cache.make_plan`; None for "none")."""
    if policy == "none":
        v = guided_velocity(model, state.latents, schedule.timesteps[i], cond, uncond, guidance, do_cfg)
        new_cache = state.cache
    else:
        if state.cache is None or plan is None:
            raise ValueError(f"cache.policy={policy!r}: the state needs a cache (init_state(..., policy)) and "
                             "the step a plan (cache.make_plan)")
        forward = lambda x, t, c, cfg_batch: cache_lib.forward(model, policy, x, t, c, state.cache, plan, i,
                                                               cfg_batch=cfg_batch)
        v, new_cache = _guided(forward, state.latents, schedule.timesteps[i], cond, uncond, guidance, do_cfg)
    latents, solver_state = solvers.step(solver, schedule, state.solver, i, v, state.latents)
    new = DenoiseState(latents, solver_state, new_cache)
    mesh = _mesh_of(model)
    if mesh is not None:  # the state's sharding must not change between steps (else a second compile)
        new = jax.lax.with_sharding_constraint(new, NamedSharding(mesh, P()))
    return new
