"""Helpers of the GPU benchmarks that can be checked here: the clock/power sampler's parsing and its CPU fallback."""

import pytest

from benchmarks.common import GpuSampler, clock_power_summary


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
