"""Wan2.1 video VAE (diffusers `AutoencoderKLWan`) in Flax NNX, numerically matching diffusers.

Public layout is diffusers': videos (B, 3, F, H, W) in [-1, 1], latents (B, Z, F', H', W') with
F = 1 + 4·(F' - 1) and H = 8·H'. Inside, activations are channels-last (B, F, H, W, C) for XLA convs.

Everything in the network is causal in time: 3-D convs pad 2 zero frames on the past side only, norms,
attention and 2-D resampling act per frame, and the temporal resamplers treat the first frame specially
(research/wan.md §4.4). So the video is processed as a stream: the first chunk, then a `lax.scan` over
equal chunks that carries, for every temporal conv, the last input frames it needs (`History`, diffusers'
`feat_cache`). Peak memory is set by the chunk size, not by the number of frames.

Attribute names are diffusers', so the checkpoint map is the identity up to weight layout
(`load_vae`): torch Conv3d (O, I, kT, kH, kW) -> (kT, kH, kW, I, O), Conv2d (O, I, kH, kW) -> (kH, kW, I, O),
RMS-norm gains (C, 1, 1[, 1]) -> (C,).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.kernels.attention import attention
from sdjax.models.weights import SafetensorsDir, WeightsError, check_keys, fetch, read_config
from sdjax.numerics import matmul_precision

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# diffusers' encoder takes the video as 1 frame, then chunks of 4 (`AutoencoderKLWan._encode`).
ENCODE_CHUNK_FRAMES = 4
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Compile whatever runs the VAE with these. XLA's GPU layout assignment keeps channels last only for 2-D
# convolutions; the 3-D ones get NCDHW, so cuDNN's tensor-core kernels (channels last) transpose every
# operand in and out: a quarter of a 480p decode (938 -> 699 ms of kernels on an H200, benchmarks/NOTES.md).
# GPU-only option; other backends ignore it.
COMPILER_OPTIONS = {"xla_gpu_force_conv_nhwc": True}


# ----------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class WanVAEConfig:
    """The architecture fields of diffusers' `vae/config.json` (defaults = diffusers' defaults)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic, diffusers' spelling
    dropout: float = 0.0  # training only; inference ignores it
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanVAEConfig:
        """From a parsed `config.json`; keys starting with `_` are metadata, other unknown keys are errors."""
        name = d.get("_class_name", "AutoencoderKLWan")
        if name != "AutoencoderKLWan":
            raise ValueError(f"WanVAEConfig: _class_name is {name!r}, expected 'AutoencoderKLWan'")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"WanVAEConfig: unknown field(s) {unknown}; known: {sorted(fields)}")
        kw = {k: v for k, v in d.items() if k in fields}
        for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if k in kw:
                if not isinstance(kw[k], (list, tuple)):
                    raise ValueError(f"WanVAEConfig: {k} must be a list, got {kw[k]!r}")
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def __post_init__(self):
        def bad(field, allowed):
            value = getattr(self, field)
            raise ValueError(f"WanVAEConfig: {field}={value!r} unsupported; allowed: {allowed}")

        def pos_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        for f in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if not pos_int(getattr(self, f)):
                bad(f, "a positive integer")
        if self.decoder_base_dim is not None and not pos_int(self.decoder_base_dim):
            bad("decoder_base_dim", "null or a positive integer")
        if not self.dim_mult or not all(pos_int(m) for m in self.dim_mult):
            bad("dim_mult", "a non-empty list of positive integers")
        if self.attn_scales:
            bad("attn_scales", "[] (Wan2.1 has no attention outside the mid blocks)")
        td = self.temperal_downsample
        if len(td) != len(self.dim_mult) - 1 or not all(isinstance(t, bool) for t in td):
            bad("temperal_downsample", f"a list of {len(self.dim_mult) - 1} booleans (len(dim_mult) - 1)")
        if sum(td) > 2:
            bad("temperal_downsample", "at most 2 true (diffusers encodes 4-frame chunks)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            bad("dropout", "a number in [0, 1)")
        if len(self.latents_mean) != self.z_dim:
            bad("latents_mean", f"{self.z_dim} numbers (z_dim)")
        if len(self.latents_std) != self.z_dim or any(s == 0 for s in self.latents_std):
            bad("latents_std", f"{self.z_dim} non-zero numbers (z_dim)")
        if self.is_residual is not False:
            bad("is_residual", "false (the Wan2.2 residual VAE is not implemented)")
        if self.patch_size is not None:
            bad("patch_size", "null (the Wan2.2 patchified VAE is not implemented)")
        if self.scale_factor_temporal not in (None, self.temporal_factor):
            bad("scale_factor_temporal", f"null or {self.temporal_factor} (2 ** sum(temperal_downsample))")
        if self.scale_factor_spatial not in (None, self.spatial_factor):
            bad("scale_factor_spatial", f"null or {self.spatial_factor} (2 ** (len(dim_mult) - 1))")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# ------------------------------------------------------------------------------------- causal history

class History:
    """The remembered past frames of every temporal conv, for one chunk of a streamed video.

    `past` is the list returned as `next` by the previous chunk (same call order), or None at the start of
    the video, where every conv sees zero frames before frame 0. It only lives while tracing: the arrays
    are what `lax.scan` carries.
    """

    def __init__(self, past: list[jax.Array] | None):
        self.past = past
        self.next: list[jax.Array] = []

    @property
    def starting(self) -> bool:
        return self.past is None

    def extend(self, x: jax.Array, n: int) -> jax.Array:
        """x (B,F,H,W,C) with this conv's n past frames in front; remembers the last n for the next chunk."""
        i = len(self.next)
        prev = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype) if self.past is None else self.past[i]
        xx = jnp.concatenate([prev, x], axis=1)
        self.next.append(xx[:, -n:])
        return xx

    def remember(self, frames: jax.Array) -> None:
        self.next.append(frames)


