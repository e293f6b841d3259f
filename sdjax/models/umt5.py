"""UMT5 / T5 text encoder (Wan2.1's UMT5-XXL), matching transformers' `UMT5EncoderModel` / `T5EncoderModel`.

Forward (shared/research/wan.md §3), pre-norm residual blocks without biases:

    h = shared[ids]                                            # (B, L, D)
    for each layer:
        h = h + o(softmax(q kᵀ + bias + mask) v)               # no 1/sqrt(d) scaling (T5 convention)
        h = h + wo(act(wi_0 n) * wi_1 n)   or   wo(relu(wi n))  # n = RMSNorm(h)
    out = RMSNorm(h)

- `model_type` "umt5": every layer has its own relative-position bias table; "t5": only layer 0 has one and
  all layers share it (here it lives at `encoder.relative_attention_bias`, loaded from
  `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`).
- Padded keys are masked with the float32 minimum, like transformers; padded query rows are computed anyway.

Parameters keep transformers' names and layouts (Linear weights are `(out, in)`), so the checkpoint map is
the identity except that the layers are stacked: `encoder.block.layer.0.SelfAttention.q.weight` has shape
(num_layers, out, in) and holds transformers' `encoder.block.{i}.layer.0.SelfAttention.q.weight`. The stack
is applied with `jax.lax.scan`, so compile time does not grow with depth.

Precision. dtype "float32" reproduces transformers in fp32. dtype "bfloat16" stores every weight in bf16 (as
transformers does with `dtype=torch.bfloat16`: its `_keep_in_fp32_modules = {"wo"}` applies to float16 only);
activations and the residual stream are bf16, and these run in float32:
  - RMSNorm statistics and normalisation (cast to bf16 before the weight multiply, as transformers does);
  - matmul accumulation (`preferred_element_type`), rounded to bf16 once per matmul;
  - attention logits, position bias, mask and softmax (probabilities cast to bf16 for the value matmul).
In float32 every matmul runs at full precision (`sdjax.numerics`: no TF32 on GPUs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sdjax.models.weights import SafetensorsDir, WeightsError, check_keys, fetch, read_config
from sdjax.numerics import matmul_precision

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FEED_FORWARD = ("gated-gelu", "relu")

# transformers' defaults: `save_pretrained` writes only the fields that differ from them.
_DEFAULTS = {
    "umt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"),
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, feed_forward_proj="relu"),
}


class ConfigError(ValueError):
    """A text-encoder config.json field that is missing, malformed or unsupported."""


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    model_type: str  # "umt5" (bias table per layer) or "t5" (layer 0's table shared)
    vocab_size: int
    d_model: int
    d_kv: int  # per-head dim; inner attention dim = num_heads * d_kv
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    feed_forward_proj: str  # "gated-gelu" (gelu_new = tanh approximation) or "relu"

    @property
    def bias_per_layer(self) -> bool:
        return self.model_type == "umt5"

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_dict(cls, d: dict, where: str = "text encoder config") -> UMT5Config:
        """From a transformers `config.json` dict; missing fields take transformers' defaults."""
        model_type = d.get("model_type")
        if model_type not in _DEFAULTS:
            raise ConfigError(f"{where}: model_type {model_type!r} is not supported (allowed: {list(_DEFAULTS)})")
        values = {k: d.get(k, default) for k, default in _DEFAULTS[model_type].items()}
        for k, v in values.items():
            if k == "layer_norm_epsilon":
                ok = isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                want = "a positive number"
            elif k == "feed_forward_proj":
                ok, want = v in FEED_FORWARD, f"one of {list(FEED_FORWARD)}"
            else:
                ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
                want = "a positive integer"
            if not ok:
                raise ConfigError(f"{where}: field {k!r} = {v!r} is not supported (must be {want})")
        if values["relative_attention_num_buckets"] < 4:
            raise ConfigError(f"{where}: field 'relative_attention_num_buckets' must be >= 4 (bidirectional "
                              f"buckets need an exact half), got {values['relative_attention_num_buckets']}")
        return cls(model_type=model_type, **values)


def _jnp_dtype(dtype) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (allowed: {list(DTYPES)})")
    return DTYPES[name]


# ---- relative position buckets ----------------------------------------------------------------------------

