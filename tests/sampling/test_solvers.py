"""sdjax.sampling.solvers against diffusers' UniPC (Wan flow config) and FlowMatchEuler schedulers.

Fixture: tests/fixtures/schedulers/schedulers.npz, made by tools/make_scheduler_fixtures.py (diffusers 0.42.1,
torch 2.13 CPU). Trajectories are driven by the same synthetic velocity on both sides, so a difference is the
solver's alone. Tolerances:
- timesteps: exactly equal; sigmas: max abs <= 1e-7 (they come out identical).
- every intermediate sample (jitted loop, float32): relative L2 ||a-b||/||b|| <= 1e-6 and, against a
  localised error, max abs <= 5e-6 (samples reach |x| ~ 3.3). Measured worst case over all combos:
  Euler rel. L2 5e-8 / max abs 2.4e-7; UniPC rel. L2 3.8e-7 / max abs 2.4e-6 (N = 50, shift 5).
  The schedule scalars agree with torch to <= 1 float32 ulp; the remaining difference is XLA's rounding
  (mul+add contracted into FMA, inexact division). Checked while writing this (not a test): a numpy float32
  op-by-op version of `step` fed torch's own coefficients reproduces diffusers bit for bit.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.sampling import solvers
from sdjax.sampling.solvers import Schedule, init_state, make_schedule, step

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "schedulers" / "schedulers.npz"
MAX_STEPS = 50  # every schedule is padded to this, so one compiled loop serves all (N, shift)
ATOL = 5e-6
RTOL_L2 = 1e-6


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return dict(f)


def _combos(ref_keys):
    """(solver, N, shift, key) for every float32 trajectory in the fixture."""
    out = []
    for k in sorted(ref_keys):
        if k.endswith("_traj") and "_bf16" not in k:
            solver, n, s = k.removesuffix("_traj").split("_")
            out.append((solver, int(n[1:]), float(s[1:]), k.removesuffix("_traj")))
    return out


with np.load(FIXTURE) as _f:
    COMBOS = _combos(_f.files)


def velocity(x, t):
    """The fixture's synthetic velocity (tools/make_scheduler_fixtures.py), float32."""
    t = jnp.asarray(t, jnp.float32)
    return (0.3 * x - 0.05 * (x * x)) + (0.1 - 0.2 * (t / 1000.0))


def _trajectory(solver, schedule, x):
    """All MAX_STEPS samples of a scan over a padded schedule (padded steps are no-ops)."""

    def body(carry, i):
        x, state = carry
        x, state = step(solver, schedule, state, i, velocity(x, schedule.timesteps[i]), x)
        return (x, state), x

    _, xs = jax.lax.scan(body, (x, init_state(solver, x)), jnp.arange(MAX_STEPS))
    return xs


TRAJECTORY = {s: jax.jit(lambda sch, x, s=s: _trajectory(s, sch, x)) for s in solvers.SOLVERS}


def _denoise_while(solver, schedule, x):
    """The loop the module docstring recommends: stops after schedule.num_steps model calls."""

    def body(carry):
        i, x, state = carry
        x, state = step(solver, schedule, state, i, velocity(x, schedule.timesteps[i]), x)
        return i + 1, x, state

    carry = (jnp.int32(0), x, init_state(solver, x))
    return jax.lax.while_loop(lambda c: c[0] < schedule.num_steps, body, carry)[1]


def _assert_close(got, want, where):
    err = np.abs(got - want).max()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= ATOL and rel <= RTOL_L2, f"{where}: max abs {err:.3g}, rel L2 {rel:.3g}"


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("solver,n,shift,key", COMBOS, ids=[c[3] for c in COMBOS])
def test_schedule_matches_diffusers(ref, solver, n, shift, key):
    sch = make_schedule(solver, n, shift)
    assert sch.timesteps.dtype == np.float32 and sch.sigmas.dtype == np.float32
    np.testing.assert_array_equal(sch.timesteps, ref[f"{key}_timesteps"])
    assert sch.sigmas.shape == (n + 1,) and sch.sigmas[-1] == 0
    assert np.abs(sch.sigmas - ref[f"{key}_sigmas"]).max() <= 1e-7
    assert int(sch.num_steps) == n and sch.coeffs.shape == (n, solvers.NUM_COEFFS)


def test_schedule_known_values():
    # wan.md §5.3: diffusers UniPC shift 5, 50 steps; FlowMatchEuler shift 7, 2 steps (diffusers' tiny test).
    sch = make_schedule("unipc", 50, 5.0)
    np.testing.assert_array_equal(sch.timesteps[:6], [999, 995, 991, 987, 982, 978])
    np.testing.assert_array_equal(sch.timesteps[-6:], [407, 359, 305, 244, 175, 96])
    sch = make_schedule("euler", 2, 7.0)
    np.testing.assert_allclose(sch.timesteps, [1000.0, 46.7557], rtol=1e-6)


