"""Parity of the Wan DiT with diffusers' WanTransformer3DModel (fixtures: tools/make_wan_dit_fixtures.py)."""

import json
import re
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.kernels.norm import apply_rope
from sdjax.models.wan import load_transformer
from sdjax.models.wan.loading import abstract_transformer
from sdjax.models.wan.transformer import (
    FP32_PARAMS,
    FeedForward,
    FoldedText,
    WanTransformerConfig,
    fold_text_padding,
    rope_angles,
    rope_pair_permutation,
    text_lengths,
)
from sdjax.models.weights import WeightsError
from tests.conftest import FIXTURES, rel_l2

DIT = FIXTURES / "wan_dit"
CASES = ["heads2_odd", "heads3_b2", "heads4_deep"]


def run(model, io):
    return np.asarray(jax.jit(lambda m, x, t, c: m(x, t, c))(
        model, jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"])))


@pytest.mark.parametrize("case", CASES)
def test_fp32_parity(case):
    io = np.load(DIT / case / "io.npz")
    out = run(load_transformer(DIT / case, dtype="float32"), io)
    assert out.shape == io["output"].shape
    assert rel_l2(out, io["output"]) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_bf16_close_to_fp32_reference(case):
    io = np.load(DIT / case / "io.npz")
    out = run(load_transformer(DIT / case, dtype="bfloat16"), io)
    assert out.dtype == np.float32
    assert rel_l2(out, io["output"]) <= 1e-2


@pytest.mark.parametrize("case", CASES)
def test_bf16_residual_stream_is_as_accurate_as_diffusers_bf16(case):
    """bf16 stores the residual stream as diffusers does; its error against the fp32 reference stays within
    diffusers' own bf16 run's (measured: 0.87-0.99 of it), and above that of `residual_dtype="float32"` (the
    original Wan's placement: 0.71-0.73 of it)."""
    io = np.load(DIT / case / "io.npz")
    diffusers_err = rel_l2(io["output_diffusers_bf16"], io["output"])
    bf16_stream = load_transformer(DIT / case, dtype="bfloat16")
    err = rel_l2(run(bf16_stream, io), io["output"])
    fp32_stream = load_transformer(DIT / case, dtype="bfloat16", residual_dtype="float32")
    fp32_err = rel_l2(run(fp32_stream, io), io["output"])
    assert err <= 1.05 * diffusers_err
    assert fp32_err < err
    x = bf16_stream.embed(jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"]))[0]
    assert x.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype, residual", [("float32", "bfloat16"), ("bfloat16", "float16"), ("float16", "float32")])
def test_residual_dtype_combinations_are_checked(dtype, residual):
    cfg = WanTransformerConfig(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32)
    with pytest.raises(ValueError, match="dtype"):
        abstract_transformer(cfg, dtype, residual_dtype=residual)


def test_original_wan_layout_loads_to_the_same_function():
    io = np.load(DIT / "heads2_odd" / "io.npz")
    out = run(load_transformer(DIT / "heads2_odd" / "original", dtype="float32"), io)
    assert rel_l2(out, io["output"]) <= 1e-5


def test_bf16_keeps_exactly_the_declared_params_in_fp32():
    cfg = WanTransformerConfig(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32)
    model = abstract_transformer(cfg, "bfloat16")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        dotted = ".".join(map(str, path))
        declared = any(frag in dotted for frag in FP32_PARAMS)
        assert (var.dtype == jnp.float32) == declared, dotted


@pytest.mark.parametrize("name, count", [("wan2.1-t2v-1.3b", 1_418_996_800), ("wan2.1-t2v-14b", 14_288_491_584)])
def test_real_size_parameter_counts(name, count):
    from sdjax.config import ModelConfig

    cfg = WanTransformerConfig.from_dict(ModelConfig.named(name).transformer)
    model = abstract_transformer(cfg, "bfloat16")  # abstract: no memory
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    folded_v_biases = 2 * cfg.num_layers * cfg.dim  # the checkpoint's, folded into to_out's at load
    assert n + folded_v_biases == count


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture
def tiny_copy(tmp_path):
    d = tmp_path / "transformer"
    shutil.copytree(DIT / "heads4_deep", d, ignore=shutil.ignore_patterns("io.npz"))
    return d


def _rewrite(d, edit):
    from safetensors.numpy import load_file, save_file

    f = d / "diffusion_pytorch_model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


@pytest.mark.parametrize("key", ["blocks.1.attn1.to_q.weight", "blocks.2.attn2.to_v.bias"])
def test_missing_tensor_is_named(tiny_copy, key):
    _rewrite(tiny_copy, lambda t: t.pop(key))
    with pytest.raises(WeightsError, match=f"missing .*{re.escape(key)}"):
        load_transformer(tiny_copy)


def test_unexpected_tensor_is_named(tiny_copy):
    _rewrite(tiny_copy, lambda t: t.update(extra_weight=np.zeros(3, np.float32)))
    with pytest.raises(WeightsError, match="unexpected .*extra_weight"):
        load_transformer(tiny_copy)


@pytest.mark.parametrize("key, shape", [("proj_out.bias", (5,)), ("blocks.0.attn1.to_v.bias", (5,)),
                                        ("blocks.3.attn2.to_out.0.weight", (16, 15))])
def test_misshaped_tensor_is_named(tiny_copy, key, shape):
    _rewrite(tiny_copy, lambda t: t.update({key: np.zeros(shape, np.float32)}))
    with pytest.raises(WeightsError, match=f"{re.escape(key)}.*shape"):
        load_transformer(tiny_copy)


def test_truncated_file(tiny_copy):
    f = tiny_copy / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        load_transformer(tiny_copy)


def test_corrupted_header(tiny_copy):
    f = tiny_copy / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        load_transformer(tiny_copy)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "t").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        load_transformer(tmp_path / "t")


def test_config_disagreeing_with_model_yaml_names_the_field(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    expected = WanTransformerConfig.from_dict({**cfg, "ffn_dim": 64})
    with pytest.raises(WeightsError, match="ffn_dim"):
        load_transformer(tiny_copy, expected_config=expected)


def test_unsupported_config_field(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "image_dim": 1280}))
    with pytest.raises(WeightsError, match="image_dim"):
        load_transformer(tiny_copy)


def test_wrong_input_shapes_are_named():
    model = load_transformer(DIT / "heads4_deep")
    x, t, c = jnp.zeros((1, 8, 2, 8, 6)), jnp.array([1]), jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match="latents"):
        model(jnp.zeros((1, 7, 2, 8, 6)), t, c)
    with pytest.raises(ValueError, match="H=7"):
        model(jnp.zeros((1, 8, 2, 7, 6)), t, c)
    with pytest.raises(ValueError, match="timestep"):
        model(x, jnp.array([1, 2]), c)
    with pytest.raises(ValueError, match="context"):
        model(x, t, jnp.zeros((1, 4, 15)))
    with pytest.raises(ValueError, match="floating"):
        model(x.astype(jnp.int32), t, c)