def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """transformers' bidirectional (encoder) T5 bucket of `key_pos - query_pos`, int32.

    Half of the buckets per sign; within a half, distances below `num_buckets // 4` are exact, larger ones are
    log-spaced up to `max_distance` and clipped. The log is taken in float32 like torch, on the host (numpy),
    so the buckets are the same on every backend.
    """
    rel = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    bucket = (rel > 0).astype(np.int64) * half
    n = np.abs(rel)
    max_exact = half // 2
    ratio = np.log(np.maximum(n, 1).astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
    large = np.minimum(max_exact + (ratio * (half - max_exact)).astype(np.int64), half - 1)
    return (bucket + np.where(n < max_exact, n, large)).astype(np.int32)


def bucket_grid(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(L, L) bucket of every (query i, key j) pair, from `j - i`."""
    pos = np.arange(length)
    return relative_position_bucket(pos[None, :] - pos[:, None], num_buckets, max_distance)


# ---- layers -----------------------------------------------------------------------------------------------

def _dense(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x @ weightᵀ with the torch (out, in) layout; fp32 accumulation, one rounding to x's dtype."""
    return jnp.einsum("...i,oi->...o", x, weight, preferred_element_type=jnp.float32,
                      precision=matmul_precision(x.dtype)).astype(x.dtype)


class Linear(nnx.Module):
    """Bias-free Linear, torch layout: `weight` (out, in)."""

    def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_out, d_in), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return _dense(x, self.weight[...])


class Embedding(nnx.Module):
    """Lookup table `weight` (N, D)."""

    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (num, dim), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias; statistics in fp32 (transformers' `T5LayerNorm`)."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return w * y.astype(w.dtype)


def position_bias(table: jax.Array, buckets: np.ndarray) -> jax.Array:
    """(buckets, N) table and (L, L) bucket grid -> (N, L, L) additive attention bias in fp32."""
    return jnp.take(table, buckets, axis=0).transpose(2, 0, 1).astype(jnp.float32)


class UMT5Attention(nnx.Module):
    """Multi-head self-attention with an additive relative-position bias and no logit scaling."""

    def __init__(self, config: UMT5Config, has_relative_attention_bias: bool, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, dtype=dtype, rngs=rngs)
        self.k = Linear(config.d_model, inner, dtype=dtype, rngs=rngs)
        self.v = Linear(config.d_model, inner, dtype=dtype, rngs=rngs)
        self.o = Linear(inner, config.d_model, dtype=dtype, rngs=rngs)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads,
                                                     dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x (B, L, D), bias (N, L, L) fp32, key_mask (B, L) bool (True = real key) -> (B, L, D)."""
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.num_heads, self.d_kv) for p in (self.q, self.k, self.v))
        prec = matmul_precision(x.dtype)
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32, precision=prec) + bias[None]
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknh->bqnh", probs, v, preferred_element_type=jnp.float32, precision=prec)
        out = out.astype(x.dtype)
        return self.o(out.reshape(B, L, self.num_heads * self.d_kv))


class UMT5LayerSelfAttention(nnx.Module):
    def __init__(self, config: UMT5Config, has_relative_attention_bias: bool, *, dtype, rngs: nnx.Rngs):
        self.SelfAttention = UMT5Attention(config, has_relative_attention_bias, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, h: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        return h + self.SelfAttention(self.layer_norm(h), bias, key_mask)


class DenseGatedActDense(nnx.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x) — transformers' `gated-gelu` uses `gelu_new`, the tanh approximation."""

    def __init__(self, config: UMT5Config, *, dtype, rngs: nnx.Rngs):
        self.wi_0 = Linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs)
        self.wi_1 = Linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs)
        self.wo = Linear(config.d_ff, config.d_model, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class DenseActDense(nnx.Module):
    """wo(relu(wi x)) — plain T5 v1.0."""

    def __init__(self, config: UMT5Config, *, dtype, rngs: nnx.Rngs):
        self.wi = Linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs)
        self.wo = Linear(config.d_ff, config.d_model, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.relu(self.wi(x)))


