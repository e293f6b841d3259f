"""Sharding pieces that one device can check: layout errors, the shard_map path on a 1-device mesh, the
block-attention statistics the ring merges, the bench layouts, the multi-host helpers.

The multi-device checks (every layout on 8 CPU devices) are in test_multidevice.py."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.config import ConfigError, SystemConfig
from sdjax.kernels.attention import attention
from sdjax.models.wan import load_transformer
from sdjax.sharding import launch, make_mesh, mesh_for, multihost, shard_transformer
from sdjax.sharding.attention import (
    NEG,
    _xla_block,
    block_attention,
    check_ring_backend,
    resolve_kv_exchange,
    ring_auto_backend,
)
from tests.conftest import FIXTURES, rel_l2

DIT = FIXTURES / "wan_dit"


def forward(model, io):
    return np.asarray(jax.jit(lambda m, x, t, c: m(x, t, c))(
        model, jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"])))


# ------------------------------------------------------------------------------------------ mesh


def test_layout_that_does_not_match_the_devices_is_a_clear_error():
    n = jax.device_count()
    with pytest.raises(ConfigError, match=rf"cfg_parallel=2 × ring=1 × ulysses=4 = 8 devices, but {n} cpu"):
        make_mesh(SystemConfig(cfg_parallel=2, ulysses=4))
    with pytest.raises(ConfigError, match="ring=3"):
        make_mesh(SystemConfig(ring=3), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="cfg_parallel"):
        SystemConfig(cfg_parallel=3)  # only two branches
    with pytest.raises(ConfigError, match="ulysses"):
        SystemConfig(ulysses=0)


def test_one_device_layouts_need_no_mesh():
    assert mesh_for(None) is None and mesh_for(SystemConfig()) is None
    mesh = make_mesh(SystemConfig(), devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"cfg": 1, "ring": 1, "ulysses": 1}


def test_load_transformer_with_a_one_device_system_is_the_plain_model():
    io = np.load(DIT / "heads2_odd" / "io.npz")
    model = load_transformer(DIT / "heads2_odd", "float32", system=SystemConfig(dtype="float32"))
    assert model.parallel is None
    assert rel_l2(forward(model, io), io["output"]) <= 1e-5


@pytest.mark.parametrize("shard_weights", [False, True])
def test_shard_map_path_on_a_one_device_mesh_matches_diffusers(shard_weights):
    io = np.load(DIT / "heads3_b2" / "io.npz")
    model = load_transformer(DIT / "heads3_b2", "float32")
    shard_transformer(model, make_mesh(SystemConfig(), devices=jax.devices()[:1]), shard_weights=shard_weights)
    assert model.parallel is not None
    assert rel_l2(forward(model, io), io["output"]) <= 1e-5


def test_ring_needs_a_kernel_that_returns_the_log_sum_exp():
    with pytest.raises(ConfigError, match="attention_backend='splash' is not allowed with ring=2"):
        check_ring_backend("splash", 2)
    with pytest.raises(ConfigError, match="attention_backend='pallas_mgpu_int8' is not allowed with ring=2"):
        check_ring_backend("pallas_mgpu_int8", 2)  # the lossy modes stay single-block
    check_ring_backend("splash", 1)  # Ulysses alone runs any kernel
    for backend in ("cudnn", "pallas", "pallas_mgpu", "pallas_triton"):
        check_ring_backend(backend, 4)
    check_ring_backend("splash", 2, "gather")  # K/V all-gathered: one attention call, no log-sum-exp needed


def test_ring_kv_exchange_auto_gathers_on_gpus_from_ring_4():
    assert resolve_kv_exchange("auto", 4, "gpu") == "gather"
    assert resolve_kv_exchange("auto", 2, "gpu") == "permute"
    assert resolve_kv_exchange("auto", 8, "tpu") == "permute"  # unmeasured there: the ring
    assert resolve_kv_exchange("permute", 8, "gpu") == "permute"
    with pytest.raises(ConfigError, match="kv_exchange='ring': expected one of auto, permute, gather"):
        resolve_kv_exchange("ring", 2, "gpu")


@pytest.mark.parametrize("backend", ["pallas", "pallas_triton"])
@pytest.mark.parametrize("n_valid", [None, 5, 0])
def test_ring_block_on_our_portable_kernel(backend, n_valid):
    """On a CPU `pallas` is our Triton kernel, interpreted: its block output and log-sum-exp are the XLA block's."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 64)), jnp.bfloat16) for _ in range(3))
    n = None if n_valid is None else jnp.int32(n_valid)
    out, lse = block_attention(q, k, v, n, backend=backend)
    ref_out, ref_lse = _xla_block(q, k, v, n)
    if n_valid == 0:  # a block of padding only: no weight in the merge
        assert np.all(np.asarray(lse) < NEG / 2)
        return
    assert rel_l2(out, ref_out) <= 1e-2 and np.abs(np.asarray(lse) - np.asarray(ref_lse)).max() <= 1e-4


def test_ring_auto_runs_a_kernel_with_a_log_sum_exp():
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    assert ring_auto_backend(q, q) == "xla"  # CPU: the only one here
    assert ring_auto_backend(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16)) == "xla"  # not pallas_triton


# ------------------------------------------------------------------------------------------ ring pieces


