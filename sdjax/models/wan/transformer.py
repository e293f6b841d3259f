"""The Wan2.1 diffusion transformer, the same function as diffusers' `WanTransformer3DModel`.

Reads in forward order: config → numerics policy → helpers (norms, RoPE, timestep sinusoid) → text padding
(folded out of the cross-attention) → embeddings → attention → block → model. Shapes: B batch, C latent
channels, F/H/W latent frames/height/width, L video tokens, S text tokens, D model dim, N heads, K head dim.

Numerics (bf16 mode): weights and matmuls in bf16; every LayerNorm + modulation, residual add, the q/k RMSNorm
statistics, RoPE, the time path and the output head compute in fp32 (`FP32_PARAMS` lists the weights kept in
fp32). The residual stream is stored in `residual_dtype`: by default in the compute dtype, bf16 as diffusers keeps
it — each residual add rounds once, the error stays within diffusers' own, and every element-wise pass over the
stream moves half the bytes (measured: benchmarks/NOTES.md) — or in fp32 as the original Wan code (more accurate).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.kernels.attention import K_NORMS_BACKENDS, LOSSY_BACKENDS, attention
from sdjax.kernels.norm import rms_norm_rope
from sdjax.kernels.residual_norm import modulated_norm, residual_norm
from sdjax.numerics import matmul_precision

# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class WanTransformerConfig:
    """Architecture numbers, named as in diffusers' `transformer/config.json`."""

    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    num_layers: int
    text_dim: int = 4096
    in_channels: int = 16
    out_channels: int = 16
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0

    # text-to-video only: image conditioning fields must be absent
    _T2V_ONLY = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"transformer config qk_norm={self.qk_norm!r}: only 'rms_norm_across_heads' is supported")
        if not self.cross_attn_norm:
            raise ValueError("transformer config cross_attn_norm=False is not supported (Wan2.1 uses True)")
        if len(self.patch_size) != 3:
            raise ValueError(f"transformer config patch_size={self.patch_size}: needs 3 entries (t, h, w)")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> WanTransformerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in cls._T2V_ONLY:
            if d.get(key) is not None:
                raise ValueError(f"transformer config {key}={d[key]!r}: only text-to-video (null) is supported")
        unknown = sorted(k for k in d if k not in names and k not in cls._T2V_ONLY and not k.startswith("_"))
        if unknown:
            raise ValueError(f"transformer config: unknown field(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_matches(self, other: dict, where: str) -> None:
        """A checkpoint's config.json must agree with the model yaml, field by field."""
        theirs = WanTransformerConfig.from_dict(other)
        for f in dataclasses.fields(self):
            if getattr(self, f.name) != getattr(theirs, f.name):
                raise ValueError(f"{where}: config field {f.name}={getattr(theirs, f.name)!r} "
                                 f"disagrees with the model config ({getattr(self, f.name)!r})")


# ------------------------------------------------------------------------------------------ numerics

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def residual_dtype_of(dtype: str, residual_dtype: str | None) -> str:
    """The residual stream's dtype: the compute dtype (None) or fp32 — never narrower than the weights."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed: one of {', '.join(DTYPES)}")
    if residual_dtype not in (None, "float32", dtype):
        raise ValueError(f"residual_dtype={residual_dtype!r} is not allowed with dtype={dtype!r}: None (the "
                         f"dtype) or float32")
    return residual_dtype or dtype


# Weights kept in fp32 in bf16 mode (dotted path fragments of our state).
FP32_PARAMS = ("condition_embedder.time_embedder", "condition_embedder.time_proj", "scale_shift_table",
               "norm2", "norm_q", "norm_k", "proj_out")


def _linear(d_in, d_out, dtype, rngs, *, fp32=False, use_bias=True):
    dt = jnp.float32 if fp32 else dtype
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dt, param_dtype=dt, precision=matmul_precision(dt),
                      rngs=rngs)


def _residual_add(x, y, gate=None):
    """x + y (· gate), computed in fp32 and stored in x's dtype (the residual stream's)."""
    y = y.astype(jnp.float32)
    return (x.astype(jnp.float32) + (y if gate is None else y * gate)).astype(x.dtype)


def _matmul(x, linear: nnx.Linear):
    """x @ W of an nnx.Linear, without its bias, at the layer's dtype and precision."""
    w = linear.kernel[...]
    return jnp.einsum("...i,io->...o", x.astype(w.dtype), w, precision=linear.precision)


