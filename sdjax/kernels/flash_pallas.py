"""Flash-attention forward in Pallas: the portable kernels (Triton lowering for GPUs, Mosaic TPU).

Both compute softmax(q kᵀ / sqrt(H)) v with an online softmax in fp32 and never form the T x S matrix, and
with `return_lse` also each query row's log-sum-exp (what ring attention merges key blocks by).
Layout at the boundary is (B, T, N, H) like `sdjax.kernels.attention.attention`; keys at or past
`kv_end[b]` (the real key count of row b) are masked. Sequence lengths need not be block multiples: the
inputs are zero-padded to whole blocks here and the padded keys are masked in the kernel (Wan's 32,760
and 75,600 tokens are not multiples of any power of two above 8).

The Hopper kernel (wgmma, TMA, warp specialisation) is in `flash_mgpu.py`; this file is the baseline
that runs on any GPU Triton supports, on TPU, and in interpret mode on CPU (what CI checks).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_seq(x, length: int):
    """Zero-pads axis 1 (tokens) of (B, T, N, H) to `length`."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def kv_end_of(kv_len, B: int, S: int):
    """(B,) int32 count of real keys per batch row: `kv_len` clipped to [1, S], or S everywhere."""
    if kv_len is None:
        return jnp.full((B,), S, jnp.int32)
    return jnp.clip(kv_len.astype(jnp.int32), 1, S)


# ------------------------------------------------------------------------------------------ Triton (GPU)