# ------------------------------------------------------------------------------------------ layers

class CausalConv3d(nnx.Module):
    """diffusers `WanCausalConv3d`: symmetric spatial zero padding, all 2·p_t temporal padding in the past.

    weight (kT, kH, kW, I, O). The past frames come from `history` (zeros at the start of the video).
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, dtype):
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.past_frames = 2 * pt
        self.spatial_padding = ((ph, ph), (pw, pw))
        self.weight = nnx.Param(jnp.zeros((kt, kh, kw, cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))

    def __call__(self, x: jax.Array, history: History | None = None) -> jax.Array:
        """x (B, F, H, W, I) -> (B, F', H', W', O)."""
        if self.past_frames:
            x = history.extend(x, self.past_frames)
        w = self.weight[...]
        if x.shape[1] < w.shape[0]:  # no full window (a first chunk of 1 frame): no output frames
            return jnp.zeros((x.shape[0], 0, *x.shape[2:4], w.shape[-1]), x.dtype)
        y = jax.lax.conv_general_dilated(
            x, w, self.stride, ((0, 0), *self.spatial_padding),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=matmul_precision(x.dtype))
        return y + self.bias[...]


class Conv2d(nnx.Module):
    """torch `nn.Conv2d` applied per frame; weight (kH, kW, I, O)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, *, dtype):
        self.stride = (stride, stride)
        self.padding = ((padding, padding), (padding, padding))
        self.weight = nnx.Param(jnp.zeros((kernel, kernel, cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N, H, W, I) -> (N, H', W', O)."""
        y = jax.lax.conv_general_dilated(
            x, self.weight[...], self.stride, self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=matmul_precision(x.dtype))
        return y + self.bias[...]


class RMSNorm(nnx.Module):
    """diffusers `WanRMS_norm`: F.normalize over channels (eps 1e-12) · √C · γ, normalised in fp32."""

    def __init__(self, dim: int, *, dtype):
        self.scale = dim**0.5
        self.gamma = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        normalized = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return normalized * self.scale * self.gamma[...]


class ResidualBlock(nnx.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1×1×1 conv shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype):
        self.norm1 = RMSNorm(in_dim, dtype=dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, dtype=dtype)
        self.norm2 = RMSNorm(out_dim, dtype=dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, dtype=dtype)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, dtype=dtype) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, history: History) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)), history)
        x = self.conv2(jax.nn.silu(self.norm2(x)), history)  # (dropout: inference)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H·W pixels of each frame (no mixing across frames)."""

    def __init__(self, dim: int, *, dtype):
        self.norm = RMSNorm(dim, dtype=dtype)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, dtype=dtype)
        self.proj = Conv2d(dim, dim, 1, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, F, H, W, C = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(B * F, H, W, C)).reshape(B * F, H * W, 1, 3 * C)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o = attention(q, k, v).reshape(B * F, H, W, C)
        return self.proj(o).reshape(B, F, H, W, C) + x


