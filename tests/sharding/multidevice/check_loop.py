"""The gate, whole denoising loop: UniPC with CFG (guidance 5) through the pipeline's jitted step, on 8 CPU
devices, equals one device (fp32, rel. L2 <= 1e-5) for CFG-parallel and sequence-parallel layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.models.wan.transformer import WanTransformer3DModel
from sdjax.sampling import loop, solvers
from sdjax.sharding import shard_transformer
from tests.conftest import rel_l2
from tests.sharding.multidevice.conftest import CFG12, mesh


def denoise(model, x, cond, uncond, steps=3):
    schedule = jax.tree.map(jnp.asarray, solvers.make_schedule("unipc", steps, 3.0).padded(8))
    state = loop.init_state("unipc", jnp.asarray(x), model=model)
    for i in range(steps):
        state = loop.denoise_step(model, state, jnp.int32(i), schedule, jnp.asarray(cond), jnp.asarray(uncond),
                                  jnp.float32(5.0), solver="unipc", do_cfg=True)
    return np.asarray(state.latents)


@pytest.fixture(scope="module")
def one_device():
    model = WanTransformer3DModel(CFG12, dtype="float32", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 3, 10, 6), dtype=np.float32)  # 45 tokens
    cond, uncond = (rng.standard_normal((1, 7, 16), dtype=np.float32) for _ in range(2))
    return model, x, cond, uncond, denoise(model, x, cond, uncond)


@pytest.mark.parametrize("name", ["c2u4r1", "c2u2r2", "c1u8r1", "c1u2r4"])
def test_denoising_loop_with_cfg_matches_one_device(name, one_device):
    model, x, cond, uncond, ref = one_device
    out = denoise(shard_transformer(nnx.clone(model), mesh(name)), x, cond, uncond)
    assert rel_l2(out, ref) <= 1e-5