# ------------------------------------------------------------------------------------------ helpers


class LayerNorm(nnx.Module):
    """An affine LayerNorm's parameters (the cross-attention norm `norm2`): `residual_norm` applies them in the
    pass that adds the self-attention's output to the stream."""

    def __init__(self, dim):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))


class RMSNorm(nnx.Module):
    """RMSNorm over the whole model dim (all heads together), statistics in fp32."""

    def __init__(self, dim, eps, backend: str = "auto"):
        self.eps = eps
        self.backend = backend
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, y, bias=None, rope=None, heads: int = 1, return_max_head_norms: bool = False):
        """RMSNorm of y + bias (a projection's output and its bias, added in fp32); with `rope` = (cos, sin) also
        RoPE on its `heads` heads. The per-token RMS scale commutes with the rotation, so x⊙w is rotated, then
        scaled, and rounded to y's dtype once, in one pass (`sdjax.kernels.norm`; measured: benchmarks/NOTES.md).
        `return_max_head_norms`: also each head's largest norm over the tokens, (B, heads), from the same pass."""
        return rms_norm_rope(y, bias, self.weight[...], rope, heads=heads, eps=self.eps, backend=self.backend,
                             return_max_head_norms=return_max_head_norms)


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (L, K/2) for the 3-D RoPE: K split t:h:w as K-4(K//6) : 2(K//6) : 2(K//6).

    Computed on the host in float64 then rounded to fp32, as the reference does; the grid is static.
    """
    axis_dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    parts = []
    for axis, (n, d) in enumerate(zip(grid, axis_dims, strict=True)):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
        ang = np.outer(np.arange(n, dtype=np.float64), freqs)  # (n, d/2)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts.append(np.broadcast_to(ang.reshape(shape), (*grid, d // 2)))
    angles = np.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)  # (L, K/2), f-major token order
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_pair_permutation(num_heads: int, head_dim: int) -> np.ndarray:
    """Column order turning each head's interleaved RoPE pairs (2i, 2i+1) into halves (i, K/2 + i).

    Loading applies it to the self-attention q/k projections (and their RMSNorm weights): one permutation of
    both q and k within a head leaves every q·k unchanged, and rotating halves is two contiguous slices that
    fuse with the RMSNorm, where interleaved pairs need a strided reshape that XLA fuses badly."""
    per_head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(num_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def timestep_sinusoid(t, dim):
    """[cos(t f), sin(t f)] with f_i = 10000^(-i/(dim/2)), in fp32 like diffusers."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ------------------------------------------------------------------------------------------ text padding


class FoldedText(NamedTuple):
    """A text context with most of its zero padding folded away (`fold_text_padding`).

    Wan pads every prompt's context to max_sequence_length rows with zeros; the text embedder maps a zero row to one
    vector, so a row's padded keys and values are one key repeated. Attention to M equal keys equals attention to
    m of them with log(M / m) added to their logits — exact. `context` (B, S', text_dim) keeps each row's real
    tokens and at least one zero row; `key_bias` (B, S') is 0 on real tokens and log(M / m) on the kept zero rows.
    """

    context: jax.Array
    key_bias: jax.Array


def text_lengths(context) -> jax.Array:
    """(B, S, T) -> (B,) int32: each row's tokens up to its last nonzero one (the rest is zero padding)."""
    nonzero = jnp.any(context != 0, axis=-1)  # (B, S)
    return jnp.max(jnp.where(nonzero, jnp.arange(1, context.shape[1] + 1), 0), axis=1).astype(jnp.int32)


def fold_text_padding(context, lengths, keep: int) -> FoldedText:
    """context (B, S, T) whose rows past `lengths` (B,) are zero -> its first `keep` rows and the key bias that
    makes attention to them equal attention to all S rows (`FoldedText`). Needs lengths < keep ≤ S."""
    S = context.shape[1]
    lengths = jnp.asarray(lengths, jnp.int32)
    pads_kept = (keep - lengths).astype(jnp.float32)[:, None]  # ≥ 1
    bias = jnp.log((S - lengths).astype(jnp.float32)[:, None] / pads_kept)
    is_pad = jnp.arange(keep)[None, :] >= lengths[:, None]
    return FoldedText(context[:, :keep], jnp.where(is_pad, bias, 0.0))


# ------------------------------------------------------------------------------------------ embeddings


class PatchEmbedding(nnx.Module):
    """Conv3d with kernel = stride = patch size, written as a matmul over non-overlapping patches."""

    def __init__(self, cfg: WanTransformerConfig, dtype, rngs):
        pt, ph, pw = cfg.patch_size
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (pt, ph, pw, cfg.in_channels, cfg.dim), dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.dim,), dtype))
        self.patch_size = cfg.patch_size
        self.dtype = dtype

    def __call__(self, latents):  # (B, C, F, H, W) -> (B, L, D)
        B, C, F, H, W = latents.shape
        pt, ph, pw = self.patch_size
        x = latents.astype(self.dtype).reshape(B, C, F // pt, pt, H // ph, ph, W // pw, pw)
        x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)  # (B, F', H', W', pt, ph, pw, C)
        y = jnp.einsum("bfuvthwc,thwcd->bfuvd", x, self.kernel[...], precision=matmul_precision(self.dtype))
        return (y + self.bias[...]).reshape(B, -1, y.shape[-1])


