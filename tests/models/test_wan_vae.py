"""Wan2.1 VAE against diffusers' AutoencoderKLWan (fixtures from tools/make_vae_fixtures.py).

wan_vae_tiny: base 4, decoder_base 6, z 4, dim_mult [1,2,2,2], 1 res-block, B=2, fp32 weights.
wan_vae_mid:  the real Wan2.1 structure (dim_mult [1,2,4,4], 2 res-blocks, z 16) at base 4, fp16 weights.
Both: latent (B, Z, 3, 2, 3) <-> video (B, 3, 9, 16, 24).
"""

import json
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sdjax.models.wan.vae import COMPILER_OPTIONS, AutoencoderKLWan, WanVAEConfig, load_vae
from sdjax.models.weights import WeightsError
from tests.conftest import FIXTURES, rel_l2

VAES = ["wan_vae_tiny", "wan_vae_mid"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


# XLA:CPU at optimisation level 0 compiles in half the time; the numbers are unchanged (fp32 parity holds).
fast_jit = partial(jax.jit, static_argnums=2, compiler_options={"xla_backend_optimization_level": 0})


@fast_jit
def decode(model, z, steps=1):
    return model.decode(z, steps)


@fast_jit
def encode(model, video, steps=1):
    return model.encode(video, steps)


def io(name: str) -> dict:
    return dict(np.load(FIXTURES / name / "io.npz"))


@pytest.fixture(scope="module")
def models():
    return {(n, dt): load_vae(FIXTURES / n, dt) for n in VAES for dt in ("float32", "bfloat16")}


def f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


# ---- numerics ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VAES)
def test_decode_fp32_matches_diffusers(models, name):
    d = io(name)
    out = f32(decode(models[name, "float32"], jnp.asarray(d["decode_z"])))
    assert out.shape == d["decode_out"].shape  # (B, 3, 9, 16, 24): 1 + 4·2 frames
    assert rel_l2(out, d["decode_out"]) <= 1e-5
    assert np.abs(out).max() <= 1.0


@pytest.mark.parametrize("name", VAES)
def test_encode_fp32_matches_diffusers(models, name):
    d = io(name)
    mean = f32(encode(models[name, "float32"], jnp.asarray(d["encode_video"])))
    assert mean.shape == d["encode_mean"].shape
    assert rel_l2(mean, d["encode_mean"]) <= 1e-5


@pytest.mark.parametrize("name", VAES)
def test_decode_bf16_close_to_fp32(models, name):
    """bf16 rounding error of these small random networks is ~2 % in diffusers itself (stored as decode_bf16);
    ours must be in the same range: within 1.25x diffusers' own bf16 error and 3e-2."""
    d = io(name)
    model = models[name, "bfloat16"]
    assert model.decoder.conv_in.weight[...].dtype == jnp.bfloat16
    out = decode(model, jnp.asarray(d["decode_z"]))
    assert out.dtype == jnp.bfloat16
    err = rel_l2(f32(out), d["decode_out"])
    diffusers_err = rel_l2(d["decode_bf16"], d["decode_out"])
    assert err <= min(1.25 * diffusers_err, 3e-2), (err, diffusers_err)


def test_chunking_changes_nothing(models):
    """2 latent frames per scan step (the tail padded with a zero frame) = diffusers' frame-by-frame."""
    d = io("wan_vae_tiny")
    model = models["wan_vae_tiny", "float32"]
    assert rel_l2(f32(decode(model, jnp.asarray(d["decode_z"]), 2)), d["decode_out"]) <= 1e-5
    assert rel_l2(f32(encode(model, jnp.asarray(d["encode_video"]), 2)), d["encode_mean"]) <= 1e-5


def test_decode_is_causal(models):
    """A shorter latent gives exactly the first frames of the long one; here in one whole-sequence step."""
    d = io("wan_vae_tiny")
    out = f32(decode(models["wan_vae_tiny", "float32"], jnp.asarray(d["decode_z"][:, :, :2]), 2))
    assert out.shape[2] == 5
    assert rel_l2(out, d["decode_out"][:, :, :5]) <= 1e-5


# ---- API: normalisation, jit, inputs -----------------------------------------------------------------------

def test_latent_normalisation(models):
    model = models["wan_vae_tiny", "float32"]
    cfg = model.config
    mu = jnp.asarray(io("wan_vae_tiny")["encode_mean"])
    mean = np.asarray(cfg.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
    std = np.asarray(cfg.latents_std, np.float32).reshape(1, -1, 1, 1, 1)
    z = model.normalize_latents(mu)
    np.testing.assert_allclose(np.asarray(z), (np.asarray(mu) - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.denormalize_latents(z)), np.asarray(mu), rtol=1e-5, atol=1e-6)


def test_jit_forms(models):
    """The module is a pytree (jax.jit above); the split/merge form used for sharded serving lowers too."""
    model = models["wan_vae_mid", "float32"]
    z = jnp.asarray(io("wan_vae_mid")["decode_z"])
    graphdef, state = nnx.split(model)
    lowered = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z)).lower(state, z)
    assert "while" in lowered.as_text()  # the latent frames after the first are a lax.scan
    assert nnx.jit(lambda m, z: m.decode(z)).eval_shape(model, z).shape == (1, 3, 9, 16, 24)