def test_unipc_order_rules():
    # First and last steps first order (no m_{i-1} term), the corrector off on step 0 only.
    c = make_schedule("unipc", 5, 5.0).coeffs
    np.testing.assert_array_equal(c[:, solvers.C_ON], [0, 1, 1, 1, 1])
    assert (c[[0, 4], solvers.P_AB] == 0).all() and (c[1:4, solvers.P_AB] != 0).all()
    # corrector order = previous predictor order: 1 on steps 1 (after warm-up), 2 afterwards
    np.testing.assert_array_equal(c[1:, solvers.C_RHO0] != 0, [False, True, True, True])
    # last step lands on the x0-prediction: x_N = 0·x + 1·m_{N-1}
    assert c[4, solvers.P_RATIO] == 0 and c[4, solvers.P_APHI] == -1


# ---------------------------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("solver,n,shift,key", COMBOS, ids=[c[3] for c in COMBOS])
def test_trajectory_matches_diffusers(ref, solver, n, shift, key):
    sch = make_schedule(solver, n, shift).padded(MAX_STEPS)
    xs = np.asarray(TRAJECTORY[solver](sch, jnp.asarray(ref["x_init"])))
    want = ref[f"{key}_traj"]
    for i in range(n):
        _assert_close(xs[i], want[i + 1], f"{key} step {i}")
    # padded steps leave the final sample untouched
    np.testing.assert_array_equal(xs[n:], np.broadcast_to(xs[n - 1], xs[n:].shape))


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_one_compilation_for_all_steps_and_shifts(ref, solver):
    traces = []

    def traced(sch, x):
        traces.append(1)  # Python side effect: runs once per trace, never when a compiled version is reused
        return _trajectory(solver, sch, x)

    run = jax.jit(traced)
    for n, shift in [(1, 1.0), (15, 5.0), (50, 3.0), (20, 8.0), (2, 3.0)]:
        key = f"{solver}_n{n}_s{shift:g}"
        xs = np.asarray(run(make_schedule(solver, n, shift).padded(MAX_STEPS), jnp.asarray(ref["x_init"])))
        _assert_close(xs[n - 1], ref[f"{key}_traj"][-1], f"{key} final")
    assert len(traces) == 1, f"traced {len(traces)} times"
    assert run._cache_size() == 1


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_while_loop_stops_at_num_steps(ref, solver):
    denoise = jax.jit(lambda sch, x: _denoise_while(solver, sch, x))
    for n, shift in [(3, 1.0), (20, 8.0), (50, 3.0)]:
        key = f"{solver}_n{n}_s{shift:g}"
        got = np.asarray(denoise(make_schedule(solver, n, shift).padded(MAX_STEPS), ref["x_init"]))
        _assert_close(got, ref[f"{key}_traj"][-1], f"{key} final")
    assert denoise._cache_size() == 1


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_bf16_model_output(ref, solver):
    # diffusers rounds σ·v to bf16 when the model output is bf16; FlowMatchEuler also returns bf16 samples
    # (reproduced here by keeping the latents in the model dtype after the first step).
    key = f"{solver}_n10_s5_bf16"
    sch = make_schedule(solver, 10, 5.0)
    x = jnp.asarray(ref["x_init"])
    state = init_state(solver, x)
    for i in range(10):
        v = velocity(x.astype(jnp.float32), sch.timesteps[i]).astype(jnp.bfloat16)
        x, state = step(solver, sch, state, i, v, x)
        if solver == "euler":
            x = x.astype(jnp.bfloat16)
        _assert_close(np.asarray(x, np.float32), ref[f"{key}_traj"][i + 1], f"{key} step {i}")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args,field",
    [
        (("ddim", 10, 3.0), "solver"),
        (("UniPC", 10, 3.0), "solver"),
        (("unipc", 0, 3.0), "num_steps"),
        (("euler", -2, 3.0), "num_steps"),
        (("unipc", 2.5, 3.0), "num_steps"),
        (("unipc", True, 3.0), "num_steps"),
        (("unipc", 10, 0.0), "shift"),
        (("euler", 10, -1.0), "shift"),
        (("unipc", 10, float("nan")), "shift"),
        (("unipc", 10, float("inf")), "shift"),
        (("unipc", 10, "3"), "shift"),
    ],
)
def test_make_schedule_bad_input(args, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make_schedule(*args)


def test_padded_bad_input():
    sch = make_schedule("unipc", 10, 3.0)
    for bad in (9, 10.0, None):
        with pytest.raises(ValueError, match="^max_steps:"):
            sch.padded(bad)
    padded = sch.padded(10)
    assert isinstance(padded, Schedule) and padded.timesteps.shape == (10,)


def test_step_bad_input():
    x = jnp.zeros((1, 4, 3, 4, 4))
    sch = make_schedule("unipc", 4, 3.0)
    with pytest.raises(ValueError, match="^solver:"):
        init_state("dpm++", x)
    with pytest.raises(ValueError, match="^solver:"):
        step("dpm++", sch, init_state("unipc", x), 0, x, x)
    with pytest.raises(ValueError, match="^model_output:"):
        step("unipc", sch, init_state("unipc", x), 0, x[..., :2], x)