class MidBlock(nnx.Module):
    """res, attention, res."""

    def __init__(self, dim: int, *, dtype):
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype)])
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype) for _ in range(2)])

    def __call__(self, x: jax.Array, history: History) -> jax.Array:
        x = self.resnets[0](x, history)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x), history)
        return x


class Upsample2x(nnx.Module):
    """Nearest(-exact) ×2 in H and W: every pixel becomes a 2×2 block."""

    def __call__(self, x):  # (N, H, W, C)
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ZeroPadRightBottom(nnx.Module):
    """torch `nn.ZeroPad2d((0, 1, 0, 1))`."""

    def __call__(self, x):  # (N, H, W, C)
        return jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))


class Resample(nnx.Module):
    """diffusers `WanResample`: 2-D (×2 / ÷2) resampling per frame, plus a temporal ×2 / ÷2 for '*3d' modes.

    `resample` mirrors diffusers' `nn.Sequential(Upsample | ZeroPad2d, Conv2d)` (checkpoint key
    `resample.1.*`).
    """

    def __init__(self, dim: int, mode: str, *, dtype):
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nnx.List([Upsample2x(), Conv2d(dim, dim // 2, 3, padding=1, dtype=dtype)])
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nnx.List([ZeroPadRightBottom(), Conv2d(dim, dim, 3, stride=2, dtype=dtype)])
        else:
            raise ValueError(f"Resample: unknown mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), dtype=dtype)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), dtype=dtype)

    def __call__(self, x: jax.Array, history: History) -> jax.Array:
        if self.mode == "upsample3d":
            x = self._double_frames(x, history)
        B, F, H, W, C = x.shape
        y = x.reshape(B * F, H, W, C)
        for layer in self.resample:
            y = layer(y)
        x = y.reshape(B, F, *y.shape[1:])
        if self.mode == "downsample3d":
            x = self._halve_frames(x, history)
        return x

    def _double_frames(self, x, history):
        """Frame 0 of the video passes unchanged; every later frame becomes 2 frames (time_conv's halves)."""
        head = None
        if history.starting:  # diffusers' 'Rep' sentinel: frame 0 never enters time_conv
            head, x = x[:, :1], x[:, 1:]
        B, F, H, W, C = x.shape
        y = self.time_conv(x, history).reshape(B, F, H, W, 2, C)
        y = jnp.moveaxis(y, 4, 2).reshape(B, 2 * F, H, W, C)  # channel halves (A, B) -> frames A_t, B_t
        return y if head is None else jnp.concatenate([head, y], axis=1)

    def _halve_frames(self, x, history):
        """Frame 0 of the video passes unchanged; then a stride-2 conv over windows [0,1,2], [2,3,4], …"""
        if history.starting:
            history.remember(x[:, -1:])
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        return self.time_conv(history.extend(x, 1))


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then an optional resampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *, dtype):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(i, o, dtype=dtype) for i, o in itertools.pairwise(dims)])
        self.upsamplers = (None if upsample_mode is None
                           else nnx.List([Resample(out_dim, upsample_mode, dtype=dtype)]))

    def __call__(self, x: jax.Array, history: History) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, history)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, history)
        return x


# --------------------------------------------------------------------------------- encoder / decoder