def test_compiler_options_change_no_number(models):
    """The pipeline compiles the VAE with `COMPILER_OPTIONS` (channels-last 3-D convs on GPU): this XLA must
    know every option (an unknown one is an error at compile time), and on CPU they change nothing."""
    model = models["wan_vae_tiny", "float32"]
    z = jnp.asarray(io("wan_vae_tiny")["decode_z"])
    options = {**COMPILER_OPTIONS, "xla_backend_optimization_level": 0}
    with_options = jax.jit(lambda m, z: m.decode(z), compiler_options=options)(model, z)
    np.testing.assert_array_equal(f32(with_options), f32(decode(model, z)))
    with pytest.raises(Exception, match="no_such_option"):
        jax.jit(lambda m, z: m.decode(z), compiler_options={"xla_gpu_no_such_option": True})(model, z)


def test_shapes_at_real_size():
    """Abstract real-size VAE: 480x832, 81 frames <-> latent (16, 21, 60, 104)."""
    model = nnx.eval_shape(lambda: AutoencoderKLWan(WanVAEConfig(), dtype=jnp.bfloat16))
    z = jax.ShapeDtypeStruct((1, 16, 21, 60, 104), jnp.bfloat16)
    assert jax.eval_shape(lambda m, z: m.decode(z), model, z).shape == (1, 3, 81, 480, 832)
    v = jax.ShapeDtypeStruct((1, 3, 81, 480, 832), jnp.bfloat16)
    assert jax.eval_shape(lambda m, v: m.encode(v), model, v).shape == (1, 16, 21, 60, 104)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == 126_892_531  # research/wan.md §9.4


def test_bad_inputs(models):
    model = models["wan_vae_tiny", "float32"]
    with pytest.raises(ValueError, match=r"z: expected shape \(B, 4, F, H, W\)"):
        model.decode(jnp.zeros((1, 16, 2, 2, 2)))
    with pytest.raises(ValueError, match="video has 8 frames; need 1 \\+ 4k"):
        model.encode(jnp.zeros((1, 3, 8, 16, 16)))
    with pytest.raises(ValueError, match="video: expected shape"):
        model.encode(jnp.zeros((1, 3, 9, 16)))
    with pytest.raises(ValueError, match="latent_frames_per_step"):
        model.decode(jnp.zeros((1, 4, 2, 2, 2)), 0)


# ---- loading ----------------------------------------------------------------------------------------------

def test_loader_reads_config_and_stored_dtypes(models):
    tiny, mid = models["wan_vae_tiny", "float32"], models["wan_vae_mid", "float32"]
    assert tiny.config.decoder_base_dim == 6 and tiny.config.z_dim == 4
    assert tiny.decoder.conv_in.weight[...].shape == (3, 3, 3, 4, 12)  # torch (O, I, kT, kH, kW) -> ours
    assert mid.config == WanVAEConfig(base_dim=4)  # real structure, diffusers defaults elsewhere
    assert mid.decoder.conv_in.weight[...].dtype == jnp.float32  # fp16 on disk, cast on load


