"""The gate, DiT forward: on 8 CPU devices every layout gives the one-device result (fp32, rel. L2 <= 1e-5),
also loaded onto the mesh from safetensors or Orbax, and the bench reports it. (The loop: check_loop.py.)

The model has 12 heads (Wan-1.3B's count, which 8 does not divide) and 45 tokens (odd: padded and masked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.config import ConfigError, SystemConfig
from sdjax.models.wan import load_transformer
from sdjax.models.wan.transformer import WanTransformer3DModel, fold_text_padding, text_lengths
from sdjax.sharding import make_mesh, sequence_parallel_attention, shard_transformer
from sdjax.sharding.mesh import SEQ
from tests.conftest import FIXTURES, rel_l2
from tests.sharding.multidevice.conftest import CFG12, layout, mesh

DIT = FIXTURES / "wan_dit"
TOL = 1e-5
LAYOUTS = ["c1u8r1", "c1u1r8", "c1u4r2", "c1u2r4", "c2u4r1", "c2u1r4", "c2u2r2"]
FORWARD = jax.jit(lambda m, x, t, c: m(x, t, c))


@pytest.fixture(scope="module")
def model12():
    return WanTransformer3DModel(CFG12, dtype="float32", rngs=nnx.Rngs(0))


def on_mesh(model, name: str, **kwargs):
    """A copy of `model` placed on the mesh of layout `name` (the original stays on one device)."""
    return shard_transformer(nnx.clone(model), mesh(name), **kwargs)


@pytest.fixture(scope="module")
def io12(model12):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 10, 6), dtype=np.float32)  # 3 × 5 × 3 = 45 tokens
    t = np.array([700.0, 300.0], np.float32)
    c = rng.standard_normal((2, 7, 16), dtype=np.float32)
    return x, t, c, np.asarray(FORWARD(model12, x, t, c))


# ------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("name", LAYOUTS)
def test_forward_matches_one_device(name, model12, io12):
    x, t, c, ref = io12
    out = FORWARD(on_mesh(model12, name), x, t, c)
    assert rel_l2(out, ref) <= TOL


@pytest.mark.parametrize("name", ["c1u1r8", "c1u4r2", "c2u2r2"])
def test_ring_kv_all_gathered_matches_one_device(name, model12, io12):
    """kv_exchange="gather": ring's K/V all-gathered and one attention over all keys (padding masked by kv_len)."""
    x, t, c, ref = io12
    model = on_mesh(model12, name, kv_exchange="gather")
    assert model.parallel.kv_exchange == "gather"
    assert rel_l2(FORWARD(model, x, t, c), ref) <= TOL


@pytest.mark.parametrize("name", ["c1u4r2", "c1u1r8", "c2u2r2"])
def test_cfg_batch_on_the_mesh_matches_one_device(name, model12, io12):
    """A CFG batch (one latent and timestep twice): block 0's self-attention runs once where a device holds both
    branches (cfg=1), per branch where "cfg" splits them; the forward is the one-device one either way."""
    x, t, c, _ = io12
    x, t = np.concatenate([x[:1], x[:1]]), np.concatenate([t[:1], t[:1]])
    ref = FORWARD(model12, x, t, c)
    out = jax.jit(lambda m, x, t, c: m(x, t, c, cfg_batch=True))(on_mesh(model12, name), x, t, c)
    assert rel_l2(out, ref) <= TOL


@pytest.mark.parametrize("name", ["c1u4r2", "c2u2r2"])
def test_folded_text_padding_on_the_mesh_matches_the_whole_context(name, model12, io12):
    """The cross-attention's key bias (`FoldedText`) travels with the text into the mesh's blocks."""
    x, t, c, _ = io12
    c = c.copy()
    c[0, 3:], c[1, 2:] = 0.0, 0.0  # rows past each prompt: zero padding
    ref = FORWARD(model12, x, t, c)
    folded = fold_text_padding(jnp.asarray(c), text_lengths(jnp.asarray(c)), 4)
    out = FORWARD(on_mesh(model12, name), x, t, folded)
    assert rel_l2(out, ref) <= TOL


@pytest.mark.parametrize("name", ["c1u4r2", "c2u2r2"])
def test_bf16_residual_stream_on_the_mesh_matches_one_device(name, io12):
    """bf16 keeps the residual stream in bf16 (the default) through the mesh's blocks: the same forward as one
    device up to bf16 rounding order (measured: 3.6e-3)."""
    x, t, c, _ = io12
    model = WanTransformer3DModel(CFG12, dtype="bfloat16", rngs=nnx.Rngs(0))
    assert model.residual_dtype == jnp.bfloat16
    ref = FORWARD(model, x, t, c)
    out = FORWARD(on_mesh(model, name), x, t, c)
    assert rel_l2(out, ref) <= 1e-2


def test_weights_split_over_the_mesh_give_the_same_forward(model12, io12):
    x, t, c, ref = io12
    model = on_mesh(model12, "c2u2r2", shard_weights=True)
    fc1 = model.blocks.ffn.fc1.kernel[...]  # (layers, 96, 64): split 8 ways on the 96
    assert fc1.sharding.spec == P(None, ("cfg", "ring", "ulysses"), None)
    assert fc1.addressable_shards[0].data.shape == (2, 12, 64)
    assert rel_l2(FORWARD(model, x, t, c), ref) <= TOL