class Encoder3d(nnx.Module):
    """diffusers `WanEncoder3d` (is_residual=False): video (B,F,H,W,3) -> (B,F',H',W',2Z) mean ‖ logvar."""

    def __init__(self, cfg: WanVAEConfig, *, dtype):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, dtype=dtype)
        blocks = []
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype))
                in_dim = out_dim
            if i != last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, dtype=dtype))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], dtype=dtype)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, dtype=dtype)

    def __call__(self, x: jax.Array, history: History) -> jax.Array:
        x = self.conv_in(x, history)
        for block in self.down_blocks:
            x = block(x, history)
        x = self.mid_block(x, history)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), history)


class Decoder3d(nnx.Module):
    """diffusers `WanDecoder3d` (is_residual=False): (B,F',H',W',Z) -> (B,F,H,W,out_channels), unclamped."""

    def __init__(self, cfg: WanVAEConfig, *, dtype):
        base = cfg.decoder_base_dim or cfg.base_dim
        mult = cfg.dim_mult
        dims = [base * m for m in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, dtype=dtype)
        self.mid_block = MidBlock(dims[0], dtype=dtype)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            if i > 0:
                in_dim //= 2  # the previous level's upsampler halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, dtype=dtype))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, dtype=dtype)

    def __call__(self, x: jax.Array, history: History) -> jax.Array:
        x = self.conv_in(x, history)
        x = self.mid_block(x, history)
        for block in self.up_blocks:
            x = block(x, history)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), history)


