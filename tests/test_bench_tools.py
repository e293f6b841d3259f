"""Helpers of the GPU benchmarks that can be checked here: the clock/power sampler's parsing and its CPU fallback, the
profile's idle-gap accounting, and how a trace's collective time splits by what runs beside it."""

import dataclasses

import pytest

from benchmarks.common import GpuSampler, clock_power_summary
from benchmarks.profile_step import idle_gaps


def test_clock_power_summary_parses_nvidia_smi_lines():
    text = "1980, 350.12\n1755, 690.5\n[N/A], 400.0\n1545, 70"  # the last line cut short by the sampler's stop
    s = clock_power_summary(text)
    assert s["samples"] == 3  # the [N/A] line is skipped; "1545, 70" is a whole sample
    assert s["sm_clock_MHz"] == pytest.approx((1980 + 1755 + 1545) / 3)
    assert s["sm_clock_MHz_min"] == 1545
    assert s["power_W"] == pytest.approx((350.12 + 690.5 + 70) / 3)
    assert clock_power_summary("") == {}


def test_sampler_without_nvidia_smi_reports_nothing(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no nvidia-smi to start, as on a CPU machine
    with GpuSampler(period_ms=50) as gpu:
        pass
    assert gpu.proc is None and gpu.summary() == {}


def test_dit_step_gpu_columns_name_the_side():
    from benchmarks.dit_step import gpu_columns

    cols = gpu_columns("sdjax", clock_power_summary("1600, 660\n1620, 670"))
    assert cols == {"sdjax_MHz": pytest.approx(1610), "sdjax_W": pytest.approx(665)}
    assert gpu_columns("diffusers", {}) == {}  # no nvidia-smi: no columns, not zeros


def test_idle_gaps_count_only_gaps_inside_a_call():
    # two traced calls of three kernels (name, µs, start µs); the 975 µs between them is the host's, not a gap
    call = [("a", 10.0, 0.0), ("b", 5.0, 12.0), ("c", 5.0, 20.0)]
    kernels = call + [(n, us, ts + 1000.0 + (1.0 if n == "b" else 0.0)) for n, us, ts in call]
    inside, by_next = idle_gaps(kernels, calls=2)
    assert inside == pytest.approx((2 + 3 + 3 + 2) / 2 / 1e3)  # ms a call
    assert by_next["b"] == pytest.approx((2 + 3) / 2 / 1e3) and by_next["c"] == pytest.approx((3 + 2) / 2 / 1e3)
    # overlapping kernels (two streams) leave no gap
    assert idle_gaps([("x", 10.0, 0.0), ("y", 4.0, 5.0), ("z", 1.0, 10.0)], calls=1)[0] == 0.0


def test_collective_overlap_splits_transfer_time_by_what_runs_beside_it():
    from benchmarks.collective_overlap import overlap

    # one call (name, µs, start µs): a transfer 50-150 beside the attention (0-100) and a GEMM (120-130),
    # another 200-210 alone
    kernels = [("mosaic_gpu_attention", 100.0, 0.0), ("ncclDevKernel_SendRecv", 100.0, 50.0),
               ("sm90_xmma_gemm", 10.0, 120.0), ("ncclDevKernel_AllGather_RING_LL", 10.0, 200.0)]
    r = overlap(kernels, calls=1)
    assert r["collective_ms"] == pytest.approx(0.110)
    assert r["under_compute_ms"] == pytest.approx(0.060) and r["under_attention_ms"] == pytest.approx(0.050)
    assert r["exposed_ms"] == pytest.approx(0.050)
    assert r["attention_ms"] == pytest.approx(0.100) and r["gemm_ms"] == pytest.approx(0.010)
    assert r["top"].startswith("ncclDevKernel_SendRecv 0.1")


def test_attention_bench_kernel_variant_syntax():
    """mgpu:block_q,block_kv,stages,overlap,pingpong[,cluster[,frozen_max[,chained[,tail_split]]]]
    (benchmarks/attention.py, dit_step.py)."""
    from benchmarks.attention import _mgpu_config
    from sdjax.kernels.flash_mgpu import LONG_KV_CONFIG, MgpuConfig

    assert _mgpu_config("mgpu:64,192,2,0,1") == MgpuConfig(block_kv=192)
    assert _mgpu_config("mgpu:64,192,2,0,1,2") == MgpuConfig(block_kv=192, cluster=2)
    assert _mgpu_config("mgpu:64,128,2,0,1,2,1,1") == MgpuConfig(cluster=2, frozen_max=True, chained=True)
    assert _mgpu_config("mgpu:64,128,2,1,0,2,1,1,1") == LONG_KV_CONFIG
    assert _mgpu_config("mgpu:64,128,2,0,0,2,1,1,1") == dataclasses.replace(LONG_KV_CONFIG, overlap=False)
    assert _mgpu_config("mgpu:64,128,3,1,0") == MgpuConfig(block_kv=128, stages=3, overlap=True, pingpong=False)


def test_kernel_power_measures_a_loop_without_nvidia_smi(monkeypatch):
    import jax
    import jax.numpy as jnp

    from benchmarks.kernel_power import measure

    monkeypatch.setenv("PATH", "")  # CPU machine: times only, no clock/power columns
    a = jnp.ones((64, 64), jnp.float32)
    row = measure(jax.jit(lambda a: a @ a), (a,), flop=2 * 64**3, nbytes=0, seconds=0.05)
    assert row["ms"] > 0 and row["TFLOP/s"] == pytest.approx(2 * 64**3 / row["ms"] / 1e9)
    assert "W" not in row and "pJ_per_FLOP" not in row


def test_benchmark_forward_inputs_run_the_model():
    """dit_step.py's and kernel_power.py's forward: random weights, latents, timesteps and text of the case's shape
    (here the embedded demo model's config, small), a CFG batch repeating one latent, folded text."""
    import jax
    import jax.numpy as jnp

    from benchmarks.dit_step import random_forward_inputs
    from sdjax.config import ModelConfig
    from sdjax.models.wan.transformer import WanTransformerConfig

    cfg = WanTransformerConfig.from_dict(ModelConfig.named("sdjax-demo").transformer)
    model, x, t, ctx = random_forward_inputs(cfg, (2, 4, 4), 2, cfg_batch=True, text_len=8)
    assert x.shape == (2, 16, 2, 4, 4) and bool((x[0] == x[1]).all()) and t.shape == (2,)
    assert ctx.shape == (2, 8, cfg.text_dim)
    out = jax.jit(lambda m, x, t, c: m(x, t, c, cfg_batch=True))(model, x, t, ctx)
    assert out.shape == x.shape and bool(jnp.isfinite(out).all())
    assert not bool((out == 0).all())  # random weights, not zeros
