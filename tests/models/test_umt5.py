"""UMT5 / T5 text encoder against transformers (fixtures from tools/make_umt5_fixtures.py)."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sdjax.models.umt5 import (
    ConfigError,
    UMT5Config,
    UMT5Encoder,
    load_text_encoder,
    relative_position_bucket,
)
from sdjax.models.weights import WeightsError
from tests.conftest import FIXTURES, rel_l2

ENCODERS = ["umt5_tiny", "t5_tiny"]

# Wan2.1's text_encoder/config.json (shared/research/wan.md §2.4), architecture fields.
UMT5_XXL = {"architectures": ["UMT5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
            "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-06, "model_type": "umt5",
            "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32, "vocab_size": 256384, "dense_act_fn": "gelu_new"}


@jax.jit
def encode(model, ids, mask):
    return model(ids, mask)


def io(name: str) -> dict:
    return dict(np.load(FIXTURES / name / "io.npz"))


def run(model, d: dict) -> np.ndarray:
    out = encode(model, jnp.asarray(d["input_ids"]), jnp.asarray(d["attention_mask"]))
    return np.asarray(out.astype(jnp.float32))


# ---- numerics ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ENCODERS)
def test_fp32_matches_transformers(name):
    d = io(name)
    assert d["attention_mask"].sum(1).tolist() == [20, 9, 1]  # padded rows in the batch
    out = run(load_text_encoder(FIXTURES / name, "float32"), d)
    assert out.shape == d["out_fp32"].shape
    assert rel_l2(out, d["out_fp32"]) <= 1e-5
    real = d["attention_mask"].astype(bool)
    assert rel_l2(out[real], d["out_fp32"][real]) <= 1e-5


@pytest.mark.parametrize("name", ENCODERS)
def test_bf16_close_to_fp32_reference(name):
    d = io(name)
    model = load_text_encoder(FIXTURES / name, "bfloat16")
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    out = encode(model, jnp.asarray(d["input_ids"]), jnp.asarray(d["attention_mask"]))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert rel_l2(out, d["out_fp32"]) <= 1e-2
    # transformers' own bf16 run (all weights bf16) lands at the same distance from fp32.
    assert rel_l2(out, d["out_fp32"]) <= 1.25 * rel_l2(d["out_bf16"], d["out_fp32"])


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(8, 16), (32, 128)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    d = io("umt5_tiny")
    ours = relative_position_bucket(d["rel_positions"], num_buckets, max_distance)
    np.testing.assert_array_equal(ours, d[f"buckets_{num_buckets}_{max_distance}"])


def test_bias_tables_per_layer_for_umt5_shared_for_t5():
    umt5 = load_text_encoder(FIXTURES / "umt5_tiny")
    assert umt5.encoder.block.layer[0].SelfAttention.relative_attention_bias.weight.shape == (3, 8, 4)
    assert not hasattr(umt5.encoder, "relative_attention_bias")
    t5 = load_text_encoder(FIXTURES / "t5_tiny")
    assert t5.encoder.relative_attention_bias.weight.shape == (8, 4)
    assert not hasattr(t5.encoder.block.layer[0].SelfAttention, "relative_attention_bias")
    assert t5.encoder.block.layer[1].DenseReluDense.wi.weight.shape == (3, 37, 32)


def test_umt5_xxl_parameter_count():
    config = UMT5Config.from_dict(UMT5_XXL)
    model = nnx.eval_shape(lambda: UMT5Encoder(config, dtype="bfloat16", rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(int(np.prod(p.shape)) for p in params) == 5_680_910_336
    assert model.shared.weight.shape == (256384, 4096)
    assert model.encoder.block.layer[1].DenseReluDense.wi_0.weight.shape == (24, 10240, 4096)


def test_input_errors():
    model = load_text_encoder(FIXTURES / "umt5_tiny")
    ids, mask = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 64\)"):
        model(ids.at[0, 1].set(64), mask)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, mask[:, :3])
    with pytest.raises(ValueError, match="integer"):
        model(ids.astype(jnp.float32), mask)


# ---- loading ----------------------------------------------------------------------------------------------

def copy_with(tmp_path: Path, name: str, edit) -> Path:
    """Fixture copy whose tensors dict (name -> array) went through `edit`."""
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    tensors = load_file(out / "model.safetensors")
    save_file(edit(tensors), out / "model.safetensors")
    return out


def test_tied_embedding_either_or_both(tmp_path):
    d = io("umt5_tiny")
    ref = run(load_text_encoder(FIXTURES / "umt5_tiny"), d)

    def both(t):
        return {**t, "encoder.embed_tokens.weight": t["shared.weight"]}

    def alias_only(t):
        t["encoder.embed_tokens.weight"] = t.pop("shared.weight")
        return t

    for edit in (both, alias_only):
        path = copy_with(tmp_path / edit.__name__, "umt5_tiny", edit)
        np.testing.assert_array_equal(run(load_text_encoder(path), d), ref)


def test_sharded_checkpoint(tmp_path):
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(FIXTURES / "umt5_tiny" / "config.json", out)
    tensors = load_file(FIXTURES / "umt5_tiny" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    d = io("umt5_tiny")
    np.testing.assert_array_equal(run(load_text_encoder(out), d), run(load_text_encoder(FIXTURES / "umt5_tiny"), d))


def test_missing_tensor(tmp_path):
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    path = copy_with(tmp_path, "umt5_tiny", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(WeightsError, match=r"missing 1 tensor.*DenseReluDense\.wo\.weight"):
        load_text_encoder(path)


def test_missing_embedding(tmp_path):
    path = copy_with(tmp_path, "umt5_tiny", lambda t: {k: v for k, v in t.items() if k != "shared.weight"})
    with pytest.raises(WeightsError, match="'shared.weight'"):
        load_text_encoder(path)


def test_unexpected_tensor(tmp_path):
    extra = "encoder.block.3.layer.0.SelfAttention.q.weight"
    path = copy_with(tmp_path, "umt5_tiny", lambda t: {**t, extra: np.zeros((32, 32), np.float32)})
    with pytest.raises(WeightsError, match=r"unexpected 1 tensor.*block\.3\.layer\.0\.SelfAttention\.q"):
        load_text_encoder(path)


def test_t5_rejects_per_layer_bias_tables(tmp_path):
    extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    path = copy_with(tmp_path, "t5_tiny", lambda t: {**t, extra: np.zeros((8, 4), np.float32)})
    with pytest.raises(WeightsError, match="unexpected.*block.1.layer.0.SelfAttention.relative_attention_bias"):
        load_text_encoder(path)


@pytest.mark.parametrize("key", ["encoder.block.2.layer.1.DenseReluDense.wi_0.weight",
                                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                 "encoder.embed_tokens.weight"])
def test_wrong_shape(tmp_path, key):
    def edit(t):
        source = t["shared.weight"] if key == "encoder.embed_tokens.weight" else t[key]
        return {**t, key: np.ascontiguousarray(source.T)}

    path = copy_with(tmp_path, "umt5_tiny", edit)
    with pytest.raises(WeightsError, match=f"{key}.*has shape"):
        load_text_encoder(path)


def test_corrupted_file(tmp_path):
    out = tmp_path / "umt5_tiny"
    shutil.copytree(FIXTURES / "umt5_tiny", out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        load_text_encoder(out)


def test_missing_config(tmp_path):
    out = tmp_path / "umt5_tiny"
    shutil.copytree(FIXTURES / "umt5_tiny", out)
    (out / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        load_text_encoder(out)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype 'float16' is not supported"):
        load_text_encoder(FIXTURES / "umt5_tiny", "float16")


# ---- config -----------------------------------------------------------------------------------------------

def test_config_from_fixture_and_defaults():
    c = UMT5Config.from_dict(json.loads((FIXTURES / "t5_tiny" / "config.json").read_text()))
    assert (c.model_type, c.feed_forward_proj, c.num_layers, c.d_ff, c.bias_per_layer, c.gated) == (
        "t5", "relu", 3, 37, False, False)
    # save_pretrained omits fields equal to transformers' defaults; those fill in per model type.
    c = UMT5Config.from_dict({"model_type": "umt5"})
    assert (c.vocab_size, c.d_model, c.num_heads, c.feed_forward_proj, c.relative_attention_num_buckets) == (
        250112, 512, 6, "gated-gelu", 32)
    assert UMT5Config.from_dict({"model_type": "t5"}).feed_forward_proj == "relu"


@pytest.mark.parametrize(("edit", "field"), [
    ({"model_type": "bert"}, "model_type"),
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj"),
    ({"num_heads": "64"}, "num_heads"),
    ({"d_model": 0}, "d_model"),
    ({"layer_norm_epsilon": -1.0}, "layer_norm_epsilon"),
    ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
])
def test_config_errors_name_the_field(edit, field):
    with pytest.raises(ConfigError, match=field):
        UMT5Config.from_dict({**UMT5_XXL, **edit})


def test_config_error_names_the_file(tmp_path):
    out = tmp_path / "umt5_tiny"
    shutil.copytree(FIXTURES / "umt5_tiny", out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(WeightsError, match=r"config\.json.*'feed_forward_proj' = 'gated-silu'"):
        load_text_encoder(out)
