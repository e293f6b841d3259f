"""float32 is the parity mode: every matmul / convolution of every model asks for full fp32 precision (no TF32 on
GPUs), and bf16 mode leaves the choice to the backend. Checked on the lowered programs (precision has no effect
on a CPU, so the program text is what can be checked here)."""

import re

import jax
import jax.numpy as jnp
import pytest

from sdjax.models.umt5 import load_text_encoder
from sdjax.models.wan import load_transformer
from sdjax.models.wan.vae import load_vae
from tests.conftest import FIXTURES

OPS = re.compile(r"stablehlo\.(dot_general|convolution)[^\n]*")


def matmuls(lowered_text: str) -> list[tuple[bool, bool]]:
    """(fp32 operands?, HIGHEST asked on both?) per dot_general / convolution of the lowered program."""
    out = []
    for line in (m.group(0) for m in OPS.finditer(lowered_text)):
        operands = line.rsplit(": (", 1)[-1].split(") ->")[0]
        out.append(("bf16" not in operands and "f16" not in operands, line.count("HIGHEST") == 2))
    return out


def lowered(name: str, dtype: str) -> str:
    if name == "dit":
        m = load_transformer(FIXTURES / "wan_dit" / "heads3_b2", dtype=dtype)
        args = (jnp.zeros((1, m.config.in_channels, 2, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 4, m.config.text_dim)))
        return jax.jit(lambda m, *a: m(*a)).lower(m, *args).as_text()
    if name == "umt5":
        m = load_text_encoder(FIXTURES / "umt5_tiny", dtype=dtype)
        ids, mask = jnp.ones((1, 6), jnp.int32), jnp.ones((1, 6), bool)
        return jax.jit(lambda m, i, k: m(i, k)).lower(m, ids, mask).as_text()
    m = load_vae(FIXTURES / "wan_vae_tiny", dtype=dtype)
    z = jnp.zeros((1, m.config.z_dim, 2, 4, 4))
    return jax.jit(lambda m, z: m.decode(z)).lower(m, z).as_text()


@pytest.mark.parametrize("name", ["dit", "umt5", "vae"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp32_matmuls_ask_for_full_precision_and_bf16_ones_do_not(name, dtype):
    ops = matmuls(lowered(name, dtype))
    assert ops and all(f32 == highest for f32, highest in ops), ops
    if dtype == "float32":
        assert all(f32 for f32, _ in ops)
    else:  # most of the work is bf16 (the DiT keeps its time path and head in fp32 on purpose)
        assert sum(not f32 for f32, _ in ops) > len(ops) / 2
