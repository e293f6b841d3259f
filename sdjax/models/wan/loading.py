"""Loading the Wan DiT from a diffusers-format directory, the original Wan layout, or an Orbax checkpoint.

Construction and loading are separate: the model is built abstractly (`nnx.eval_shape`, no memory), every
parameter is mapped to exactly one checkpoint tensor (strict: missing, unexpected or mis-shaped tensors are
errors naming the key), and each tensor is read from the memory-mapped file only when it is placed. Two
reparametrizations happen on the way (the same function): the self-attention's q/k columns go into RoPE-halves
order (`rope_pair_permutation`), and each attention's v bias is folded into its output bias (`fold_v_bias`).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.models.wan.transformer import WanTransformer3DModel, WanTransformerConfig, rope_pair_permutation
from sdjax.models.weights import SafetensorsDir, WeightsError, check_keys, fetch, read_config

# Our module names differ from diffusers' in two places (torch ModuleList/Sequential indices).
_OURS_TO_DIFFUSERS = (("to_out.", "to_out.0."), ("ffn.fc1.", "ffn.net.0.proj."), ("ffn.fc2.", "ffn.net.2."))

# Original Wan2.1 checkpoint names -> diffusers names (block-level names use the {i} placeholder).
_ORIGINAL_TO_DIFFUSERS = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
]

# Original `config.json` field names -> diffusers names.
_ORIGINAL_CONFIG = {"num_heads": "num_attention_heads", "in_dim": "in_channels", "out_dim": "out_channels",
                    "num_layers": "num_layers", "ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "eps": "eps"}


def original_to_diffusers_key(key: str) -> str:
    for pattern, repl in _ORIGINAL_TO_DIFFUSERS:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key  # patch_embedding.* is the same in both


def original_to_diffusers_config(raw: dict) -> dict:
    """The original `config.json` (dim, num_heads, ...) in diffusers' names."""
    if "dim" not in raw or "num_heads" not in raw:
        raise WeightsError("original Wan config.json needs 'dim' and 'num_heads'")
    out = {new: raw[old] for old, new in _ORIGINAL_CONFIG.items() if old in raw}
    out["attention_head_dim"] = raw["dim"] // raw["num_heads"]
    out["text_dim"] = raw.get("text_dim", 4096)
    return out


def _is_original_layout(tensors) -> bool:
    return any(k.startswith(("time_embedding.", "head.head.")) for k in tensors)


def param_entries(abstract_model):
    """(our path, diffusers key or per-layer key template `blocks.{i}.…`, variable, stacked?) per parameter.

    The one map between our parameters and checkpoint names (loading here, export in `checkpoint_tensors`); the
    checkpoint's v biases are no parameter of ours (`fold_v_bias`)."""
    state = nnx.state(abstract_model, nnx.Param)
    entries = []
    for path, var in nnx.to_flat_state(state):
        dotted = ".".join(str(p) for p in path)
        leaf = path[-1]
        key = dotted
        if leaf == "kernel":
            key = key[: -len("kernel")] + "weight"
        for ours, theirs in _OURS_TO_DIFFUSERS:
            key = key.replace(ours, theirs)
        stacked = path[0] == "blocks"
        if stacked:
            key = "blocks.{i}." + key[len("blocks.") :]
        entries.append((path, key, var, stacked))
    return entries


# Self-attention q/k outputs whose columns hold RoPE pairs (reordered into halves, see `rope_pair_permutation`).
_ROPE_PERMUTED = {("attn1", "to_q", "kernel"), ("attn1", "to_q", "bias"), ("attn1", "norm_q", "weight"),
                  ("attn1", "to_k", "kernel"), ("attn1", "to_k", "bias"), ("attn1", "norm_k", "weight")}


