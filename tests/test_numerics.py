"""float32 is the parity mode: every matmul / convolution of every model asks for full fp32 precision (no TF32 on
GPUs), and bf16 mode leaves the choice to the backend. Checked on the lowered programs (precision has no effect
on a CPU, so the program text is what can be checked here)."""

import re

import jax
import jax.numpy as jnp
import pytest

from sdjax.models.umt5 import load_text_encoder
from sdjax.models.wan import load_transformer
from sdjax.models.wan.loading import abstract_transformer
from sdjax.models.wan.transformer import WanTransformerConfig
from sdjax.models.wan.vae import load_vae
from sdjax.numerics import GEMM_COMPILER_OPTIONS
from sdjax.sharding.attention import _xla_block
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
    if name == "ring_block":  # ring attention's XLA path over one K/V block (fp32 on any device)
        q = jnp.zeros((1, 5, 2, 8), dtype)
        return jax.jit(lambda q: _xla_block(q, q, q, jnp.int32(3))).lower(q).as_text()
    m = load_vae(FIXTURES / "wan_vae_tiny", dtype=dtype)
    z = jnp.zeros((1, m.config.z_dim, 2, 4, 4))
    return jax.jit(lambda m, z: m.decode(z)).lower(m, z).as_text()


@pytest.mark.parametrize("name", ["dit", "umt5", "vae", "ring_block"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp32_matmuls_ask_for_full_precision_and_bf16_ones_do_not(name, dtype):
    ops = matmuls(lowered(name, dtype))
    assert ops and all(f32 == highest for f32, highest in ops), ops
    if dtype == "float32":
        assert all(f32 for f32, _ in ops)
    else:  # most of the work is bf16 (the DiT keeps its time path and head in fp32 on purpose)
        assert sum(not f32 for f32, _ in ops) > len(ops) / 2


def test_the_ffn_gelu_keeps_the_form_that_xla_puts_into_the_gemm_epilogue():
    """On GPUs, with `GEMM_COMPILER_OPTIONS`, XLA's GEMM rewriter gives fc1's bias + tanh-GELU to cuBLASLt's
    epilogue only when they are computed in the GEMM's own dtype (no convert between the dot and the GELU). The
    rewrite itself happens on a GPU (benchmarks/dit_step.py counts it); here: the bf16 DiT's program keeps that
    form — fc1's output is bf16, its tanh runs on it in bf16, and nothing widens it to fp32."""
    cfg = WanTransformerConfig(num_attention_heads=2, attention_head_dim=12, ffn_dim=56, num_layers=1, text_dim=32)
    model = abstract_transformer(cfg, "bfloat16")
    args = (jnp.zeros((1, cfg.in_channels, 2, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 4, cfg.text_dim)))
    text = jax.jit(lambda m, *a: m(*a), compiler_options=GEMM_COMPILER_OPTIONS).lower(model, *args).as_text()
    hidden = rf"tensor<1x32x{cfg.ffn_dim}x"  # (B, tokens, ffn_dim): only the FFN's hidden state has this shape
    assert re.findall(rf"stablehlo\.dot_general [^\n]*-> {hidden}(\w+)>", text) == ["bf16"]
    assert re.findall(rf"stablehlo\.tanh [^\n]*: {hidden}(\w+)>", text) == ["bf16"]
    assert not re.search(rf"stablehlo\.convert [^\n]*-> {hidden}f32>", text)


def test_gemm_compiler_options_are_options_this_xla_knows():
    """A misspelt option would fail every jit that runs a model (jax rejects unknown options at compile time)."""
    f = jax.jit(lambda x: x @ x, compiler_options=GEMM_COMPILER_OPTIONS)
    assert float(f(jnp.ones((2, 2)))[0, 0]) == 2.0