class TimestepEmbedding(nnx.Module):
    def __init__(self, d_in, dim, rngs):
        self.linear_1 = _linear(d_in, dim, jnp.float32, rngs, fp32=True)
        self.linear_2 = _linear(dim, dim, jnp.float32, rngs, fp32=True)

    def __call__(self, s):
        return self.linear_2(jax.nn.silu(self.linear_1(s)))


class TextEmbedding(nnx.Module):
    def __init__(self, d_in, dim, dtype, rngs):
        self.linear_1 = _linear(d_in, dim, dtype, rngs)
        self.linear_2 = _linear(dim, dim, dtype, rngs)

    def __call__(self, c):
        return self.linear_2(jax.nn.gelu(self.linear_1(c), approximate=True))


class ConditionEmbedder(nnx.Module):
    """Timestep → (temb (B, D), six modulation vectors e0 (B, 6, D)); text (B, S, T) → (B, S, D)."""

    def __init__(self, cfg: WanTransformerConfig, dtype, rngs):
        self.freq_dim = cfg.freq_dim
        self.dtype = dtype
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, cfg.dim, rngs)
        self.time_proj = _linear(cfg.dim, 6 * cfg.dim, jnp.float32, rngs, fp32=True)
        self.text_embedder = TextEmbedding(cfg.text_dim, cfg.dim, dtype, rngs)

    def time(self, timestep):
        temb = self.time_embedder(timestep_sinusoid(timestep, self.freq_dim))
        e0 = self.time_proj(jax.nn.silu(temb))
        return temb, e0.reshape(e0.shape[0], 6, -1)

    def text(self, context):
        return self.text_embedder(context.astype(self.dtype))


# ------------------------------------------------------------------------------------------ attention


