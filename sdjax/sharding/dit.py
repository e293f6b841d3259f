"""The Wan DiT on a mesh: tokens split over ring × Ulysses, CFG branches over "cfg", weights replicated.

`shard_transformer(model, mesh)` places the parameters and sets `model.parallel`; from then on
`model(latents, t, context)` (and `embed` → `run_blocks` → `head`, which caches compose) takes ordinary,
unsharded inputs and returns the one-device result:

1. `embed` and `head` are cheap and run under GSPMD (replicated);
2. `run_blocks` pads the tokens to a multiple of 8 · ring × ulysses, then runs the scan over the stacked blocks
   inside `jax.shard_map`: every per-token op is local, self-attention communicates
   (`sequence_parallel_attention`), cross-attention to the (replicated) text needs nothing;
3. the padding is dropped and the tokens gathered for the head.

With `shard_weights=True` every large block weight is split over all devices (FSDP style) and all-gathered
one layer at a time inside the scan: 14B on cards that cannot hold it whole, at the price of the gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.models.wan.transformer import run_stacked_blocks
from sdjax.sharding.attention import check_ring_backend, resolve_kv_exchange, sequence_parallel_attention
from sdjax.sharding.mesh import AXES, SEQ


@dataclass(frozen=True)
class SequenceParallel:
    """How the blocks run on `mesh` (a static, hashable part of the model: jit keys on it)."""

    mesh: Mesh
    shard_weights: bool = False
    kv_exchange: str = "permute"  # how the ring axis shares K/V: permute | gather (sdjax.sharding.attention)
    comm: bool = True  # False: collectives become local no-ops (wrong numbers; timing the compute alone)

    @property
    def ring(self) -> int:
        return self.mesh.shape["ring"]

    @property
    def ulysses(self) -> int:
        return self.mesh.shape["ulysses"]

    def batch_axis(self, batch: int) -> str | None:
        # CFG parallel: the batch (cond, uncond) is split over the "cfg" groups; a batch that does not
        # divide is replicated over them instead.
        return "cfg" if batch % self.mesh.shape["cfg"] == 0 else None

    def run_blocks(self, blocks, x, e0, text, rope, layers=None, cfg_batch=False):
        """x (B, L, D) -> (B, L, D) through the stacked `blocks`, tokens split over the mesh. `cfg_batch`
        (`run_stacked_blocks`) shares block 0's self-attention only where a device holds both CFG branches."""
        B, L, _ = x.shape
        sp = self.ring * self.ulysses
        Lp = -(-L // (8 * sp)) * 8 * sp  # whole 8-token tiles a device: what the q/k norm kernel's TMA copies take
        cos, sin = (jnp.pad(t, ((0, Lp - L), (0, 0))) for t in rope)
        x = jnp.pad(x, ((0, 0), (0, Lp - L), (0, 0)))
        b = self.batch_axis(B)
        graphdef, state = nnx.split(blocks)
        weight_specs = jax.tree.map(lambda w: self.weight_spec(w.shape), state)
        attend = partial(sequence_parallel_attention, ulysses=self.ulysses, ring=self.ring, true_len=L,
                         backend=blocks.attn1.backend, kv_exchange=self.kv_exchange, comm=self.comm)

        shared = cfg_batch and (b is None or self.mesh.shape["cfg"] == 1)  # both branches on each device

        def local(state, x, e0, text, cos, sin):  # runs on each device with its own tokens
            def block_of(layer):
                if self.shard_weights:
                    layer = jax.tree.map(_gather_weight, layer, weight_specs)
                return nnx.merge(graphdef, layer)

            return run_stacked_blocks(block_of, x, e0, text, (cos, sin), state, layers, shared, attend)

        run = jax.shard_map(local, mesh=self.mesh, check_vma=False,
                            in_specs=(weight_specs, P(b, SEQ), P(b), P(b), P(SEQ), P(SEQ)), out_specs=P(b, SEQ))
        return run(state, x, e0, text, cos, sin)[:, :L]

    def weight_spec(self, shape) -> P:
        """Stacked (layers, ...) weight: replicated, or (shard_weights) split on its largest dividing dim."""
        dim = _split_dim(shape, self.mesh.size) if self.shard_weights else None
        if dim is None:
            return P()
        return P(*[AXES if i == dim else None for i in range(len(shape))])


def _split_dim(shape, n) -> int | None:
    """The largest non-layer dim divisible by n (None: too small to be worth splitting)."""
    dims = [i for i in range(1, len(shape)) if shape[i] % n == 0 and shape[i] >= 4 * n]
    return max(dims, key=lambda i: shape[i]) if dims else None


def _gather_weight(w, spec):
    # Inside the scan the layer axis is gone: spec's dim i is the weight's dim i - 1.
    for i, s in enumerate(spec):
        if s is not None:
            return jax.lax.all_gather(w, AXES, axis=i - 1, tiled=True)
    return w


# ------------------------------------------------------------------------------------------ placement


def shard_transformer(model, mesh: Mesh | None, *, shard_weights: bool = False, kv_exchange: str = "auto",
                      comm: bool = True):
    """Put `model`'s parameters on `mesh` and make its forward run there; returns the model.

    Works on a loaded model (arrays are moved) and on an abstract one from `nnx.eval_shape` (each leaf gets
    its target sharding, so loading then places every tensor directly). `mesh=None`: one device, unchanged.
    """
    if mesh is None:
        model.parallel = None
        return model
    kv_exchange = resolve_kv_exchange(kv_exchange, mesh.shape["ring"], mesh.devices.flat[0].platform)
    check_ring_backend(model.blocks.attn1.backend, mesh.shape["ring"], kv_exchange)  # at load time
    parallel = SequenceParallel(mesh, shard_weights=shard_weights, kv_exchange=kv_exchange, comm=comm)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        spec = parallel.weight_spec(var.shape) if path[0] == "blocks" else P()
        var.set_value(_place(var.get_value(), NamedSharding(mesh, spec)))
    nnx.update(model, state)
    model.parallel = parallel
    return model


def _place(value, sharding):
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    return jax.device_put(value, sharding)


def param_shardings(model) -> dict:
    """{param path: sharding} of a (possibly abstract) placed model, for loaders that place tensor by tensor."""
    return {path: getattr(var.get_value(), "sharding", None)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