def test_convert_to_orbax_and_restore(tmp_path):
    from sdjax.convert import main

    assert main([str(DIT / "heads3_b2"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    io = np.load(DIT / "heads3_b2" / "io.npz")
    out = run(load_transformer(tmp_path / "ckpt", dtype="float32"), io)
    assert rel_l2(out, io["output"]) <= 1e-5
    assert main([str(DIT / "heads3_b2"), str(tmp_path / "ckpt")]) == 2  # refuses to overwrite


# Layouts of older converted directories: none recorded (before q/k columns were reordered), then q/k reordered
# but v's bias not yet folded.
@pytest.mark.parametrize("old_layout", [None, "rope-halves"])
def test_orbax_checkpoint_of_another_param_layout_is_refused(tmp_path, old_layout):
    from sdjax.convert import main

    assert main([str(DIT / "heads3_b2"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    config = tmp_path / "ckpt" / "config.json"
    raw = json.loads(config.read_text())
    raw.pop("_sdjax_param_layout")
    if old_layout is not None:
        raw["_sdjax_param_layout"] = old_layout
    config.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=f"parameter layout {old_layout!r}.*convert the safetensors again"):
        load_transformer(tmp_path / "ckpt", dtype="float32")


def test_rope_on_halves_equals_rope_on_interleaved_pairs():
    """The load-time q/k column order: RoPE on halves of the permuted vector = the permuted interleaved RoPE."""
    N, K, L = 3, 12, 5
    x = np.random.default_rng(0).standard_normal((1, L, N * K))
    ang = np.random.default_rng(1).uniform(-3, 3, (L, K // 2))
    pairs = x.reshape(1, L, N, K // 2, 2)
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    interleaved = np.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    perm = rope_pair_permutation(N, K)
    with jax.enable_x64():
        halves = apply_rope(jnp.asarray(x[..., perm].reshape(1, L, N, K)), jnp.asarray(np.cos(ang)),
                            jnp.asarray(np.sin(ang)))
    want = interleaved.reshape(1, L, N * K)[..., perm].reshape(1, L, N, K)
    np.testing.assert_allclose(np.asarray(halves, np.float64), want, rtol=1e-6, atol=1e-6)


def test_param_layout_round_trips_to_the_checkpoint():
    """Export (`checkpoint_tensors`) gives back every checkpoint tensor, except that v's bias, folded into to_out's
    at load, comes back as zeros beside to_out's bias b_o + W_o b_v; and the layout does change the q/k columns."""
    from safetensors.numpy import load_file

    from sdjax.models.wan.loading import checkpoint_tensors, param_entries

    src = DIT / "heads3_b2"
    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    model = load_transformer(src, dtype="float32")
    exported = checkpoint_tensors(model)
    assert set(exported) == set(tensors)
    for key, want in tensors.items():
        if key.endswith("to_v.bias"):
            np.testing.assert_array_equal(exported[key], np.zeros_like(want), err_msg=key)
        elif key.endswith("to_out.0.bias"):
            v_bias, w_out = tensors[key.replace("to_out.0", "to_v")], tensors[key.replace("bias", "weight")]
            folded = want.astype(np.float64) + w_out.astype(np.float64) @ v_bias.astype(np.float64)
            np.testing.assert_allclose(exported[key], folded, rtol=1e-6, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(exported[key], want, err_msg=key)
    differs = set()  # parameters (vectors, matrices) that are not the checkpoint's tensor (transposed)
    for _, key, var, stacked in param_entries(model):
        value = np.asarray(var[...])
        for i, v in enumerate(value if stacked else [value]):
            if v.ndim <= 2 and not np.array_equal(v, tensors[key.format(i=i)].T):
                differs.add(key.format(i=i))
    rope_halves = ["attn1.to_q.weight", "attn1.to_q.bias", "attn1.norm_q.weight", "attn1.to_k.weight",
                   "attn1.to_k.bias", "attn1.norm_k.weight"]
    folded = ["attn1.to_out.0.bias", "attn2.to_out.0.bias"]
    assert differs == {f"blocks.{i}.{name}" for i in range(model.config.num_layers) for name in rope_halves + folded}


def _attention_with_v_bias(v_bias, backend, q, k, v):
    """The attention kernel on v + v_bias (N, K): the unfolded form."""
    from sdjax.kernels.attention import attention

    return attention(q, k, v + v_bias, backend=backend)


def test_v_bias_folded_into_the_output_bias_is_the_same_attention(tiny_copy):
    """Loading folds each attention's v bias into its output bias (`fold_v_bias`): the model has no v bias, and
    each attention (self and cross, every layer) gives attn(q, k, v + b_v) W_o + b_o with the checkpoint's b_v and
    b_o — computed by the same module with b_v added to v — to fp32 rounding."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(3)  # v biases of unit scale (the fixture's are 0.1), so the fold carries weight
    _rewrite(tiny_copy, lambda t: t.update({k: rng.standard_normal(v.shape).astype(np.float32)
                                            for k, v in t.items() if k.endswith("to_v.bias")}))
    tensors = load_file(tiny_copy / "diffusion_pytorch_model.safetensors")
    model = load_transformer(tiny_copy, dtype="float32")
    paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "blocks.attn1.to_v.kernel" in paths and not any("to_v.bias" in p for p in paths)

    cfg = model.config
    kx, kc = jax.random.split(jax.random.key(0))
    x, context = jax.random.normal(kx, (2, 24, cfg.dim)), jax.random.normal(kc, (2, 7, cfg.dim))
    cos, sin = rope_angles((2, 3, 4), cfg.attention_head_dim, cfg.rope_theta)  # 24 tokens
    self_inputs, cross_inputs = dict(rope=(jnp.asarray(cos), jnp.asarray(sin))), dict(context=context)
    graphdef, state = nnx.split(model.blocks)
    for i in range(cfg.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda w, i=i: w[i], state))
        for name, inputs in (("attn1", self_inputs), ("attn2", cross_inputs)):
            attn = getattr(block, name)
            assert attn.to_v.bias is None
            v_bias = tensors[f"blocks.{i}.{name}.to_v.bias"].reshape(attn.heads, -1)  # (N, K): per head
            out_bias = tensors[f"blocks.{i}.{name}.to_out.0.bias"]
            y, y_bias = attn(x, **inputs)
            unfolded = partial(_attention_with_v_bias, v_bias, attn.backend)
            want = np.asarray(attn(x, attend=unfolded, **inputs)[0]) + out_bias
            assert rel_l2(np.asarray(y + y_bias), want) <= 1e-6, (i, name)
            assert rel_l2(np.asarray(y) + out_bias, want) > 1e-2  # without the fold: another function


def test_self_attention_hands_the_keys_norms_to_the_kernel(monkeypatch):
    """The self-attention on one device takes each head's largest key norm from k's norm pass and gives it to the
    attention (`k_norms`: our Hopper kernel's held-maxima bound, instead of its own pass over k); the cross-attention
    and injected `attend` kernels (sequence parallelism) get none, nor do backends named that take none (the lossy ones,
    xla, cudnn)."""
    from sdjax.kernels import flash_mgpu
    from sdjax.models.wan import transformer

    seen, attention = [], transformer.attention

    def spy(q, k, v, *, k_norms=None, **kw):
        seen.append((k, k_norms))
        return attention(q, k, v, **kw)

    monkeypatch.setattr(transformer, "attention", spy)
    model = load_transformer(DIT / "heads3_b2", dtype="float32")
    cfg = model.config
    graphdef, state = nnx.split(model.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda w: w[0], state))
    kx, kc = jax.random.split(jax.random.key(0))
    x, context = jax.random.normal(kx, (2, 24, cfg.dim)), jax.random.normal(kc, (2, 7, cfg.dim))
    cos, sin = rope_angles((2, 3, 4), cfg.attention_head_dim, cfg.rope_theta)
    block.attn1(x, rope=(jnp.asarray(cos), jnp.asarray(sin)))
    block.attn2(x, context=context)
    (k_self, norms), (_, cross_norms) = seen
    np.testing.assert_allclose(np.asarray(norms), np.asarray(flash_mgpu.max_key_norms(k_self)), rtol=1e-6)
    assert cross_norms is None
    block.attn1(x, rope=(jnp.asarray(cos), jnp.asarray(sin)), attend=lambda q, k, v: q)
    assert len(seen) == 2  # the injected kernel ran instead
    block.attn1.backend = "xla"  # a backend asked for by name that takes no k_norms: none are taken
    block.attn1(x, rope=(jnp.asarray(cos), jnp.asarray(sin)))
    assert seen[2][1] is None


def test_sharded_safetensors_with_index(tmp_path):
    """A checkpoint split into shards with a `*.safetensors.index.json`, as large models are saved."""
    from safetensors.numpy import load_file, save_file

    src = DIT / "heads3_b2"
    d = tmp_path / "transformer"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    names = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / fname)
        weight_map.update(dict.fromkeys(keys, fname))
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    io = np.load(src / "io.npz")
    assert rel_l2(run(load_transformer(d, dtype="float32"), io), io["output"]) <= 1e-5
    (d / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="00002-of-00002.*missing"):
        load_transformer(d)


@pytest.mark.parametrize("lossy", ["pallas_mgpu_int8", "pallas_mgpu_int8_fp8"])
def test_a_lossy_attention_kernel_serves_the_self_attention_only(lossy):
    cfg = WanTransformerConfig(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=1, text_dim=32)
    block = abstract_transformer(cfg, "bfloat16", lossy).blocks
    assert (block.attn1.backend, block.attn2.backend) == (lossy, "auto")
    block = abstract_transformer(cfg, "bfloat16", "cudnn").blocks
    assert (block.attn1.backend, block.attn2.backend) == ("cudnn", "cudnn")


def _cfg_batch_inputs(io):
    """A CFG batch as the sampler builds it: one latent and timestep twice, conditional then unconditional text."""
    x, t, c = (jnp.asarray(io[k][:1]) for k in ("latents", "timestep", "context"))
    uncond = jnp.asarray(np.random.default_rng(1).standard_normal(c.shape, np.float32))
    return jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([c, uncond])


@pytest.mark.parametrize("case", CASES)
def test_cfg_batch_runs_block_0_self_attention_once_for_the_same_result(case):
    """`cfg_batch=True` (block 0's self-attention half on the first branch only, shared) is the same function on
    a CFG batch (fp32, rel. L2 <= 1e-6), and costs one self-attention half of one layer at batch 1 less."""
    io = np.load(DIT / case / "io.npz")
    model = load_transformer(DIT / case, dtype="float32")
    x, t, c = _cfg_batch_inputs(io)
    forward = lambda shared: jax.jit(lambda m, x, t, c: m(x, t, c, cfg_batch=shared))
    plain, shared = (np.asarray(forward(s)(model, x, t, c)) for s in (False, True))
    assert rel_l2(shared, plain) <= 1e-6
    assert rel_l2(shared[:1], shared[1:]) > 1e-3  # the texts differ, so the branches do too (not one copied)

    # Block 0 alone (XLA's cost analysis counts a loop's body once, so the whole forward would not show it).
    h, _, e0, text, rope = model.embed(x, t, c)
    block0 = lambda s: jax.jit(lambda m, h: m.run_blocks(h, e0, text, rope, layers=(0, 1), cfg_batch=s))
    flops = lambda s: block0(s).lower(model, h).compile().cost_analysis()["flops"]
    L, D = h.shape[1], model.config.dim
    self_attention_b1 = 4 * 2 * L * D * D + 2 * 2 * L * L * D  # q, k, v, out projections + QKᵀ and PV
    saved = flops(False) - flops(True)
    assert 0.9 * self_attention_b1 <= saved <= 1.5 * self_attention_b1  # (+ its norms and modulation)


def test_cfg_batch_first_block_alone_is_the_first_block():
    """The first-block cache runs block 0 by itself (layers=(0, 1)); with cfg_batch it shares the same way."""
    io = np.load(DIT / "heads3_b2" / "io.npz")
    model = load_transformer(DIT / "heads3_b2", dtype="float32")
    x, t, c = _cfg_batch_inputs(io)
    h, _, e0, text, rope = model.embed(x, t, c)
    for layers in [(0, 1), (0, None), (1, None)]:
        plain = model.run_blocks(h, e0, text, rope, layers=layers)
        shared = model.run_blocks(h, e0, text, rope, layers=layers, cfg_batch=True)
        assert rel_l2(np.asarray(shared), np.asarray(plain)) <= 1e-6, layers


def _padded_context(io, lengths, S):
    """Wan's text contexts: each row's first `lengths[b]` tokens real, zero rows up to S."""
    rng = np.random.default_rng(2)
    c = rng.standard_normal((len(lengths), S, io["context"].shape[2])).astype(np.float32)
    for b, n in enumerate(lengths):
        c[b, n:] = 0.0
    return jnp.asarray(c)


@pytest.mark.parametrize("cfg_batch", [False, True], ids=["batch", "cfg_batch"])
def test_folded_text_padding_is_the_same_function(cfg_batch):
    """Attention to M equal padded keys = attention to m of them with log(M / m) on their logits: a context folded
    to its first `keep` rows (`fold_text_padding`) gives the forward of the whole padded one (fp32, 1e-6)."""
    io = np.load(DIT / "heads3_b2" / "io.npz")
    model = load_transformer(DIT / "heads3_b2", dtype="float32")
    lengths, S, keep = [5, 11], 64, 16
    c = _padded_context(io, lengths, S)
    x, t = (jnp.asarray(io[k][:1]) for k in ("latents", "timestep"))
    x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
    np.testing.assert_array_equal(np.asarray(text_lengths(c)), lengths)
    folded = fold_text_padding(c, text_lengths(c), keep)
    assert folded.context.shape == (2, keep, c.shape[2])
    expected = np.log([(S - 5) / (keep - 5), (S - 11) / (keep - 11)])  # log(padded rows / kept zero rows)
    np.testing.assert_allclose(np.asarray(folded.key_bias[:, -1]), expected, rtol=1e-6)
    assert not np.asarray(folded.key_bias[0, :5]).any() and not np.asarray(folded.key_bias[1, :11]).any()
    forward = jax.jit(lambda m, x, t, c: m(x, t, c, cfg_batch=cfg_batch))
    whole, fewer = np.asarray(forward(model, x, t, c)), np.asarray(forward(model, x, t, folded))
    assert rel_l2(fewer, whole) <= 1e-6
    truncated = np.asarray(forward(model, x, t, c[:, :keep]))  # the same rows without the bias: another function
    assert rel_l2(truncated, whole) > 1e-4


def test_folded_text_checks_its_bias_shape():
    io = np.load(DIT / "heads2_odd" / "io.npz")
    model = load_transformer(DIT / "heads2_odd", dtype="float32")
    c = _padded_context(io, [3], 16)
    x, t = jnp.asarray(io["latents"][:1]), jnp.asarray(io["timestep"][:1])
    with pytest.raises(ValueError, match="key_bias must be"):
        model(x, t, FoldedText(c[:, :8], jnp.zeros((1, 7))))


def test_ffn_into_stream_is_the_gated_residual_add_with_the_gate_folded_into_fc2():
    """x + gate · ffn(u) with one gate for the batch: the same function (fp32: rel. L2 <= 1e-6; bf16 against the
    fp32 result: within bf16 rounding), and in bf16 the stream add stays in the GEMM's dtype — the form XLA's GEMM
    rewriter turns into cuBLASLt's bias + C epilogue on GPUs (benchmarks/dit_step.py counts those)."""
    ffn, ffn32 = FeedForward(24, 56, jnp.bfloat16, nnx.Rngs(0)), FeedForward(24, 56, jnp.float32, nnx.Rngs(0))
    nnx.update(ffn32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(ffn)))  # the same weights
    kx, ku, kg = jax.random.split(jax.random.key(1), 3)
    x, u = jax.random.normal(kx, (2, 8, 24)), jax.random.normal(ku, (2, 8, 24))
    gate = 1 + 0.3 * jax.random.normal(kg, (24,))
    plain = np.asarray(x + gate * ffn32(u))
    assert rel_l2(np.asarray(ffn32.into_stream(x, u, gate)), plain) <= 1e-6

    into_stream = jax.jit(lambda m, x, u, g: m.into_stream(x, u, g))
    args = (ffn, x.astype(jnp.bfloat16), u.astype(jnp.bfloat16), gate)
    out = into_stream(*args)
    assert out.dtype == jnp.bfloat16 and rel_l2(np.asarray(out, np.float32), plain) <= 1e-2
    assert not re.search(r"stablehlo\.convert [^\n]*-> tensor<2x8x24xf32>", into_stream.lower(*args).as_text())