class Attention(nnx.Module):
    """Multi-head attention with q/k RMSNorm across heads; RoPE on q/k when given (self-attention)."""

    def __init__(self, cfg: WanTransformerConfig, dtype, attention_backend: str, rngs, fused_backend: str = "auto"):
        d = cfg.dim
        self.heads = cfg.num_attention_heads
        self.backend = attention_backend
        self.to_q = _linear(d, d, dtype, rngs)
        self.to_k = _linear(d, d, dtype, rngs)
        self.to_v = _linear(d, d, dtype, rngs, use_bias=False)  # its bias is folded into to_out's (below)
        self.to_out = _linear(d, d, dtype, rngs)
        self.norm_q = RMSNorm(d, cfg.eps, fused_backend)
        self.norm_k = RMSNorm(d, cfg.eps, fused_backend)

    def __call__(self, x, context=None, rope=None, attend=None, key_bias=None):
        """-> (the output projection without its bias, the bias): the residual pass adds the bias (`residual_norm`).

        `attend(q, k, v)` replaces the attention kernel call (sequence parallelism injects its own); `key_bias`
        (B, S) is added to the logits of the context's keys (folded text padding, `FoldedText`)."""
        src = x if context is None else context
        # The biases join inside the norms' pass; RoPE (self-attention) too.
        q = self.norm_q(_matmul(x, self.to_q), self.to_q.bias[...], rope, self.heads)
        # The keys' largest norms per head come out of k's norm pass when the kernel needs them (held maxima in the
        # long self-attention on one device) instead of a pass of their own over k (~1 ms a Wan-1.3B 480p forward).
        k_norms = context is None and attend is None and self.backend in K_NORMS_BACKENDS
        k = self.norm_k(_matmul(src, self.to_k), self.to_k.bias[...], rope, self.heads,
                        return_max_head_norms=k_norms)
        k, k_norms = k if k_norms else (k, None)
        # v has no bias: loading folds the checkpoint's b_v into to_out's bias (`loading.fold_v_bias`). Exact:
        # softmax rows sum to 1, so attn(q, k, v + b_v) = attn(q, k, v) + b_v, and to_out turns + b_v into + b_v W_o,
        # one vector. Saves a pass over v and a GEMV each forward (measured: benchmarks/NOTES.md).
        v = _matmul(src, self.to_v)
        heads = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # (B, T, D) -> (B, T, N, K)
        q, k, v = heads(q), heads(k), heads(v)
        if attend is None:
            out = attention(q, k, v, key_bias=key_bias, k_norms=k_norms, backend=self.backend)
        else:
            out = attend(q, k, v)
        return _matmul(out.reshape(*out.shape[:2], -1), self.to_out), self.to_out.bias[...]


class FeedForward(nnx.Module):
    """fc2(gelu_tanh(fc1(x))). Compiled with `GEMM_COMPILER_OPTIONS`, fc1's bias + GELU run in cuBLASLt's epilogue
    on GPUs; XLA's GEMM rewriter matches only this form (bias add and GELU in the GEMM's dtype)."""

    def __init__(self, dim, ffn_dim, dtype, rngs):
        self.fc1 = _linear(dim, ffn_dim, dtype, rngs)
        self.fc2 = _linear(ffn_dim, dim, dtype, rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))

    def into_stream(self, x, u, gate):
        """x + gate · ffn(u) for one gate (D,) shared by the whole batch (one timestep): the gate folded into fc2's
        columns and bias, so `(h @ W2' + b') + x` is one GEMM whose epilogue adds the bias and the stream (cuBLASLt's
        C input under `GEMM_COMPILER_OPTIONS`) — no element-wise pass of its own over the stream."""
        h = jax.nn.gelu(self.fc1(u), approximate=True)
        w = (self.fc2.kernel[...].astype(jnp.float32) * gate).astype(h.dtype)
        b = (self.fc2.bias[...].astype(jnp.float32) * gate).astype(x.dtype)
        return (jnp.einsum("...i,io->...o", h, w, precision=self.fc2.precision) + b) + x


# ------------------------------------------------------------------------------------------ block


