"""The denoising step: one jitted function of (model, state, per-request values) -> state.

Compiled once per latent shape and CFG on/off. Everything that varies per request — the step index, the
schedule (padded to the model's max steps), the guidance scale, the text embeddings — is a traced value, so
a new step count, shift or guidance never recompiles. The host drives the loop step by step: that is where
progress is reported and cancellation is checked, without forcing a device sync.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdjax.sampling import solvers


class DenoiseState(NamedTuple):
    latents: jax.Array  # (B, C, F, H, W) fp32
    solver: solvers.SolverState


def init_state(solver: str, latents) -> DenoiseState:
    latents = jnp.array(latents, jnp.float32)  # a fresh buffer: the step donates its state
    fresh = lambda a: jnp.array(a, copy=True)  # the solver's zero histories must not share one donated buffer
    return DenoiseState(latents, jax.tree.map(fresh, solvers.init_state(solver, latents)))


def guided_velocity(model, latents, timestep, cond, uncond, guidance, do_cfg: bool):
    """v = v_u + g (v_c - v_u), both branches in one batched forward (batched CFG)."""
    B = latents.shape[0]
    t = jnp.full((B,), timestep, jnp.float32)
    if not do_cfg:
        return model(latents, t, cond)
    v = model(jnp.concatenate([latents, latents]), jnp.concatenate([t, t]), jnp.concatenate([cond, uncond]))
    v_cond, v_uncond = v[:B], v[B:]
    return v_uncond + guidance * (v_cond - v_uncond)


@partial(jax.jit, static_argnames=("solver", "do_cfg"), donate_argnames=("state",))
def denoise_step(model, state: DenoiseState, i, schedule: solvers.Schedule, cond, uncond, guidance, *,
                 solver: str, do_cfg: bool) -> DenoiseState:
    """Step i: model velocity (with CFG) at schedule.timesteps[i], then one solver update."""
    v = guided_velocity(model, state.latents, schedule.timesteps[i], cond, uncond, guidance, do_cfg)
    latents, solver_state = solvers.step(solver, schedule, state.solver, i, v, state.latents)
    return DenoiseState(latents, solver_state)