def stream(net, x: jax.Array, first: int, step: int) -> jax.Array:
    """Run the causal `net(x, history)` over the frames of x (B, F, H, W, C) chunk by chunk.

    Frames [0, first) go in one call (it holds the first-frame special cases), the rest `step` at a time in
    a `lax.scan` carrying each temporal conv's past frames. Chunking changes no number: the convs see exactly
    the frames a whole-sequence pass would. The tail is zero-padded to a whole chunk and its outputs dropped
    (causal, so padding after the end cannot change earlier frames).
    """
    history = History(None)
    out = net(x[:, :first], history)
    rest = x[:, first:]
    n = rest.shape[1]
    if n == 0:
        return out
    k = -(-n // step)
    rest = jnp.pad(rest, ((0, 0), (0, k * step - n)) + ((0, 0),) * (x.ndim - 2))
    chunks = jnp.moveaxis(rest.reshape(x.shape[0], k, step, *x.shape[2:]), 1, 0)

    def one_chunk(past, chunk):
        h = History(past)
        y = net(chunk, h)
        return h.next, y

    _, ys = jax.lax.scan(one_chunk, history.next, chunks)  # (k, B, S, H', W', C')
    per_step = ys.shape[2]
    ys = jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], k * per_step, *ys.shape[3:])
    return jnp.concatenate([out, ys[:, : n * per_step // step]], axis=1)


# ------------------------------------------------------------------------------------------- model

class AutoencoderKLWan(nnx.Module):
    """diffusers `AutoencoderKLWan` (Wan2.1): `encode` / `decode` plus latent (de)normalisation."""

    def __init__(self, cfg: WanVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.encoder = Encoder3d(cfg, dtype=dtype)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, dtype=dtype)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, dtype=dtype)
        self.decoder = Decoder3d(cfg, dtype=dtype)

    def encode(self, video: jax.Array, latent_frames_per_step: int = 1) -> jax.Array:
        """video (B, C_in, F, H, W) in [-1, 1], F = 1 + 4k -> posterior mean (B, Z, F', H', W').

        The mean is un-normalised (see `normalize_latents`).

        The encoder runs over 4·`latent_frames_per_step` frames at a time (peak memory grows with it).
        """
        _check_video(video, "video", self.config.in_channels)
        F = video.shape[2]
        if (F - 1) % ENCODE_CHUNK_FRAMES:
            raise ValueError(f"encode: video has {F} frames; need 1 + 4k "
                             "(diffusers encodes chunks of 1, 4, 4, … frames)")
        _check_step(latent_frames_per_step)
        x = jnp.moveaxis(video.astype(self.dtype), 1, -1)
        step = ENCODE_CHUNK_FRAMES * latent_frames_per_step
        h = self.quant_conv(stream(self.encoder, x, first=1 + step - ENCODE_CHUNK_FRAMES, step=step))
        mean = h[..., : self.config.z_dim]  # DiagonalGaussianDistribution: mean ‖ logvar
        return jnp.moveaxis(mean, -1, 1)

    def decode(self, z: jax.Array, latent_frames_per_step: int = 1) -> jax.Array:
        """z (B, Z, F', H', W') un-normalised -> video (B, C_out, 1 + T·(F'-1), 8H', 8W') clamped to [-1, 1].

        T is the temporal factor (4). Latents are decoded `latent_frames_per_step` at a time in a `lax.scan`
        (peak memory grows with it; 1 is diffusers' own chunking).
        """
        _check_video(z, "z", self.config.z_dim)
        _check_step(latent_frames_per_step)
        x = self.post_quant_conv(jnp.moveaxis(z.astype(self.dtype), 1, -1))
        out = stream(self.decoder, x, first=latent_frames_per_step, step=latent_frames_per_step)
        return jnp.moveaxis(jnp.clip(out, -1.0, 1.0), -1, 1)

    def normalize_latents(self, mu: jax.Array) -> jax.Array:
        """Posterior mean -> the DiT's latent space: (mu - mean) / std per channel (diffusers: · (1/std))."""
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    def denormalize_latents(self, z: jax.Array) -> jax.Array:
        """DiT latents -> `decode`'s input: z · std + mean, computed as diffusers: z / (1/std) + mean."""
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    def _stats(self, x):
        _check_video(x, "latents", self.config.z_dim)
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = jnp.asarray(np.asarray(self.config.latents_mean, np.float32).reshape(shape), x.dtype)
        inv_std = jnp.asarray((1.0 / np.asarray(self.config.latents_std, np.float32)).reshape(shape), x.dtype)
        return mean, inv_std


def _check_video(x, name: str, channels: int) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected shape (B, {channels}, F, H, W), got {tuple(x.shape)}")
    if min(x.shape) == 0:
        raise ValueError(f"{name}: empty shape {tuple(x.shape)}")


def _check_step(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"latent_frames_per_step must be a positive integer, got {n!r}")


# ----------------------------------------------------------------------------------------- loading

def _to_jax_layout(key: str, arr: np.ndarray) -> np.ndarray:
    """torch layouts -> ours: conv weights channels-last (…, I, O), RMS gains (C, 1, 1[, 1]) -> (C,)."""
    if key.endswith(".gamma"):
        return arr.reshape(arr.shape[0], *[d for d in arr.shape[1:] if d != 1])
    if key.endswith(".weight") and arr.ndim == 5:
        return arr.transpose(2, 3, 4, 1, 0)
    if key.endswith(".weight") and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    return arr


def load_vae(path: str | os.PathLike, dtype: str = "float32") -> AutoencoderKLWan:
    """An `AutoencoderKLWan` from a diffusers `vae/` directory (config.json + safetensors), strictly.

    Every checkpoint tensor must be used and every parameter filled with the right shape; weights stored in
    any float dtype are cast to `dtype` ("float32" | "bfloat16").
    """
    if dtype not in DTYPES:
        raise ValueError(f"load_vae: dtype {dtype!r} unsupported; allowed: {sorted(DTYPES)}")
    where = str(path)
    config = read_config(path)
    try:
        cfg = WanVAEConfig.from_dict(config)
    except ValueError as e:
        raise WeightsError(f"{where}/config.json: {e}") from None
    jdtype = DTYPES[dtype]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKLWan(cfg, dtype=jdtype)))
    params = {".".join(str(p) for p in path_): var for path_, var in nnx.to_flat_state(state)}
    tensors = SafetensorsDir(path)
    check_keys(set(tensors), set(params), where)
    for key, var in params.items():
        arr = fetch(tensors, key, var.shape, where, lambda a, k=key: _to_jax_layout(k, a))
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise WeightsError(f"{where}: tensor {key!r} has dtype {arr.dtype}, expected a float type")
        var.set_value(jnp.asarray(arr, dtype=jdtype))
    return nnx.merge(graphdef, state)