@pytest.mark.parametrize("case, name", [("heads2_odd", "c2u1r4"), ("heads2_odd", "c1u8r1"),
                                        ("heads3_b2", "c2u2r2"), ("heads4_deep", "c1u2r4")])
def test_loaded_onto_the_mesh_matches_diffusers(case, name):
    io = np.load(DIT / case / "io.npz")
    model = load_transformer(DIT / case, "float32", system=layout(name))
    w = model.blocks.attn1.to_q.kernel[...]
    assert isinstance(w.sharding, NamedSharding) and len(w.sharding.device_set) == 8
    out = FORWARD(model, jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"]))
    assert rel_l2(out, io["output"]) <= TOL


def test_orbax_checkpoint_restores_onto_the_mesh(tmp_path):
    from sdjax.convert import main

    assert main([str(DIT / "heads3_b2"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    io = np.load(DIT / "heads3_b2" / "io.npz")
    model = load_transformer(tmp_path / "ckpt", "float32", system=layout("c2u4r1"))
    assert len(model.blocks.ffn.fc2.kernel[...].sharding.device_set) == 8
    out = FORWARD(model, jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"]))
    assert rel_l2(out, io["output"]) <= TOL


def test_bad_layouts_are_clear_errors():
    with pytest.raises(ConfigError, match=r"ulysses=3 = 3 devices, but 8 cpu"):
        load_transformer(DIT / "heads2_odd", "float32", system=SystemConfig(ulysses=3))
    with pytest.raises(ConfigError, match=r"= 16 devices, but 8"):
        make_mesh(SystemConfig(cfg_parallel=2, ulysses=8))


# ------------------------------------------------------------------------------------------ attention alone


@pytest.mark.parametrize("kv_exchange", ["permute", "gather"])
@pytest.mark.parametrize("ulysses, ring, L", [(8, 1, 9), (1, 8, 9), (2, 4, 13), (4, 2, 16)])
def test_sequence_parallel_attention_is_full_attention(ulysses, ring, L, kv_exchange):
    """12 heads; L=9 on 8 devices pads to 16: ring blocks 5-7 hold padding only."""
    from sdjax.kernels.attention import attention

    m = make_mesh(SystemConfig(ulysses=ulysses, ring=ring))
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, L, 12, 8), dtype=np.float32) for _ in range(3))
    Lp = -(-L // 8) * 8
    pad = lambda a: np.pad(a, ((0, 0), (0, Lp - L), (0, 0), (0, 0)))
    f = jax.jit(jax.shard_map(
        lambda q, k, v: sequence_parallel_attention(q, k, v, ulysses=ulysses, ring=ring, true_len=L,
                                                    kv_exchange=kv_exchange),
        mesh=m, in_specs=P(None, SEQ), out_specs=P(None, SEQ), check_vma=False))
    out = np.asarray(f(pad(q), pad(k), pad(v)))[:, :L]
    assert rel_l2(out, attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))) <= 1e-6


@pytest.mark.parametrize("kv_exchange", ["permute", "gather"])
@pytest.mark.parametrize("ulysses, ring", [(1, 8), (2, 4)])
def test_ring_attention_on_our_kernel_is_full_attention(ulysses, ring, kv_exchange):
    """bf16 through `pallas` (on a CPU our Triton kernel, interpreted): the ring merges the kernel's blocks by its
    log-sum-exp to the one-device attention, padding-only ring blocks included (L=9 pads to 16); gathered, one
    kernel call over all keys with the padding masked by kv_len."""
    from sdjax.kernels.attention import attention

    m = make_mesh(SystemConfig(ulysses=ulysses, ring=ring))
    rng = np.random.default_rng(5)
    L = 9
    q, k, v = (jnp.asarray(rng.standard_normal((2, L, 12, 64)), jnp.bfloat16) for _ in range(3))
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 16 - L), (0, 0), (0, 0)))
    f = jax.jit(jax.shard_map(
        lambda q, k, v: sequence_parallel_attention(q, k, v, ulysses=ulysses, ring=ring, true_len=L,
                                                    backend="pallas", kv_exchange=kv_exchange),
        mesh=m, in_specs=P(None, SEQ), out_specs=P(None, SEQ), check_vma=False))
    out = np.asarray(f(pad(q), pad(k), pad(v)), np.float32)[:, :L]
    assert rel_l2(out, attention(q, k, v, backend="xla").astype(jnp.float32)) <= 1e-2


# ------------------------------------------------------------------------------------------ bench


def test_bench_reports_every_layout_against_one_device():
    from sdjax.bench.sharding import Layout, bench_dit

    rows = bench_dit(CFG12, [Layout(1, 1, 1), Layout(2, 2, 2), Layout(2, 2, 2, "gather")], (3, 10, 6), batch=2,
                     text_len=7, dtype="float32", backend="auto", iters=1, log=lambda *a, **k: None)
    assert [r["layout"] for r in rows] == ["c1u1r1", "c2u2r2", "c2u2r2g"]
    for r in rows:
        assert r["rel_l2"] <= TOL and r["ms"] > 0 and r["mem_GiB"] > 0
    assert rows[0]["comm_ms"] == 0 and rows[1]["comm_ms"] > 0 and rows[2]["comm_ms"] > 0
