"""The whole pipeline on a mesh — `Pipeline.from_pretrained(root, system=…)` with sharded DiT and parallel VAE
decode — gives the one-device frames (and diffusers' frames) for several layouts on 8 CPU devices."""

import numpy as np
import pytest

from sdjax.pipeline import Pipeline
from tests.conftest import FIXTURES
from tests.sharding.multidevice.conftest import layout

ROOT = FIXTURES / "wan_pipeline_tiny"


@pytest.fixture(scope="module")
def reference():
    io = np.load(FIXTURES / "wan_pipeline_tiny_io.npz")
    pipe = Pipeline.from_pretrained(ROOT, dtype="float32")
    return io, run(pipe, io)


def run(pipe, io):
    return pipe("a red circle moves left", negative_prompt="blurry, static", height=int(io["height"]),
                width=int(io["width"]), num_frames=int(io["num_frames"]), num_inference_steps=4, guidance_scale=5.0,
                max_sequence_length=int(io["max_sequence_length"]), flow_shift=3.0, latents=io["latents_0"],
                progress=False).frames


@pytest.mark.parametrize("name", ["c2u4r1", "c1u2r4", "c2u2r2", "c1u8r1"])
def test_pipeline_on_mesh_equals_one_device(reference, name):
    io, one = reference
    pipe = Pipeline.from_pretrained(ROOT, dtype="float32", system=layout(name))
    assert pipe.mesh is not None and pipe.mesh.size == 8
    frames = run(pipe, io)
    assert np.abs(frames - one).max() <= 1e-5
    # the decode hands the host one whole array (gathered on the devices), not width-split pieces to assemble
    z = np.zeros((1, pipe.vae.config.z_dim, 2, 4, 4), np.float32)
    assert all(decode(pipe.vae, z).sharding.is_fully_replicated for decode in pipe._decode.values())
    assert np.abs(frames - io["frames_0"]).max() <= 2e-3
