"""Flow-matching solvers: diffusers' UniPC (Wan flow config) and FlowMatchEuler, as pure JAX steps.

Flow convention: `x_σ = (1 − σ)·x0 + σ·ε`, the model predicts `v ≈ ε − x0`, so `x0 = x_σ − σ·v`.

Two solvers, numerically matching diffusers 0.42 (see shared/research/wan.md §5.3-5.4):
- "unipc": `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=s,
  solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")`.
  The model sees integer timesteps `int(σ·1000)` (truncated).
- "euler": `FlowMatchEulerDiscreteScheduler(shift=s)`; `x ← x + (σ_{i+1} − σ_i)·v`; the model sees `σ·1000`.

Everything that depends on the number of steps N and the shift is computed on the host in numpy and packed
in a `Schedule` of arrays; that includes UniPC's per-step scalar coefficients (λ, expm1, the 2×2 solve and
the order rules), emulating torch's float32 scalar arithmetic (to <= 1 ulp). The jitted part, `step`, is then
a handful of element-wise float32 ops on the latents, in diffusers' operation order, whose only per-step
inputs are array reads at a (traced) index `i`. Measured against diffusers (tests/sampling/test_solvers.py):
identical timesteps and sigmas; trajectories within float32 rounding (rel. L2 <= 4e-7 over 50 steps).

One compiled loop for any N and shift: pad every schedule to the same `max_steps` and loop while
`i < schedule.num_steps` (a traced int32), e.g.

    schedule = make_schedule("unipc", num_steps, shift).padded(MAX_STEPS)    # same shapes for every request

    @jax.jit                                                                    # traced once per latent shape
    def denoise(params, schedule, x):
        def body(carry):
            i, x, state = carry
            v = model(params, x, schedule.timesteps[i])
            x, state = step("unipc", schedule, state, i, v, x)
            return i + 1, x, state
        carry = (jnp.int32(0), x, init_state("unipc", x))
        return jax.lax.while_loop(lambda c: c[0] < schedule.num_steps, body, carry)[1]

`step` also treats indices `i >= num_steps` as no-ops (sample and state pass through unchanged), so a
`lax.scan` / `fori_loop` over all `max_steps` gives the same result, at the cost of evaluating the model on
the padded steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SOLVERS = ("unipc", "euler")
NUM_TRAIN_TIMESTEPS = 1000

# Columns of `Schedule.coeffs` (UniPC only; zeros for Euler). Row i holds the scalars of step i: the corrector
# (UniC) that refines the incoming sample with the new x0-prediction, then the predictor (UniP) to σ_{i+1}.
(
    C_ON,  # 1.0 if the corrector runs (every step but the first)
    C_RATIO,  # σ_i / σ_{i-1}
    C_APHI,  # α_i · φ1,  φ1 = expm1(−h),  h = λ_i − λ_{i-1}
    C_AB,  # α_i · B(h),  B(h) = expm1(−h) for bh2
    C_RK,  # r = (λ_{i-2} − λ_{i-1}) / h for order 2, else 1
    C_RHO0,  # ρ_0 for order 2 (weight of the (m_{i-2} − m_{i-1}) / r term), else 0
    C_RHO1,  # ρ_1 for order 2, 0.5 for order 1 (weight of m_i − m_{i-1})
    P_RATIO,  # σ_{i+1} / σ_i
    P_APHI,  # α_{i+1} · φ1,  h = λ_{i+1} − λ_i
    P_AB,  # α_{i+1} · B(h) for order 2, else 0 (the order-2 term is then exactly dropped)
    P_RK,  # r = (λ_{i-1} − λ_i) / h for order 2, else 1
) = range(11)
NUM_COEFFS = 11


class Schedule(NamedTuple):
    """Host-computed sampling schedule (a pytree of arrays), possibly padded to a fixed length M >= N.

    timesteps: (M,) float32, what the model sees at step i (zeros past N).
    sigmas: (M+1,) float32, σ_0 > … > σ_{N-1} > σ_N = 0 (then zeros).
    coeffs: (M, NUM_COEFFS) float32, UniPC per-step scalars (see the C_* / P_* columns); zeros for Euler.
    num_steps: () int32, the real N.
    """

    timesteps: jax.Array | np.ndarray
    sigmas: jax.Array | np.ndarray
    coeffs: jax.Array | np.ndarray
    num_steps: jax.Array | np.ndarray

    def padded(self, max_steps: int) -> Schedule:
        """The same schedule zero-padded to `max_steps` steps, so all requests share one compiled loop."""
        n = len(self.timesteps)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < n:
            raise ValueError(f"max_steps: must be an int >= the schedule length {n}, got {max_steps!r}")
        pad = int(max_steps) - n
        coeffs = np.pad(np.asarray(self.coeffs), ((0, pad), (0, 0)))
        coeffs[n:, [C_RK, P_RK]] = 1  # keeps the (discarded) padded-step arithmetic finite
        return Schedule(
            timesteps=np.pad(np.asarray(self.timesteps), (0, pad)),
            sigmas=np.pad(np.asarray(self.sigmas), (0, pad)),
            coeffs=coeffs,
            num_steps=self.num_steps,
        )


class SolverState(NamedTuple):
    """Carried between steps. For "euler" every field is an empty (0,) array.

    m1, m2: x0-predictions of the previous two steps, m_{i-1} and m_{i-2} (sample shape, float32).
    last_sample: the (corrected) sample the previous predictor started from (sample shape, float32).
    """

    m1: jax.Array
    m2: jax.Array
    last_sample: jax.Array


# ---------------------------------------------------------------------------------------------- host side


def _check_args(solver: str, num_steps: int, shift: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver: must be one of {SOLVERS}, got {solver!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    if (
        isinstance(shift, bool)
        or not isinstance(shift, int | float | np.number)
        or not (math.isfinite(shift) and shift > 0)
    ):
        raise ValueError(f"shift: must be a finite number > 0, got {shift!r}")


def _unipc_sigmas(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """UniPCMultistepScheduler.set_timesteps with use_flow_sigmas (float64 until the final casts)."""
    sigmas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6  # diffusers: avoids log(α = 0) in the first update
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)  # truncation, as torch's .to(int64)
    return timesteps.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _euler_sigmas(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler(shift): the shift is applied at construction (torch float32) and
    again in set_timesteps (numpy float64)."""
    f32 = np.float32
    train = np.array([NUM_TRAIN_TIMESTEPS, 1], f32) / f32(NUM_TRAIN_TIMESTEPS)  # σ_max, σ_min before shift
    train = f32(shift) * train / (f32(1) + f32(shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[1])
    timesteps = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    sigmas = timesteps / NUM_TRAIN_TIMESTEPS
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(f32)
    timesteps = sigmas * f32(NUM_TRAIN_TIMESTEPS)  # float32, as torch computes it
    return timesteps, np.concatenate([sigmas, [f32(0)]]).astype(f32)


def _f32(fn, x: np.float32) -> np.float32:
    """A transcendental function correctly rounded to float32. torch's CPU expm1 agrees; its log (Sleef,
    <= 1 ulp) differs by one ulp for ~8 % of inputs, an effect on the samples below XLA's own rounding."""
    return np.float32(fn(np.float64(x)))


def _solve2_f32(r: np.float32, b1: np.float32, b2: np.float32) -> tuple[np.float32, np.float32]:
    """Solve [[1, 1], [r, 1]] ρ = b in float32 as torch.linalg.solve does on x86 CPU (MKL sgesv: LU with
    partial pivoting, back-substitution multiplying by the pivots' reciprocals, no FMA); checked bit-exact
    against torch 2.13 on random inputs."""
    one = np.float32(1)
    if abs(r) > one:  # rows swapped: L = [[1, 0], [1/r, 1]], U = [[r, 1], [0, 1 − 1/r]]
        l, y1, b_other, u11 = one / r, b2, b1, r
    else:  # L = [[1, 0], [r, 1]], U = [[1, 1], [0, 1 − r]]
        l, y1, b_other, u11 = r, b1, b2, one
    y2 = b_other - l * y1
    rho1 = y2 * (one / (one - l))
    rho0 = (y1 - rho1) * (one / u11)
    return rho0, rho1


def _unipc_coeffs(sigmas: np.ndarray) -> np.ndarray:
    """Per-step UniPC-bh2 scalars, replicating diffusers' `step` (order rules included) in float32."""
    n = len(sigmas) - 1
    f32, one = np.float32, np.float32(1)
    alpha = [one - s for s in sigmas]
    with np.errstate(divide="ignore"):  # σ_N = 0 gives λ_N = +inf, exactly as in torch
        lam = [_f32(np.log, a) - _f32(np.log, s) for a, s in zip(alpha, sigmas, strict=True)]

    def phis(lam_t, lam_s):
        h = lam_t - lam_s
        hh = -h
        h_phi_1 = _f32(np.expm1, hh)  # φ1 = B(h) for bh2
        return h, hh, h_phi_1

    coeffs = np.zeros((n, NUM_COEFFS), f32)
    prev_order = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n):
            row = coeffs[i]
            if i > 0:  # corrector of step i, of the order the previous predictor used
                h, hh, phi1 = phis(lam[i], lam[i - 1])
                row[[C_ON, C_RATIO, C_APHI, C_AB]] = one, sigmas[i] / sigmas[i - 1], alpha[i] * phi1, alpha[i] * phi1
                if prev_order == 2:
                    rk = (lam[i - 2] - lam[i - 1]) / h
                    h_phi_k = phi1 / hh - one
                    b1 = h_phi_k * one / phi1
                    h_phi_k = h_phi_k / hh - f32(0.5)
                    b2 = h_phi_k * f32(2) / phi1
                    row[[C_RK, C_RHO0, C_RHO1]] = (rk, *_solve2_f32(rk, b1, b2))
                else:
                    row[[C_RK, C_RHO0, C_RHO1]] = one, 0, 0.5
            # lower_order_final: order min(2, N − i), and warm-up: at most (steps done so far) + 1.
            order = min(2, n - i, min(i, 2) + 1)
            h, hh, phi1 = phis(lam[i + 1], lam[i])
            row[[P_RATIO, P_APHI]] = sigmas[i + 1] / sigmas[i], alpha[i + 1] * phi1
            if order == 2:
                row[[P_AB, P_RK]] = alpha[i + 1] * phi1, (lam[i - 1] - lam[i]) / h
            else:
                row[[P_AB, P_RK]] = 0, one
            prev_order = order
    if not np.all(np.isfinite(coeffs)):
        raise ValueError(f"num_steps: {n} gives a degenerate UniPC schedule (non-finite coefficients)")
    return coeffs