class WanBlock(nnx.Module):
    """Self-attention (modulated, gated) → cross-attention to text → FFN (modulated, gated)."""

    def __init__(self, cfg: WanTransformerConfig, dtype, attention_backend: str, rngs, fused_backend: str = "auto"):
        self.eps = cfg.eps
        self.dtype = dtype
        self.residual_backend = "xla" if fused_backend == "xla" else "auto"
        self.attn1 = Attention(cfg, dtype, attention_backend, rngs, fused_backend)
        self.norm2 = LayerNorm(cfg.dim)
        # A lossy kernel is a speed choice for the long self-attention; the cross-attention to 512 text keys
        # gains nothing from it (measured slower, benchmarks/NOTES.md) and stays exact.
        cross_backend = "auto" if attention_backend in LOSSY_BACKENDS else attention_backend
        self.attn2 = Attention(cfg, dtype, cross_backend, rngs, fused_backend)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, dtype, rngs)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (1, 6, cfg.dim), jnp.float32) / math.sqrt(cfg.dim))

    def __call__(self, x, e0, text, rope, attend=None, one_timestep=False):
        """x (B, L, D) the residual stream (fp32 or bf16); e0 (B, 6, D) fp32; text = (states (B, S, D), key bias
        (B, S) or None); rope = (cos, sin).

        `attend` is the self-attention kernel when the tokens are split over devices (cross-attention to the
        whole text needs no communication and keeps the plain kernel). `one_timestep`: every sample of the batch
        is at the same timestep (equal rows of e0), so the FFN's gate is one vector (`FeedForward.into_stream`)."""
        return self.text_and_ffn(*self.self_attention(x, e0, rope, attend), e0, text, one_timestep)

    def self_attention(self, x, e0, rope, attend=None):
        """The first half: x + gate1 · attn1(modulated LayerNorm(x)), and norm2 of that (the cross-attention's
        input), from one pass over the stream. It does not see the text."""
        shift1, scale1, gate1 = self._modulation(e0, 0)
        u = modulated_norm(x, 1 + scale1[:, 0], shift1[:, 0], eps=self.eps, out_dtype=self.dtype,
                           backend=self.residual_backend)
        y, y_bias = self.attn1(u, rope=rope, attend=attend)
        return residual_norm(x, y, y_bias, gate1[:, 0], self.norm2.weight[...], self.norm2.bias[...], eps=self.eps,
                             backend=self.residual_backend)

    def text_and_ffn(self, x, u, e0, text, one_timestep=False):
        """The second half: cross-attention to the text (u = norm2(x)), then the modulated, gated FFN."""
        shift2, scale2, gate2 = self._modulation(e0, 3)
        states, key_bias = text
        y, y_bias = self.attn2(u, context=states, key_bias=key_bias)
        x, u = residual_norm(x, y, y_bias, None, 1 + scale2[:, 0], shift2[:, 0], eps=self.eps,
                             backend=self.residual_backend)
        if one_timestep and x.dtype == self.dtype:
            return self.ffn.into_stream(x, u, gate2[0, 0])
        return _residual_add(x, self.ffn(u), gate2)

    def cfg_first(self, x, e0, text, rope, attend=None):
        """This block on a CFG batch [conditional; unconditional] of one latent at one timestep: both halves of x
        and e0 are equal until the text enters, so the self-attention half runs once, on the first, for both."""
        B = x.shape[0] // 2
        h, u = self.self_attention(x[:B], e0[:B], rope, attend)
        return self.text_and_ffn(jnp.concatenate([h, h]), jnp.concatenate([u, u]), e0, text, one_timestep=True)

    def _modulation(self, e0, first: int):
        """(shift, scale, gate) of a half: rows first..first+2 of table + e0, each (B, 1, D)."""
        mod = self.scale_shift_table[...] + e0
        return tuple(mod[:, i : i + 1] for i in range(first, first + 3))


