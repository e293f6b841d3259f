"""The multi-device gate (tests/sharding/multidevice/check_*.py), each file in a child pytest whose JAX starts
with 8 CPU devices: the host platform's device count is fixed when JAX starts, so these checks cannot share
the main test process (which keeps its one device)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CHECKS = Path(__file__).parent / "multidevice"


@pytest.mark.parametrize("check", ["check_dit.py", "check_loop.py", "check_vae.py", "check_pipeline.py"])
def test_on_8_cpu_devices(check):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    cmd = [sys.executable, "-m", "pytest", str(CHECKS / check), "-q", "-p", "no:cacheprovider",
           "-o", "python_files=check_*.py"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-12000:]}\n{r.stderr[-4000:]}"