class UMT5LayerFF(nnx.Module):
    def __init__(self, config: UMT5Config, *, dtype, rngs: nnx.Rngs):
        ffn = DenseGatedActDense if config.gated else DenseActDense
        self.DenseReluDense = ffn(config, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        return h + self.DenseReluDense(self.layer_norm(h))


class UMT5Block(nnx.Module):
    def __init__(self, config: UMT5Config, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([
            UMT5LayerSelfAttention(config, config.bias_per_layer, dtype=dtype, rngs=rngs),
            UMT5LayerFF(config, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, h: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](h, bias, key_mask))


class UMT5Stack(nnx.Module):
    """transformers' `encoder`: the stacked blocks and the final norm (plus T5's shared bias table)."""

    def __init__(self, config: UMT5Config, *, dtype, rngs: nnx.Rngs):
        self.config = config

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs: nnx.Rngs) -> UMT5Block:
            return UMT5Block(config, dtype=dtype, rngs=rngs)

        self.block = stacked_blocks(rngs)  # every Param has a leading (num_layers,) axis
        if not config.bias_per_layer:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads,
                                                     dtype=dtype, rngs=rngs)
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, h: jax.Array, key_mask: jax.Array) -> jax.Array:
        c = self.config
        buckets = bucket_grid(h.shape[1], c.relative_attention_num_buckets, c.relative_attention_max_distance)
        shared_bias = None if c.bias_per_layer else position_bias(self.relative_attention_bias.weight[...], buckets)

        def one_layer(h, blk: UMT5Block):
            if c.bias_per_layer:
                bias = position_bias(blk.layer[0].SelfAttention.relative_attention_bias.weight[...], buckets)
            else:
                bias = shared_bias
            return blk(h, bias, key_mask), None

        h, _ = jax.lax.scan(one_layer, h, self.block)
        return self.final_layer_norm(h)


class UMT5Encoder(nnx.Module):
    """`UMT5EncoderModel` / `T5EncoderModel`: ids (B, L) + attention mask (B, L) -> last_hidden_state (B, L, D)."""

    def __init__(self, config: UMT5Config, *, dtype="float32", rngs: nnx.Rngs):
        dtype = _jnp_dtype(dtype)
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.encoder = UMT5Stack(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids (B, L) int, attention_mask (B, L) (nonzero = real token) -> (B, L, D) in the model dtype."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be a (B, L) integer array, got {input_ids.shape} {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        if not isinstance(input_ids, jax.core.Tracer):  # concrete ids: catch what a gather would silently clip
            lo, hi = int(np.min(input_ids)), int(np.max(input_ids))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")
        h = self.shared(input_ids)
        return self.encoder(h, attention_mask.astype(bool))


# ---- loading ----------------------------------------------------------------------------------------------

EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied: transformers keeps `shared`


def checkpoint_keys(path: tuple, config: UMT5Config) -> list[str]:
    """transformers key(s) of one of our parameters (one per layer for stacked block parameters)."""
    names = [str(p) for p in path]
    if names[:2] == ["encoder", "block"]:
        rest = ".".join(names[2:])
        return [f"encoder.block.{i}.{rest}" for i in range(config.num_layers)]
    if names == ["encoder", "relative_attention_bias", "weight"]:  # T5: layer 0's table, shared
        return ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return [".".join(names)]


def load_text_encoder(path: str | os.PathLike, dtype: str = "float32") -> UMT5Encoder:
    """Strictly load a transformers `text_encoder/` directory (config.json + safetensors, sharded or not)."""
    path = Path(path)
    jdtype = _jnp_dtype(dtype)
    np_dtype = np.float32 if jdtype == jnp.float32 else ml_dtypes.bfloat16
    try:
        config = UMT5Config.from_dict(read_config(path), where=str(path / "config.json"))
    except ConfigError as e:  # a bad config.json is a bad checkpoint directory, like every other loader error
        raise WeightsError(str(e)) from None
    tensors = SafetensorsDir(path)
    model = nnx.eval_shape(lambda: UMT5Encoder(config, dtype=jdtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)

    available = set(tensors)
    embedding_keys = [k for k in EMBEDDING_KEYS if k in available]
    if not embedding_keys:
        raise WeightsError(f"{path}: tensor 'shared.weight' (or its tied alias 'encoder.embed_tokens.weight') "
                           "is missing")
    keys = {p: (embedding_keys[:1] if p == ("shared", "weight") else checkpoint_keys(p, config)) for p, _ in flat}
    check_keys(available, {k for ks in keys.values() for k in ks} | set(embedding_keys), str(path))

    for p, var in flat:
        shape = var.get_value().shape
        if p == ("shared", "weight"):
            for k in embedding_keys:  # check every alias present; the values come from the first (`shared`)
                if tensors.shape(k) != shape:
                    raise WeightsError(f"{path}: tensor {k!r} has shape {tensors.shape(k)}, model expects {shape}")
        if len(keys[p]) > 1:  # stacked layers: fill one preallocated (num_layers, ...) buffer
            value = np.empty(shape, np_dtype)
            for i, k in enumerate(keys[p]):
                value[i] = fetch(tensors, k, shape[1:], str(path))
        else:
            value = fetch(tensors, keys[p][0], shape, str(path)).astype(np_dtype, copy=False)
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
