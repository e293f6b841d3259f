"""Parallel VAE decode: the video split into spatial tiles across the mesh, halos exchanged by XLA.

The Wan VAE is convolutional in space (3×3 kernels, per-pixel RMS norms, nearest upsampling) apart from the
mid-block attention over each frame's pixels. Splitting the latent's width (or height) over every device of
the mesh and constraining the output the same way lets GSPMD partition each conv as a tile plus a halo
exchange with the neighbouring devices (collective-permutes; the attention gathers its small K/V). The
network is the same function, so the result equals the one-device decode up to rounding, while each device
holds 1/n of every activation (720p fits where one card would not) and does 1/n of the work.

The time axis is not split: the causal convs chain every frame to all earlier ones (their receptive field,
about 35 latent frames, covers a whole 81-frame video), so time chunks could not be exact.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.sharding.mesh import AXES


def spatial_axis(latent_shape, n_devices: int) -> int:
    """The latent dim to split: width (4) if it divides by the device count, else height (3) if that does,
    else width (GSPMD pads an uneven split; still exact)."""
    _, _, _, H, W = latent_shape
    if W % n_devices == 0 or H % n_devices:
        return 4
    return 3


def tile_sharding(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[axis] = AXES
    return NamedSharding(mesh, P(*spec))


def shard_vae(vae, mesh: Mesh | None):
    """The VAE's parameters replicated over the mesh (they are small); returns the VAE."""
    if mesh is not None:
        state = nnx.state(vae)
        nnx.update(vae, jax.device_put(state, NamedSharding(mesh, P())))
    return vae


def decode(vae, z, mesh: Mesh | None, **kwargs):
    """`vae.decode(z, **kwargs)` with its width (or height) split over every device of `mesh`.

    Call it inside `jax.jit`; the output stays split the same way (reading it gathers it). `mesh=None`: one
    device, plain `vae.decode`.
    """
    if mesh is None or mesh.size == 1:
        return vae.decode(z, **kwargs)
    axis = spatial_axis(z.shape, mesh.size)
    z = jax.lax.with_sharding_constraint(z, tile_sharding(mesh, z.ndim, axis))
    video = vae.decode(z, **kwargs)
    return jax.lax.with_sharding_constraint(video, tile_sharding(mesh, video.ndim, axis))