def run_stacked_blocks(block_of, x, e0, text, rope, stacked_state, layers=None, cfg_batch=False, attend=None):
    """x through the stacked blocks (`block_of(layer_state)` -> a `WanBlock`), in one scan.

    `cfg_batch`: x is a CFG batch [conditional; unconditional] of one latent at one timestep; block 0 then runs its
    self-attention half once for both (`WanBlock.cfg_first`), the rest as usual. Exact; saves one self-attention
    of one layer a step (a thirtieth of the attention of Wan-1.3B's CFG step). A CFG batch or a batch of one is at
    one timestep: the FFN's gate then goes into fc2 (`FeedForward.into_stream`)."""
    start, stop = (0, None) if layers is None else layers
    if cfg_batch and start == 0:
        layer0 = jax.tree.map(lambda w: w[0], stacked_state)
        x = block_of(layer0).cfg_first(x, e0, text, rope, attend)
        start = 1
        if stop == 1 or jax.tree.leaves(stacked_state)[0].shape[0] == 1:
            return x
    layers = None if (start, stop) == (0, None) else (start, stop)
    one_timestep = cfg_batch or x.shape[0] == 1
    return scan_layers(lambda h, layer: block_of(layer)(h, e0, text, rope, attend, one_timestep), x, stacked_state,
                       layers)


def scan_layers(apply, x, stacked_state, layers=None):
    """h = apply(h, layer_state) over the stacked layers, in one `lax.scan`.

    `layers=(start, stop)` (stop None = the last) scans only that range, reading each layer by index inside the
    loop: slicing the stacked weights instead would copy them (27 GB for the 14B model).
    """
    if layers is None:
        return jax.lax.scan(lambda h, layer: (apply(h, layer), None), x, stacked_state)[0]
    n = jax.tree.leaves(stacked_state)[0].shape[0]
    start, stop = layers[0], n if layers[1] is None else layers[1]

    def body(h, i):
        layer = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), stacked_state)
        return apply(h, layer), None

    return jax.lax.scan(body, x, jnp.arange(start, stop))[0]


# ------------------------------------------------------------------------------------------ model


