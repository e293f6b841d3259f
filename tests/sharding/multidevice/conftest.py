"""Fixtures of the 8-device checks. These files are named check_*.py so the main test run does not collect
them: test_multidevice.py runs them in a child pytest whose JAX starts with 8 CPU devices. By hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        .venv/bin/pytest tests/sharding/multidevice -o python_files='check_*.py'
"""

import jax
import pytest

from sdjax.config import SystemConfig
from sdjax.models.wan.transformer import WanTransformerConfig
from sdjax.sharding import make_mesh

N_DEVICES = 8
# Wan-1.3B's 12 heads (8 does not divide them), tiny everything else.
CFG12 = WanTransformerConfig(num_attention_heads=12, attention_head_dim=8, ffn_dim=64, num_layers=2, text_dim=16,
                             in_channels=4, out_channels=4, rope_max_seq_len=32)


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    if jax.device_count() != N_DEVICES:
        pytest.fail(f"these checks need {N_DEVICES} devices, JAX sees {jax.device_count()}: run them through "
                    "tests/sharding/test_multidevice.py or with XLA_FLAGS=--xla_force_host_platform_device_count=8")


def layout(name: str) -> SystemConfig:
    """'c2u2r2' -> SystemConfig(cfg_parallel=2, ulysses=2, ring=2) in fp32."""
    from sdjax.bench.sharding import Layout

    lay = Layout.parse(name)
    return SystemConfig(dtype="float32", cfg_parallel=lay.cfg, ulysses=lay.ulysses, ring=lay.ring)


def mesh(name: str):
    return make_mesh(layout(name))