def to_our_layout(arr: np.ndarray, path: tuple, cfg: WanTransformerConfig) -> np.ndarray:
    """One checkpoint tensor (torch layout, one layer) -> ours.

    Linear (out, in) -> (in, out); Conv3d (O, I, t, h, w) -> (t, h, w, I, O); self-attention q/k columns in
    RoPE-halves order. `from_our_layout` is the inverse (export)."""
    leaf = str(path[-1])
    if leaf == "kernel" and arr.ndim == 2:
        arr = arr.T
    elif leaf == "kernel" and arr.ndim == 5:
        arr = arr.transpose(2, 3, 4, 1, 0)
    if tuple(map(str, path[-3:])) in _ROPE_PERMUTED:
        arr = arr[..., rope_pair_permutation(cfg.num_attention_heads, cfg.attention_head_dim)]
    return arr


def from_our_layout(arr: np.ndarray, path: tuple, cfg: WanTransformerConfig) -> np.ndarray:
    """Inverse of `to_our_layout`: one layer's parameter in the checkpoint's (torch) layout."""
    leaf = str(path[-1])
    if tuple(map(str, path[-3:])) in _ROPE_PERMUTED:
        arr = arr[..., np.argsort(rope_pair_permutation(cfg.num_attention_heads, cfg.attention_head_dim))]
    if leaf == "kernel" and arr.ndim == 2:
        arr = arr.T
    elif leaf == "kernel" and arr.ndim == 5:
        arr = arr.transpose(4, 3, 0, 1, 2)
    return arr


# An attention's output bias (diffusers name ending): loading folds the same attention's v bias into it.
_OUT_BIAS = "to_out.0.bias"


def _v_bias_key(out_bias_key: str) -> str:
    return out_bias_key.removesuffix(_OUT_BIAS) + "to_v.bias"


def fold_v_bias(out_bias: np.ndarray, out_weight: np.ndarray, v_bias: np.ndarray) -> np.ndarray:
    """b_o + W_o b_v in float64, from checkpoint tensors (W_o is torch's (out, in)): the output bias that makes v's
    bias unnecessary. Exact as a function: softmax rows sum to 1, so attn(q, k, v + b_v) W_o + b_o =
    attn(q, k, v) W_o + (b_o + W_o b_v) (`Attention.__call__` has no v bias)."""
    # einsum casts W_o to float64 block by block: no float64 copy of the whole matrix
    return out_bias.astype(np.float64) + np.einsum("oi,i->o", out_weight, v_bias.astype(np.float64))


def _folded_out_bias(tensors, names: dict, key: str, dim: int, where: str) -> np.ndarray:
    """The output bias `key` with its attention's v bias folded in (`fold_v_bias`), the three shapes checked."""
    read = lambda k, shape: fetch(tensors, names[k], shape, where)
    return fold_v_bias(read(key, (dim,)), read(key.removesuffix("bias") + "weight", (dim, dim)),
                       read(_v_bias_key(key), (dim,)))


def checkpoint_tensors(model: WanTransformer3DModel) -> dict[str, np.ndarray]:
    """The model's parameters as diffusers checkpoint tensors (names and layout; export). The inverse of loading,
    except that the v biases folded into the output biases come back as zeros: the same function."""
    tensors = {}
    for path, key, var, stacked in param_entries(model):
        value = np.asarray(var[...])
        for i, v in enumerate(value if stacked else [value]):
            k = key.format(i=i)
            tensors[k] = from_our_layout(v, path, model.config)
            if k.endswith(_OUT_BIAS):
                tensors[_v_bias_key(k)] = np.zeros_like(tensors[k])
    return tensors


