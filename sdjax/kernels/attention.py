"""The one attention entry point every model calls.

Layout (B, T, N, H): batch, tokens, heads, head dim. Non-causal, softmax scale 1/sqrt(H).
`kv_len` (B,) optionally marks how many keys of each row are real; keys at or past it are masked.
Values are clipped to [1, S] (a row always attends to at least one key). `key_bias` (B, S) optionally adds a
per-key constant to every query's logits (a key standing for several equal keys carries log(their count));
the `xla`, `cudnn` and `pallas_mgpu` backends take it, and `auto` then ranks those by the timings measured with a
key_bias.

Backends live behind `attention(..., backend=...)`; each declares what it supports and raises a clear
`AttentionBackendError` otherwise — no silent fallback inside layers:

| backend         | platform           | what                                                               |
|-----------------|--------------------|--------------------------------------------------------------------|
| `xla`           | any                | reference: plain XLA, fp32 softmax, queries in chunks              |
| `cudnn`         | GPU                | cuDNN fused flash attention via jax.nn.dot_product_attention       |
| `pallas_mgpu`   | GPU sm_90 (Hopper) | ours: Pallas Mosaic GPU, wgmma + TMA + warp specialisation         |
| `pallas_mgpu_int8` | GPU sm_90       | the same kernel with S = Q Kᵀ on the int8 tensor cores: k smoothed, |
|                 |                    | q and k quantized per block (SageAttention's recipe); P V in bf16.  |
|                 |                    | Lossy (~1% rel. L2), opt-in: `auto` never picks it (NOTES.md)       |
| `pallas_mgpu_int8_fp8` | GPU sm_90   | int8 Q Kᵀ as above and P V on the fp8 tensor cores (P, V in e4m3):   |
|                 |                    | SageAttention2's Hopper recipe. Lossier (e4m3 keeps 3 mantissa bits: |
|                 |                    | ~4% rel. L2 on random data), faster; opt-in like the int8 one       |
| `pallas_triton` | GPU; CPU interpret | ours: Pallas through the Triton lowering (portable baseline)       |
| `pallas`        | GPU, TPU, CPU      | ours, best variant for the platform: mgpu on Hopper, else triton;  |
|                 |                    | the Mosaic TPU kernel on TPU; Triton in interpret mode on CPU      |
| `splash`        | TPU                | jax's TPU splash attention                                         |
| `auto`          |                    | fastest supporting backend per platform and shape, ranked by the   |
|                 |                    | timings in `attention_table.py` (from benchmarks/results)          |

Our exact kernels (`our_kernel`) also return each row's log-sum-exp on request (`return_lse=True`), which ring
attention (sdjax.sharding.attention) merges key blocks by.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sdjax.kernels import attention_table, flash_mgpu, flash_pallas
from sdjax.kernels.platform import not_hopper_reason
from sdjax.kernels.splash import splash_attention
from sdjax.numerics import matmul_precision

BACKENDS = ("auto", "xla", "cudnn", "pallas", "pallas_mgpu", "pallas_mgpu_int8", "pallas_mgpu_int8_fp8",
            "pallas_triton", "splash")
LOSSY_BACKENDS = ("pallas_mgpu_int8", "pallas_mgpu_int8_fp8")  # trade accuracy for speed: only when asked for by name

# Used only where attention_table.py holds no measurement for this platform (e.g. TPU: none was taken).
UNMEASURED_ORDER = {
    "gpu": ("cudnn", "pallas_mgpu", "pallas_triton", "xla"),
    "tpu": ("splash", "pallas", "xla"),
    "cpu": ("xla",),
}
_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


class AttentionBackendError(ValueError):
    """The requested backend cannot run these inputs on this platform."""


# ------------------------------------------------------------------------------------------ backends


def _xla_attention(q, k, v, kv_len, key_bias=None, *, q_chunk: int = 2048):
    """Reference attention in plain XLA, fp32 softmax.

    Queries are processed in chunks with `lax.map`, so memory is O(q_chunk x S) per head instead of S x S:
    it runs at 75k tokens.
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(H)
    prec = matmul_precision(q.dtype)
    mask = None
    if kv_len is not None:
        mask = jnp.arange(S)[None, :] < kv_len[:, None]  # (B, S)

    def one_chunk(qc):  # qc: (B, C, N, H)
        logits = jnp.einsum("bqnh,bknh->bnqk", qc, k, preferred_element_type=jnp.float32, precision=prec) * scale
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :].astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
        p = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bnqk,bknh->bqnh", p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)

    if T <= q_chunk:
        return one_chunk(q).astype(q.dtype)
    n_chunks = -(-T // q_chunk)
    pad = n_chunks * q_chunk - T
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    chunks = qp.reshape(B, n_chunks, q_chunk, N, H).swapaxes(0, 1)
    out = jax.lax.map(one_chunk, chunks)  # (n_chunks, B, C, N, H)
    out = out.swapaxes(0, 1).reshape(B, n_chunks * q_chunk, N, H)[:, :T]
    return out.astype(q.dtype)


def _cudnn_attention(q, k, v, kv_len, key_bias=None):
    kv_seq = None if kv_len is None else kv_len.astype(jnp.int32)
    q_seq = None if kv_len is None else jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    bias = None
    if key_bias is not None:  # cuDNN takes a (B, 1, T, S) bias: broadcast over the heads only
        B, T, _, _ = q.shape
        bias = jnp.broadcast_to(key_bias[:, None, None, :].astype(q.dtype), (B, 1, T, k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, query_seq_lengths=q_seq, key_value_seq_lengths=kv_seq,
                                        implementation="cudnn")


def our_kernel(backend: str, q, kv_len=None):
    """The exact kernel of ours behind `pallas` (the platform's: Hopper, else Triton on GPUs, Mosaic TPU on TPUs,
    Triton interpreted on CPUs), `pallas_mgpu` or `pallas_triton`: fn(q, k, v, kv_len, **options); every one takes
    `return_lse` (ring attention)."""
    platform = _device().platform
    if backend == "pallas":
        if platform == "tpu":
            return flash_pallas.flash_attention_tpu
        backend = "pallas_mgpu" if platform == "gpu" and _unsupported("pallas_mgpu", q, kv_len) is None \
            else "pallas_triton"
    if backend == "pallas_mgpu":
        return flash_mgpu.flash_attention_mgpu
    if backend == "pallas_triton":
        return functools.partial(flash_pallas.flash_attention_triton, interpret=platform == "cpu")
    raise AttentionBackendError(f"{backend!r} is not one of our exact kernels (pallas, pallas_mgpu, pallas_triton)")


_RUN = {
    "xla": _xla_attention,
    "cudnn": _cudnn_attention,
    "pallas": lambda q, k, v, kv_len: our_kernel("pallas", q, kv_len)(q, k, v, kv_len),
    "pallas_mgpu": lambda q, k, v, kv_len, key_bias=None, k_norms=None: flash_mgpu.flash_attention_mgpu(
        q, k, v, kv_len, key_bias=key_bias, k_norms=k_norms),
    "pallas_mgpu_int8": lambda q, k, v, kv_len: flash_mgpu.flash_attention_mgpu(q, k, v, kv_len, int8_qk=True),
    "pallas_mgpu_int8_fp8": lambda q, k, v, kv_len: flash_mgpu.flash_attention_mgpu(q, k, v, kv_len, int8_qk=True,
                                                                                     fp8_pv=True),
    "pallas_triton": lambda q, k, v, kv_len: our_kernel("pallas_triton", q)(q, k, v, kv_len),
    "splash": splash_attention,
}


def _device():
    return jax.devices()[0]


def _unsupported(backend: str, q, kv_len=None, k=None, key_bias=None) -> str | None:
    """Why `backend` can't run q (B, T, N, H) [against k, with key_bias] on this platform, or None if it can."""
    dev = _device()
    platform, dtype, H = dev.platform, q.dtype, q.shape[-1]
    if key_bias is not None and backend not in KEY_BIAS_BACKENDS:
        return f"takes no key_bias; those that do: {', '.join(KEY_BIAS_BACKENDS)}"
    if backend == "xla":
        return None
    if backend == "cudnn":
        if platform != "gpu":
            return "needs a GPU"
        if dtype not in _LOW_PRECISION:
            return f"needs bfloat16 or float16 inputs, got {dtype}"
        if H > 128 or H % 8:
            return f"supports head_dim <= 128 and a multiple of 8, got {H}"
        return None
    if backend in ("pallas_mgpu", *LOSSY_BACKENDS):
        if (reason := not_hopper_reason()) is not None:
            return reason
        k = q if k is None else k
        return flash_mgpu.unsupported_reason(q, k, k, int8_qk=backend in LOSSY_BACKENDS, key_bias=key_bias)
    if backend == "pallas_triton":
        if platform not in ("gpu", "cpu"):
            return f"needs a GPU (or CPU, interpreted), got {platform}"
        if dtype not in _LOW_PRECISION:
            return f"needs bfloat16 or float16 inputs, got {dtype}"
        if H not in (64, 128):
            return f"supports head_dim 64 and 128, got {H}"
        return None
    if backend == "splash" or (backend == "pallas" and platform == "tpu"):
        if platform != "tpu":
            return f"needs a TPU, got {platform}"
        if dtype not in (jnp.bfloat16, jnp.float32):
            return f"on TPU needs bfloat16 or float32 inputs, got {dtype}"
        return None if backend == "splash" or H in (64, 128) else f"supports head_dim 64 and 128, got {H}"
    if backend == "pallas":
        mgpu_ok = platform == "gpu" and _unsupported("pallas_mgpu", q, kv_len) is None
        return None if mgpu_ok else _unsupported("pallas_triton", q, kv_len)
    raise AttentionBackendError(f"attention backend {backend!r} unknown; allowed: {', '.join(BACKENDS)}")


def available_backends(q, kv_len=None) -> list[str]:
    """The concrete exact backends that can run q (B, T, N, H) here (`auto` and the lossy ones excluded)."""
    return [b for b in BACKENDS if b not in ("auto", *LOSSY_BACKENDS) and _unsupported(b, q, kv_len) is None]


def choose_backend(q, k, kv_len=None, key_bias=None) -> str:
    """What `auto` runs: the fastest measured backend that supports these inputs on this device."""
    dev = _device()
    ranking = attention_table.ranking(
        device_kind=dev.device_kind, platform=dev.platform, arch=str(getattr(dev, "compute_capability", "")),
        dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1], B=q.shape[0], T=q.shape[1], S=k.shape[1],
        N=q.shape[2], has_kv_len=kv_len is not None, has_key_bias=key_bias is not None)
    for backend in (*ranking, *UNMEASURED_ORDER.get(dev.platform, ("xla",))):
        if backend not in LOSSY_BACKENDS and _unsupported(backend, q, kv_len, k, key_bias) is None:
            return backend
    return "xla"


KEY_BIAS_BACKENDS = ("xla", "cudnn", "pallas_mgpu")
K_NORMS_BACKENDS = ("auto", "pallas_mgpu")  # backends asked for by name that may use `k_norms` (held maxima)


def attention(q, k, v, *, kv_len=None, key_bias=None, k_norms=None, backend: str = "auto"):
    """softmax(q kᵀ / sqrt(H) [+ key_bias]) v over all (unmasked) keys; q (B,T,N,H), k/v (B,S,N,H) -> (B,T,N,H).

    `k_norms` (B, N): each head's largest key norm, where the caller has it for free (the q/k norm kernel's pass,
    `rms_norm_rope`); our Hopper kernel's held maxima need it and otherwise take it in a pass over k."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, T, N, H) inputs, got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_len is not None:
        if kv_len.shape != (q.shape[0],) or not jnp.issubdtype(kv_len.dtype, jnp.integer):
            raise ValueError(f"attention: kv_len must be an integer array of shape (B,) = ({q.shape[0]},), "
                             f"got {kv_len.dtype}{kv_len.shape}")
        kv_len = jnp.clip(kv_len.astype(jnp.int32), 1, k.shape[1])
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} unknown; allowed: {', '.join(BACKENDS)}")
    if key_bias is not None and key_bias.shape != k.shape[:2]:
        raise ValueError(f"attention: key_bias must have shape (B, S) = {k.shape[:2]}, got {key_bias.shape}")
    if backend == "auto":
        backend = choose_backend(q, k, kv_len, key_bias)
    elif (reason := _unsupported(backend, q, kv_len, k, key_bias)) is not None:
        raise AttentionBackendError(f"attention backend {backend!r} {reason}")
    if k_norms is not None and k_norms.shape != q.shape[:1] + q.shape[2:3]:
        raise ValueError(f"attention: k_norms must have shape (B, N) = {q.shape[:1] + q.shape[2:3]}, "
                         f"got {k_norms.shape}")
    options = {} if key_bias is None else {"key_bias": key_bias}
    if k_norms is not None and backend == "pallas_mgpu":  # (the only kernel that uses them: K_NORMS_BACKENDS)
        options["k_norms"] = k_norms
    return _RUN[backend](q, k, v, kv_len, **options)
