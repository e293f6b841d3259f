"""The gate, VAE decode: split spatially over 8 CPU devices it equals the one-device decode (fp32, rel. L2
<= 1e-5) and diffusers' reference, while each device holds a fraction of the activations."""

import jax
import numpy as np
import pytest

from sdjax.models.wan.vae import load_vae
from sdjax.sharding import vae as pvae
from tests.conftest import FIXTURES, rel_l2
from tests.sharding.multidevice.conftest import mesh

VAE = FIXTURES / "wan_vae_tiny"


def decoder(m):
    return jax.jit(lambda v, z: pvae.decode(v, z, m))


@pytest.fixture(scope="module")
def vae():
    return load_vae(VAE, "float32")


def test_diffusers_fixture_decodes_on_the_mesh(vae):
    io = np.load(VAE / "io.npz")  # latents (2, 4, 3, 2, 3): width 3 on 8 devices, an uneven split
    m = mesh("c2u2r2")
    out = decoder(m)(pvae.shard_vae(vae, m), io["decode_z"])
    assert rel_l2(out, io["decode_out"]) <= 1e-5


def test_spatial_split_matches_one_device_and_divides_memory(vae):
    z = np.random.default_rng(0).standard_normal((1, 4, 3, 6, 16), dtype=np.float32)  # width 16: 2 per device
    one = decoder(None).lower(vae, z).compile()
    ref = np.asarray(one(vae, z))
    m = mesh("c1u8r1")
    sharded_vae = pvae.shard_vae(vae, m)
    split = decoder(m).lower(sharded_vae, z).compile()
    out = split(sharded_vae, z)
    assert out.shape == ref.shape == (1, 3, 9, 48, 128)
    assert {s.data.shape for s in out.addressable_shards} == {(1, 3, 9, 48, 16)}  # the video stays split by width
    assert rel_l2(out, ref) <= 1e-5
    per_device = split.memory_analysis().temp_size_in_bytes
    assert per_device < one.memory_analysis().temp_size_in_bytes / 4  # XLA's plan: about 1/n of the activations


def test_height_is_split_when_only_it_divides():
    assert pvae.spatial_axis((1, 16, 21, 60, 104), 8) == 4
    assert pvae.spatial_axis((1, 16, 21, 64, 100), 8) == 3
    assert pvae.spatial_axis((1, 16, 21, 6, 3), 8) == 4  # neither: width, split unevenly
