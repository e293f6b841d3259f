"""The one attention entry point every model calls.

Layout (B, T, N, H): batch, tokens, heads, head dim. Non-causal, softmax scale 1/sqrt(H).
`kv_len` (B,) optionally marks how many keys of each row are real; keys at or past it are masked.

Backends live behind `attention(..., backend=...)`; each declares what it supports and raises a clear
`AttentionBackendError` otherwise — no silent fallback inside layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn")


class AttentionBackendError(ValueError):
    """The requested backend cannot run these inputs on this platform."""


def _xla_attention(q, k, v, kv_len, *, q_chunk: int = 2048):
    """Reference attention in plain XLA, fp32 softmax.

    Queries are processed in chunks with `lax.map`, so memory is O(q_chunk x S) per head instead of S x S:
    it runs at 75k tokens.
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(H)
    mask = None
    if kv_len is not None:
        mask = jnp.arange(S)[None, :] < kv_len[:, None]  # (B, S)

    def one_chunk(qc):  # qc: (B, C, N, H)
        logits = jnp.einsum("bqnh,bknh->bnqk", qc, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
        p = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bnqk,bknh->bqnh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    if T <= q_chunk:
        return one_chunk(q).astype(q.dtype)
    n_chunks = -(-T // q_chunk)
    pad = n_chunks * q_chunk - T
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    chunks = qp.reshape(B, n_chunks, q_chunk, N, H).swapaxes(0, 1)
    out = jax.lax.map(one_chunk, chunks)  # (n_chunks, B, C, N, H)
    out = out.swapaxes(0, 1).reshape(B, n_chunks * q_chunk, N, H)[:, :T]
    return out.astype(q.dtype)


def _cudnn_attention(q, k, v, kv_len):
    if jax.devices()[0].platform != "gpu":
        raise AttentionBackendError("attention backend 'cudnn' needs a GPU")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionBackendError(f"attention backend 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    if q.shape[-1] > 128:
        raise AttentionBackendError(f"attention backend 'cudnn' supports head_dim <= 128, got {q.shape[-1]}")
    kv_seq = None if kv_len is None else kv_len.astype(jnp.int32)
    q_seq = None if kv_len is None else jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_seq, key_value_seq_lengths=kv_seq,
                                        implementation="cudnn")


def _pick(q) -> str:
    on_gpu = jax.devices()[0].platform == "gpu"
    if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
        return "cudnn"
    return "xla"


def attention(q, k, v, *, kv_len=None, backend: str = "auto"):
    """softmax(q kᵀ / sqrt(H)) v over all (unmasked) keys; q (B,T,N,H), k/v (B,S,N,H) -> (B,T,N,H)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, T, N, H) inputs, got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} unknown; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = _pick(q)
    if backend == "cudnn":
        return _cudnn_attention(q, k, v, kv_len)
    return _xla_attention(q, k, v, kv_len)