def make_schedule(solver: str, num_steps: int, shift: float) -> Schedule:
    """Timesteps, sigmas and solver coefficients for `num_steps` steps with flow shift `shift` (host numpy)."""
    _check_args(solver, num_steps, shift)
    num_steps, shift = int(num_steps), float(shift)
    if solver == "unipc":
        timesteps, sigmas = _unipc_sigmas(num_steps, shift)
        coeffs = _unipc_coeffs(sigmas)
    else:
        timesteps, sigmas = _euler_sigmas(num_steps, shift)
        coeffs = np.zeros((num_steps, NUM_COEFFS), np.float32)
    return Schedule(timesteps, sigmas, coeffs, np.asarray(num_steps, np.int32))


# ---------------------------------------------------------------------------------------------- device side


def init_state(solver: str, sample: jax.Array) -> SolverState:
    """Empty solver history for a loop over `sample` (B C F H W); the history is float32."""
    if solver not in SOLVERS:
        raise ValueError(f"solver: must be one of {SOLVERS}, got {solver!r}")
    if solver == "euler":
        empty = jnp.zeros((0,), jnp.float32)
        return SolverState(empty, empty, empty)
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return SolverState(zeros, zeros, zeros)


def _scaled(scale: jax.Array, v: jax.Array) -> jax.Array:
    """`scale · v` as torch computes `float32 0-d tensor * tensor of v's dtype` (checked on CPU, torch 2.13): in
    v's dtype, the scalar rounded to it first. A no-op for float32 v; for a bf16 model output this is one
    bf16 product, as in diffusers on CPU (on CUDA torch may keep the CPU-scalar σ in float32 for UniPC: a
    one-bf16-ulp difference in σ·v, not checked). Returned as float32 for the float32 update that follows."""
    return (scale.astype(v.dtype) * v).astype(jnp.float32)