def _triton_kernel(kv_end_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref, block_k: int, ragged: bool):
    """One (batch, head, q-block) program: loop over key blocks with an online softmax (base 2)."""
    q = q_ref[...]  # (Bq, H)
    block_q, H = q.shape
    scale = LOG2_E / math.sqrt(H)  # folded into one multiply: exp(x/sqrt(H)) = 2^(x * scale)
    kv_end = kv_end_ref[pl.program_id(0)]

    def body(j, carry, masked: bool):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if masked:  # only the last, partial key block pays for the mask
            cols = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(cols < kv_end, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    carry = (jnp.zeros((block_q, H), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    n_full = kv_end // block_k
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    if ragged:
        carry = lax.fori_loop(n_full, pl.cdiv(kv_end, block_k), functools.partial(body, masked=True), carry)
    acc, m, l = carry
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    if lse_ref:  # m is in log2 units
        lse_ref[0][...] = m * LN_2 + jnp.log(l)


def flash_attention_triton(q, k, v, kv_len=None, *, block_q: int = 128, block_k: int = 64,
                           num_warps: int = 4, num_stages: int = 2, interpret: bool = False,
                           return_lse: bool = False):
    """Pallas flash attention through the Triton lowering (any CUDA GPU; `interpret=True` on CPU).

    q (B, T, N, H), k/v (B, S, N, H), kv_len (B,) int or None -> (B, T, N, H) in q's dtype; with `return_lse`
    also the rows' log-sum-exp of their logits, (B, T, N) fp32.
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    block_q = min(block_q, _round_up(T, 16))
    block_k = min(block_k, _round_up(S, 16))
    Tp, Sp = _round_up(T, block_q), _round_up(S, block_k)
    ragged = kv_len is not None or S % block_k != 0
    kv_end = kv_end_of(kv_len, B, S)
    qp, kp, vp = _pad_seq(q, Tp), _pad_seq(k, Sp), _pad_seq(v, Sp)

    kernel = functools.partial(_triton_kernel, block_k=block_k, ragged=ragged)
    q_spec = pl.BlockSpec((None, block_q, None, H), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n, 0))
    out_specs, out_shape = q_spec, jax.ShapeDtypeStruct((B, Tp, N, H), q.dtype)
    if return_lse:
        out_specs = (q_spec, pl.BlockSpec((None, block_q, None), lambda b, n, i: (b, i, n)))
        out_shape = (out_shape, jax.ShapeDtypeStruct((B, Tp, N), jnp.float32))
    out = pl.pallas_call(
        kernel,
        grid=(B, N, Tp // block_q),
        in_specs=[pl.BlockSpec((B,), lambda b, n, i: (0,)), q_spec, kv_spec, kv_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sdjax_flash_triton",
    )(kv_end, qp, kp, vp)
    if return_lse:
        return out[0][:, :T], out[1][:, :T]
    return out[:, :T] if Tp != T else out


# ------------------------------------------------------------------------------------------ Mosaic TPU


def _tpu_kernel(kv_end_ref, q_ref, k_ref, v_ref, o_ref, *rest, block_k: int):
    """Grid (B, N, q-block, k-block); the k-block axis is sequential and carries m, l, acc in VMEM.

    m and l are kept lane-replicated (block_q, 128) as TPU vregs are (8, 128) tiles. `rest` is
    ([lse_ref,] m_sc, l_sc, acc_sc).
    """
    *lse_ref, m_sc, l_sc, acc_sc = rest
    b, j = pl.program_id(0), pl.program_id(3)
    kv_end = kv_end_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block_k < kv_end)  # blocks wholly past kv_end are skipped (their DMA is elided too)
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * (1.0 / math.sqrt(q.shape[-1]))
        cols = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(cols < kv_end, s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # (Bq, 128)
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, :1])
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + pv
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...][:, :1]).astype(o_ref.dtype)
        if lse_ref:
            lse_ref[0][...] = (m_sc[...] + jnp.log(l_sc[...]))[:, :1]


def flash_attention_tpu(q, k, v, kv_len=None, *, block_q: int = 512, block_k: int = 512,
                        interpret: bool = False, return_lse: bool = False):
    """Pallas flash attention through the Mosaic TPU lowering (`interpret=True` runs it on CPU).

    q (B, T, N, H), k/v (B, S, N, H), kv_len (B,) int or None -> (B, T, N, H) in q's dtype; with `return_lse`
    also the rows' log-sum-exp of their logits, (B, T, N) fp32 (written as (…, block_q, 1) blocks: a full last dim).
    Heads move next to batch ((B, N, T, H)) so each block's last two dims are (tokens, H) as TPU tiles want.
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    block_q = min(block_q, _round_up(T, 128))
    block_k = min(block_k, _round_up(S, 128))
    Tp, Sp = _round_up(T, block_q), _round_up(S, block_k)
    kv_end = kv_end_of(kv_len, B, S)
    qt = _pad_seq(q, Tp).transpose(0, 2, 1, 3)
    kt = _pad_seq(k, Sp).transpose(0, 2, 1, 3)
    vt = _pad_seq(v, Sp).transpose(0, 2, 1, 3)

    def kv_index(b, n, i, j, kv_end_ref):  # clamp to the last real block: repeated index -> no new DMA
        return b, n, jnp.minimum(j, (kv_end_ref[b] - 1) // block_k), 0

    q_spec = pl.BlockSpec((None, None, block_q, H), lambda b, n, i, j, kv_end_ref: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, H), kv_index)
    out_specs, out_shape = q_spec, jax.ShapeDtypeStruct((B, N, Tp, H), q.dtype)
    if return_lse:
        out_specs = (q_spec, pl.BlockSpec((None, None, block_q, 1), lambda b, n, i, j, kv_end_ref: (b, n, i, 0)))
        out_shape = (out_shape, jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32))
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, block_k=block_k),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, N, Tp // block_q, Sp // block_k),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((block_q, 128), jnp.float32), pltpu.VMEM((block_q, 128), jnp.float32),
                            pltpu.VMEM((block_q, H), jnp.float32)],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="sdjax_flash_tpu",
    )(kv_end, qt, kt, vt)
    if return_lse:
        out, lse = out
        return out.transpose(0, 2, 1, 3)[:, :T], lse[..., 0].transpose(0, 2, 1)[:, :T]
    return out.transpose(0, 2, 1, 3)[:, :T]