@pytest.mark.parametrize("n_valid", [None, 5, 0])
def test_block_attention_gives_output_and_log_sum_exp(n_valid):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32) for _ in range(3))
    out, lse = _xla_block(q, k, v, None if n_valid is None else jnp.int32(n_valid), q_chunk=4)  # 2 chunks
    if n_valid == 0:  # a block of padding only: no weight in the merge
        assert np.all(np.asarray(lse) < NEG / 2) and np.all(np.isfinite(np.asarray(out)))
        return
    S = 7 if n_valid is None else n_valid
    ref = attention(q, k[:, :S], v[:, :S], backend="xla")
    logits = np.einsum("bqnh,bknh->bqnk", np.asarray(q), np.asarray(k)[:, :S]) / np.sqrt(8)
    ref_lse = np.log(np.exp(logits).sum(-1))
    assert rel_l2(out, ref) <= 1e-6
    assert rel_l2(lse, ref_lse) <= 1e-6


@pytest.mark.parametrize("n_valid", [None, 5, 0])
def test_ring_block_on_our_hopper_kernel_masks_by_kv_len(monkeypatch, n_valid):
    """The Hopper kernel runs on a GPU only, so it is stood in for by the XLA block here: what is checked is the
    glue — the valid keys become the kernel's kv_len (at least 1: the kernels clip to 1), and a block of padding
    only gets lse = NEG (no weight in the merge)."""
    from sdjax.sharding import attention as ring_module

    seen = {}

    def kernel(q, k, v, kv_len, return_lse):
        assert return_lse
        seen["kv_len"] = None if kv_len is None else np.asarray(kv_len)
        out, lse = _xla_block(q, k, v, None if kv_len is None else kv_len[0])
        return out.astype(q.dtype), lse

    monkeypatch.setattr(ring_module, "our_kernel", lambda backend, q: kernel if backend == "pallas_mgpu" else None)
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 3, 8)), jnp.bfloat16) for _ in range(3))
    out, lse = ring_module.block_attention(q, k, v, None if n_valid is None else jnp.int32(n_valid),
                                           backend="pallas_mgpu")
    assert out.dtype == lse.dtype == jnp.float32 and lse.shape == (2, 6, 3)
    if n_valid is None:
        assert seen["kv_len"] is None
    else:
        assert seen["kv_len"].tolist() == [max(n_valid, 1)] * 2
    assert np.all(np.asarray(lse) < NEG / 2) == (n_valid == 0)


def test_merging_two_blocks_by_log_sum_exp_is_attention_over_both():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32) for _ in range(3))
    o1, l1 = _xla_block(q, k[:, :3], v[:, :3], None)
    o2, l2 = _xla_block(q, k[:, 3:], v[:, 3:], None)
    new = jnp.logaddexp(l1, l2)
    merged = o1 * jnp.exp(l1 - new)[..., None] + o2 * jnp.exp(l2 - new)[..., None]
    assert rel_l2(merged, attention(q, k, v, backend="xla")) <= 1e-6


# ------------------------------------------------------------------------------------------ bench


def test_bench_layouts():
    from sdjax.bench.sharding import Layout, all_layouts, parse_layouts

    names = [lay.name for lay in all_layouts(4)]
    assert names == ["c1u1r1", "c1u1r2", "c1u2r1", "c2u1r1", "c1u1r4", "c1u2r2", "c1u4r1", "c2u1r2", "c2u2r1"]
    assert [lay.name for lay in parse_layouts("c2u2r1,c1u1r2", 4)] == ["c1u1r1", "c1u1r2", "c2u2r1"]
    assert Layout.parse("c1u2r2g") == Layout(1, 2, 2, "gather") and Layout(1, 2, 2, "gather").name == "c1u2r2g"
    assert Layout.parse("c1u2r2p").name == "c1u2r2p" and Layout.parse("c1u2r2").kv_exchange == "auto"
    with pytest.raises(ValueError, match="c<cfg>u<ulysses>r<ring>"):
        Layout.parse("2x2")
    with pytest.raises(ValueError, match="more than the 2 devices"):
        parse_layouts("c2u2r1", 2)


# ------------------------------------------------------------------------------------------ multi-host


def test_launch_args():
    p = argparse.ArgumentParser()
    launch.add_args(p)
    args = p.parse_args(["--cfg-parallel", "2", "--ulysses", "4"])
    assert SystemConfig(**launch.layout_kwargs(args)).num_devices == 8
    assert launch.initialize_from_args(args) is False  # no multi-host flag: one process, nothing to do
    with pytest.raises(ConfigError, match="coordinator-address"):
        launch.initialize_from_args(p.parse_args(["--num-processes", "2"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--cfg-parallel", "3"])


def test_multihost_checks_and_single_process_paths():
    with pytest.raises(ConfigError, match="host:port"):
        multihost.check_args("nohost", 2, 0)
    with pytest.raises(ConfigError, match="process_id=2"):
        multihost.check_args("h:1", 2, 2)
    assert multihost.is_leader()
    request = {"prompt": "a cat", "seed": 3}
    assert multihost.broadcast(request) == request
    seen = []
    assert multihost.lead(request, seen.append) is None and seen == [request]
    assert multihost.follow(seen.append) == 0  # the leader's None arrives at once