def load_weights_into(model: WanTransformer3DModel, directory: str | Path, shardings=None) -> None:
    """Fill every parameter of `model` (possibly abstract) from safetensors in `directory`, strictly."""
    tensors = SafetensorsDir(directory)
    original = _is_original_layout(tensors)
    names = {original_to_diffusers_key(k): k for k in tensors} if original else {k: k for k in tensors}
    entries = param_entries(model)
    n_layers = model.config.num_layers
    expected = set()
    for _, key, _, stacked in entries:
        expected.update(key.format(i=i) for i in range(n_layers)) if stacked else expected.add(key)
    expected.update([_v_bias_key(k) for k in expected if k.endswith(_OUT_BIAS)])  # read by `fold_v_bias`
    check_keys(set(names), expected, str(directory))

    flat = {}
    for path, key, var, stacked in entries:
        keys = [key.format(i=i) for i in range(n_layers)] if stacked else [key]
        want = tuple(var.shape[1:]) if stacked else tuple(var.shape)
        parts = []
        for k in keys:
            if k.endswith(_OUT_BIAS):
                arr = _folded_out_bias(tensors, names, k, want[0], str(directory))
            else:
                arr = tensors[names[k]]
            arr = to_our_layout(arr, path, model.config)
            if tuple(arr.shape) != want:
                raise WeightsError(f"{directory}: tensor {names[k]!r} has shape {tuple(arr.shape)} "
                                   f"(in our layout), model expects {want}")
            parts.append(np.asarray(arr, dtype=var.dtype))
        value = np.stack(parts) if stacked else parts[0]
        sharding = None if shardings is None else shardings.get(path)
        flat[path] = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
    _assign(model, flat)


def _assign(model, flat):
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(flat[path])
    nnx.update(model, state)


def read_transformer_config(directory: str | Path) -> WanTransformerConfig:
    raw = read_config(directory)
    if raw.get("_class_name") == "WanModel" or "dim" in raw:
        raw = original_to_diffusers_config(raw)
    try:
        return WanTransformerConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{Path(directory) / 'config.json'}: {e}") from None


def abstract_transformer(cfg: WanTransformerConfig, dtype: str, attention_backend: str = "auto",
                         fused_backend: str = "auto", residual_dtype: str | None = None):
    """The model without memory (`nnx.eval_shape`). `fused_backend` picks the kernels that fuse element-wise work
    into a pass (q/k RMSNorm + RoPE, residual add + LayerNorm): "auto" or "xla" (benchmarks' A/B)."""
    return nnx.eval_shape(lambda: WanTransformer3DModel(cfg, dtype=dtype, residual_dtype=residual_dtype,
                                                        attention_backend=attention_backend,
                                                        fused_backend=fused_backend, rngs=nnx.Rngs(0)))


def load_transformer(path: str | Path, dtype: str = "float32", *, residual_dtype: str | None = None,
                     attention_backend: str = "auto", expected_config: WanTransformerConfig | None = None,
                     system=None) -> WanTransformer3DModel:
    """The Wan DiT from a diffusers `transformer/` dir, an original Wan dir, or an Orbax dir (`convert`).

    `system` (a `SystemConfig`) with more than one device: the model is placed on its mesh, each tensor going
    straight to its devices, and runs there (`sdjax.sharding`); callers still pass ordinary inputs.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: transformer weights directory does not exist")
    cfg = read_transformer_config(path)
    if expected_config is not None:
        try:
            expected_config.check_matches(dataclasses_asdict(cfg), str(path / "config.json"))
        except ValueError as e:
            raise WeightsError(str(e)) from None
    model = abstract_transformer(cfg, dtype, attention_backend, residual_dtype=residual_dtype)
    shardings = None
    if system is not None and system.num_devices > 1:
        from sdjax.sharding import make_mesh, param_shardings, shard_transformer

        # The abstract leaves get their mesh shardings first; loading then places every tensor there.
        shard_transformer(model, make_mesh(system), shard_weights=system.shard_weights)
        shardings = param_shardings(model)
    if (path / "orbax").is_dir():  # converted by `python -m sdjax.convert`
        from sdjax.models.wan.convert import restore_into

        restore_into(model, path / "orbax")
    else:
        load_weights_into(model, path, shardings)
    return model


def dataclasses_asdict(cfg) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