@pytest.fixture
def vae_copy(tmp_path):
    dst = tmp_path / "vae"
    shutil.copytree(FIXTURES / "wan_vae_tiny", dst)
    return dst


def _edit_weights(d, fn):
    tensors = load_file(d / WEIGHTS)
    fn(tensors)
    save_file(tensors, d / WEIGHTS)


def test_strict_loading_missing(vae_copy):
    _edit_weights(vae_copy, lambda t: t.pop("decoder.up_blocks.1.upsamplers.0.time_conv.bias"))
    with pytest.raises(WeightsError, match="missing 1 .*time_conv.bias"):
        load_vae(vae_copy)


def test_strict_loading_unexpected(vae_copy):
    _edit_weights(vae_copy, lambda t: t.update({"decoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match="unexpected 1 .*decoder.extra.weight"):
        load_vae(vae_copy)


def test_strict_loading_shape(vae_copy):
    def bad(t):
        t["encoder.conv_in.weight"] = t["encoder.conv_in.weight"][:, :, :2]
    _edit_weights(vae_copy, bad)
    with pytest.raises(WeightsError, match="'encoder.conv_in.weight' has shape"):
        load_vae(vae_copy)


def test_loading_errors(vae_copy, tmp_path):
    with pytest.raises(ValueError, match="dtype 'float16' unsupported"):
        load_vae(vae_copy, "float16")
    cfg = json.loads((vae_copy / "config.json").read_text())
    (vae_copy / "config.json").write_text(json.dumps({**cfg, "is_residual": True}))
    with pytest.raises(WeightsError, match="config.json: .*is_residual"):
        load_vae(vae_copy)
    (vae_copy / "config.json").write_text(json.dumps(cfg))
    (vae_copy / WEIGHTS).unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load_vae(vae_copy)
    with pytest.raises(WeightsError, match="nowhere/config.json: missing"):
        load_vae(tmp_path / "nowhere")


# ---- config ------------------------------------------------------------------------------------------------

WAN21_VAE_CONFIG = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json (research/wan.md §2.4)
    "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0", "attn_scales": [], "base_dim": 96,
    "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "num_res_blocks": 2, "temperal_downsample": [False, True, True],
    "z_dim": 16,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                     0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                    1.5579, 1.6382, 1.1253, 2.8251, 1.916],
}


def test_config_defaults_for_older_files():
    cfg = WanVAEConfig.from_dict(WAN21_VAE_CONFIG)  # no decoder_base_dim / is_residual / patch_size / ...
    assert cfg == WanVAEConfig()
    assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 8)
    full = {**WAN21_VAE_CONFIG, "decoder_base_dim": None, "is_residual": False, "in_channels": 3,
            "out_channels": 3, "patch_size": None, "scale_factor_spatial": 8, "scale_factor_temporal": 4}
    assert WanVAEConfig.from_dict(full) == cfg


@pytest.mark.parametrize("change, field", [
    ({"is_residual": True}, "is_residual"),
    ({"patch_size": 2}, "patch_size"),
    ({"attn_scales": [0.5]}, "attn_scales"),
    ({"temperal_downsample": [False, True]}, "temperal_downsample"),
    ({"temperal_downsample": [True, True, True]}, "temperal_downsample"),
    ({"z_dim": 4}, "latents_mean"),
    ({"latents_std": [0.0] * 16}, "latents_std"),
    ({"base_dim": 0}, "base_dim"),
    ({"dim_mult": "1,2,4,4"}, "dim_mult"),
    ({"scale_factor_temporal": 8}, "scale_factor_temporal"),
    ({"dropout": 1.5}, "dropout"),
    ({"clip_output": True}, "clip_output"),
    ({"_class_name": "AutoencoderKL"}, "_class_name"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        WanVAEConfig.from_dict({**WAN21_VAE_CONFIG, **change})