class WanTransformer3DModel(nnx.Module):
    """`model(latents (B, C, F, H, W), timestep (B,), context (B, S, text_dim)) -> (B, C, F, H, W)`; context may
    also be a `FoldedText` (the same function, less cross-attention work)."""

    def __init__(self, cfg: WanTransformerConfig, *, dtype: str = "float32", residual_dtype: str | None = None,
                 attention_backend: str = "auto", fused_backend: str = "auto", rngs: nnx.Rngs):
        self.config = cfg
        self.residual_dtype = DTYPES[residual_dtype_of(dtype, residual_dtype)]
        self.dtype = dt = DTYPES[dtype]
        self.patch_embedding = PatchEmbedding(cfg, dt, rngs)
        self.condition_embedder = ConditionEmbedder(cfg, dt, rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(r):
            return WanBlock(cfg, dt, attention_backend, r, fused_backend)

        self.blocks = stacked_blocks(rngs)  # every param has a leading (num_layers,) axis
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (1, 2, cfg.dim), jnp.float32) / math.sqrt(cfg.dim))
        out = math.prod(cfg.patch_size) * cfg.out_channels
        self.proj_out = _linear(cfg.dim, out, jnp.float32, rngs, fp32=True)
        # How the blocks run on a device mesh; set by `sdjax.sharding.shard_transformer` (None: one device).
        self.parallel = None

    # The pieces, so samplers and caches can compose them (embed → blocks → head).

    def embed(self, latents, timestep, context):
        """Returns x (B, L, D) in the residual dtype, temb (B, D), e0 (B, 6, D), text = (states (B, S, D), key
        bias (B, S) or None), rope (cos, sin)."""
        context, key_bias = (context.context, context.key_bias) if isinstance(context, FoldedText) else (context, None)
        self._check_inputs(latents, timestep, context, key_bias)
        cfg = self.config
        x = self.patch_embedding(latents).astype(self.residual_dtype)
        temb, e0 = self.condition_embedder.time(timestep)
        text = (self.condition_embedder.text(context), key_bias)
        cos, sin = rope_angles(self.token_grid(latents.shape), cfg.attention_head_dim, cfg.rope_theta)
        return x, temb, e0, text, (jnp.asarray(cos), jnp.asarray(sin))

    def run_blocks(self, x, e0, text, rope, blocks=None, layers=None, cfg_batch=False):
        """Run the stacked blocks with one scan (compile time does not grow with depth).

        `layers=(start, stop)` runs only that range (feature caches split the first block off). `cfg_batch`: the
        batch is [conditional; unconditional] of one latent at one timestep (`run_stacked_blocks`). On a mesh,
        `self.parallel` runs the same scan inside `jax.shard_map` with the tokens split over devices.
        """
        blocks = self.blocks if blocks is None else blocks
        if self.parallel is not None:
            return self.parallel.run_blocks(blocks, x, e0, text, rope, layers=layers, cfg_batch=cfg_batch)
        graphdef, state = nnx.split(blocks)
        return run_stacked_blocks(lambda layer: nnx.merge(graphdef, layer), x, e0, text, rope, state, layers,
                                  cfg_batch)

    def head(self, x, temb, latent_shape):
        """Modulated LayerNorm + projection, then unpatchify to (B, C, F, H, W) fp32."""
        mod = self.scale_shift_table[...] + temb[:, None, :]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        # fp32 and XLA's: once a forward, so no kernel (the blocks' modulated_norm runs on ours)
        y = self.proj_out(modulated_norm(x, 1 + scale[:, 0], shift[:, 0], eps=self.config.eps, out_dtype=jnp.float32,
                                         backend="xla"))
        B, _, F, H, W = latent_shape
        pt, ph, pw = self.config.patch_size
        y = y.reshape(B, F // pt, H // ph, W // pw, pt, ph, pw, -1)  # channel fastest in each patch
        y = y.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(B, -1, F, H, W)

    def __call__(self, latents, timestep, context, cfg_batch: bool = False):
        """`cfg_batch=True` promises that the batch is [conditional; unconditional] (two equal halves of latents
        and timestep, the texts apart), as batched CFG builds it: block 0's self-attention then runs once."""
        x, temb, e0, text, rope = self.embed(latents, timestep, context)  # 1. patches, time, text, RoPE
        x = self.run_blocks(x, e0, text, rope, cfg_batch=cfg_batch)  # 2. the blocks
        return self.head(x, temb, latents.shape)  # 3. head + unpatchify

    # ------------------------------------------------------------------ checks

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        _, _, F, H, W = latent_shape
        return F // pt, H // ph, W // pw

    def _check_inputs(self, latents, timestep, context, key_bias=None):
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents: expected (B, {cfg.in_channels}, F, H, W), got {tuple(latents.shape)}")
        _, _, F, H, W = latents.shape
        for name, n, p in zip(("F", "H", "W"), (F, H, W), cfg.patch_size, strict=True):
            if n % p:
                raise ValueError(f"latents: {name}={n} is not a multiple of the patch size {p}")
        if max(self.token_grid(latents.shape)) > cfg.rope_max_seq_len:
            raise ValueError(f"latents: token grid {self.token_grid(latents.shape)} exceeds "
                             f"rope_max_seq_len={cfg.rope_max_seq_len}")
        B = latents.shape[0]
        if timestep.shape != (B,):
            raise ValueError(f"timestep: expected shape ({B},), got {tuple(timestep.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context: expected ({B}, S, {cfg.text_dim}), got {tuple(context.shape)}")
        if key_bias is not None and key_bias.shape != context.shape[:2]:
            raise ValueError(f"context: key_bias must be {tuple(context.shape[:2])}, got {tuple(key_bias.shape)}")
        for name, arr in (("latents", latents), ("context", context)):
            if not jnp.issubdtype(arr.dtype, jnp.floating):
                raise ValueError(f"{name}: expected a floating dtype, got {arr.dtype}")