def step(
    solver: str,
    schedule: Schedule,
    state: SolverState,
    i: jax.Array | int,
    model_output: jax.Array,
    sample: jax.Array,
) -> tuple[jax.Array, SolverState]:
    """One solver step from σ_i to σ_{i+1}: returns (next sample, next state). Pure; `i` may be traced.

    `model_output` is the velocity v predicted at (`sample`, `schedule.timesteps[i]`), any float dtype; the
    update is computed in float32 and the returned sample keeps `sample`'s dtype (diffusers' Euler returns
    the model output's dtype instead: cast the result to it to mirror a bf16 run exactly). Steps with
    `i >= schedule.num_steps` return `sample` and `state` unchanged.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: must be one of {SOLVERS}, got {solver!r}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output: shape {model_output.shape} differs from sample shape {sample.shape}")
    x = sample.astype(jnp.float32)
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    active = i < schedule.num_steps

    if solver == "euler":
        new = x + _scaled(sigma_next - sigma, model_output)
        return jnp.where(active, new, x).astype(sample.dtype), state

    c = schedule.coeffs[i]
    m0 = x - _scaled(sigma, model_output)  # x0-prediction m_i
    m1, m2 = state.m1, state.m2
    # UniC: refine the incoming sample (the predictor's output of step i-1) now that m_i is known. Written in
    # diffusers' operation order; with order 1, ρ_0 = 0 and r = 1 drop the m_{i-2} term exactly.
    res = c[C_RHO0] * ((m2 - m1) / c[C_RK]) + c[C_RHO1] * (m0 - m1)
    corrected = (c[C_RATIO] * state.last_sample - c[C_APHI] * m1) - c[C_AB] * res
    x = jnp.where(c[C_ON] > 0, corrected, x)
    # UniP: predict the sample at σ_{i+1}; with order 1, P_AB = 0 drops the m_{i-1} term exactly.
    new = (c[P_RATIO] * x - c[P_APHI] * m0) - c[P_AB] * (0.5 * ((m1 - m0) / c[P_RK]))

    new_state = SolverState(m1=m0, m2=m1, last_sample=x)
    new_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
    return jnp.where(active, new, sample.astype(jnp.float32)).astype(sample.dtype), new_state
