"""TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) behind our (B, T, N, H) layout.

Splash wants (N, T, H) per batch row, lengths that are multiples of its blocks, and no softmax scale;
so q is pre-scaled by 1/sqrt(H), tokens are zero-padded to whole blocks, and the padded (or past-kv_len)
keys are masked with segment ids (queries are segment 0, such keys segment 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def splash_attention(q, k, v, kv_len=None, *, block_q: int = 512, block_kv: int = 512,
                     interpret: bool = False):
    """q (B, T, N, H), k/v (B, S, N, H), kv_len (B,) int or None -> (B, T, N, H) in q's dtype."""
    B, T, N, H = q.shape
    S = k.shape[1]
    block_q = min(block_q, _round_up(T, 128))  # splash blocks are multiples of the 128-lane tile
    block_kv = min(block_kv, _round_up(S, 128))
    Tp, Sp = _round_up(T, block_q), _round_up(S, block_kv)

    mask = splash.MultiHeadMask([splash.FullMask((Tp, Sp))] * N)
    kernel = splash.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv))

    kv_end = jnp.full((B,), S, jnp.int32) if kv_len is None else jnp.clip(kv_len.astype(jnp.int32), 1, S)
    kv_seg = (jnp.arange(Sp)[None, :] >= kv_end[:, None]).astype(jnp.int32)  # (B, Sp): 1 = masked key
    q_seg = jnp.zeros((B, Tp), jnp.int32)

    def to_nth(x, length):  # (B, L, N, H) -> (B, N, length, H)
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    qs = to_nth(q * jnp.asarray(1.0 / math.sqrt(H), q.dtype), Tp)
    out = jax.vmap(lambda q1, k1, v1, qs1, ks1: kernel(q1, k1, v1, splash.SegmentIds(q=qs1, kv=ks1)))(
        qs, to_nth(k, Sp), to_nth(v, Sp), q_seg, kv_seg)
    return out.transpose(0, 2, 1, 3)[:, :T].astype(q.dtype)
