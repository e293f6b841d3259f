"""Self-attention over a token sequence split across devices: Ulysses, Ring, and the hybrid of both.

Runs inside `jax.shard_map` on the mesh of `sdjax.sharding.mesh`. Each device holds q, k, v of its own
tokens, (B, L/P, N, K) with P = ring × ulysses; the result is the attention of those queries over all L
tokens, the same numbers as one device (fp32: to rounding).

1. Ulysses (axis "ulysses", size U): all-to-all that trades tokens for heads, (B, L/P, N, K) ->
   (B, L/R, N/U, K): each device then holds whole sequence blocks for a subset of heads. Heads that do not
   divide U are padded with zero heads (12 heads on 8 devices: 16), which are dropped afterwards.
2. Ring (axis "ring", size R): each device keeps its queries and gets the K/V of the other R-1 blocks, in one
   of two ways (`kv_exchange`):
   - "permute": passes its K/V block to the next device R-1 times (`ppermute`) and merges the block results
     with an online softmax on their log-sum-exp, in fp32 (R K/V blocks' memory: one at a time);
   - "gather": all-gathers K/V once and runs one attention over all keys (the whole sequence's K/V a layer; no
     log-sum-exp, any backend). The same bytes travel; the attention runs at full key length instead of R calls
     on 1/R of the keys plus the merges.
   "auto" gathers on GPUs from R = 4: there the transfers do not overlap the attention either way (our kernel
   holds every SM), and R hops plus R short calls cost more than one all-gather (Wan-1.3B 480p on 4 H200s,
   ring 4: 268.6 → 253.9 ms; at R = 2 both within 1%; benchmarks/NOTES.md, session 17).
3. The inverse all-to-all gives each device its own tokens back, all heads.

Tokens that do not divide P are padded at the end of the sequence by the caller; `true_len` masks them as
keys (their query rows are computed and dropped).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from sdjax.config import ConfigError
from sdjax.kernels.attention import AttentionBackendError, attention, available_backends, choose_backend, our_kernel
from sdjax.numerics import matmul_precision

# A finite "minus infinity": a block whose keys are all padding gets weight exp(NEG - lse) = 0, never NaN.
NEG = -1e30


KV_EXCHANGES = ("auto", "permute", "gather")


def resolve_kv_exchange(kv_exchange: str, ring: int, platform: str | None = None) -> str:
    """"auto" -> what measured faster on this platform at this ring size; other values unchanged."""
    if kv_exchange not in KV_EXCHANGES:
        raise ConfigError(f"kv_exchange={kv_exchange!r}: expected one of {', '.join(KV_EXCHANGES)}")
    if kv_exchange != "auto":
        return kv_exchange
    platform = platform or jax.devices()[0].platform
    return "gather" if platform == "gpu" and ring >= 4 else "permute"


def sequence_parallel_attention(q, k, v, *, ulysses: int, ring: int, true_len: int, backend: str = "auto",
                                kv_exchange: str = "permute", comm: bool = True):
    """q, k, v: this device's tokens (B, T, N, K), T = Lp / (ring·ulysses) -> (B, T, N, K).

    `true_len` is the number of real tokens L ≤ Lp (the rest is padding). `comm=False` replaces every
    collective by a local op of the same shape (wrong numbers; only for timing the compute alone).
    """
    B, T, N, K = q.shape
    Lp = T * ring * ulysses
    kv_exchange = resolve_kv_exchange(kv_exchange, ring)
    if ulysses > 1:
        Np = -(-N // ulysses) * ulysses
        if Np != N:  # zero heads attend uniformly to zero values: finite, and dropped below
            pad = ((0, 0), (0, 0), (0, Np - N), (0, 0))
            q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
        to_heads = partial(_all_to_all, split_axis=2, concat_axis=1, comm=comm)
        q, k, v = to_heads(q), to_heads(k), to_heads(v)  # (B, Lp/R, Np/U, K)
    if ring > 1 and kv_exchange == "gather":
        k, v = (_all_gather(t, comm=comm) for t in (k, v))  # (B, Lp, Np/U, K): ring block r is sequence block r
    if ring == 1 or kv_exchange == "gather":
        kv_len = None if true_len == Lp else jnp.full((B,), true_len, jnp.int32)
        out = attention(q, k, v, kv_len=kv_len, backend=backend)
    else:
        out = ring_attention(q, k, v, ring=ring, true_len=true_len if true_len < Lp else None, backend=backend,
                             comm=comm)
    if ulysses > 1:
        out = _all_to_all(out, split_axis=1, concat_axis=2, comm=comm)[:, :, :N]  # (B, T, N, K)
    return out


def _all_to_all(x, *, split_axis, concat_axis, comm):
    if comm:
        return jax.lax.all_to_all(x, "ulysses", split_axis, concat_axis, tiled=True)
    # Same shapes, no traffic: keep the first 1/U of split_axis, repeat it U times along concat_axis.
    u = jax.lax.psum(1, "ulysses")  # the axis size
    part = jax.lax.slice_in_dim(x, 0, x.shape[split_axis] // u, axis=split_axis)
    return jnp.concatenate([part] * u, axis=concat_axis)


def _all_gather(x, *, comm):
    if comm:
        return jax.lax.all_gather(x, "ring", axis=1, tiled=True)
    return jnp.concatenate([x] * jax.lax.psum(1, "ring"), axis=1)  # same shape, no traffic


def ring_attention(q, k, v, *, ring: int, true_len: int | None, backend: str = "auto", comm: bool = True):
    """Attention of the local queries over the K/V blocks of every device of the "ring" axis.

    q (B, T, N, K) and k/v (B, S, N, K) hold block r of the sequence on ring device r; keys at global
    position >= true_len (None: none) are masked. Returns (B, T, N, K) in q's dtype.
    """
    r = jax.lax.axis_index("ring")
    S = k.shape[1]
    perm = [(i, (i + 1) % ring) for i in range(ring)]  # send to the next device: at step s, hold block r - s

    def attend_block(step, k, v):
        n_valid = None if true_len is None else jnp.clip(true_len - ((r - step) % ring) * S, 0, S)
        return block_attention(q, k, v, n_valid, backend=backend)

    def merge(out, lse, o_j, lse_j):  # online softmax over blocks, fp32
        new = jnp.logaddexp(lse, lse_j)
        return out * jnp.exp(lse - new)[..., None] + o_j * jnp.exp(lse_j - new)[..., None], new

    def step(s, carry):
        k, v, out, lse = carry
        # The next block's transfer does not depend on this block's compute (XLA may schedule it alongside).
        k_next, v_next = (jax.lax.ppermute(t, "ring", perm) if comm else t for t in (k, v))
        out, lse = merge(out, lse, *attend_block(s, k, v))
        return k_next, v_next, out, lse

    out, lse = attend_block(0, k, v)
    if ring > 1:
        k, v = (jax.lax.ppermute(t, "ring", perm) if comm else t for t in (k, v))
        k, v, out, lse = jax.lax.fori_loop(1, ring - 1, step, (k, v, out, lse))
        out, _ = merge(out, lse, *attend_block(ring - 1, k, v))
    return out.astype(q.dtype)


# ------------------------------------------------------------------------------------- one K/V block


# Ring attention merges blocks by their log-sum-exp, which only these kernels return ("pallas": ours for the
# platform — the Hopper kernel, Triton elsewhere on GPUs, the Mosaic TPU kernel on TPUs).
RING_BACKENDS = ("auto", "pallas", "pallas_mgpu", "pallas_triton", "cudnn", "xla")


def check_ring_backend(backend: str, ring: int, kv_exchange: str = "permute") -> None:
    """`kv_exchange` resolved (not "auto"): only the permuted ring merges blocks by their log-sum-exp."""
    if ring > 1 and kv_exchange == "permute" and backend not in RING_BACKENDS:
        raise ConfigError(f"attention_backend={backend!r} is not allowed with ring={ring}: ring attention needs "
                          f"the kernel's log-sum-exp; one of {', '.join(RING_BACKENDS)} (or ulysses instead of ring)")


def block_attention(q, k, v, n_valid=None, *, backend: str = "auto"):
    """Attention over one K/V block with its log-sum-exp: (out (B, T, N, K) fp32, lse (B, T, N) fp32).

    Keys at index >= n_valid (a traced scalar, or None for all) are masked; with none valid, lse = NEG.
    """
    if backend not in RING_BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} cannot run ring attention (it needs the "
                                    f"kernel's log-sum-exp); with ring > 1 use one of {', '.join(RING_BACKENDS)}")
    if backend == "auto":
        backend = ring_auto_backend(q, k)
    if backend == "xla":
        return _xla_block(q, k, v, n_valid)
    kernel = _cudnn_with_lse if backend == "cudnn" else our_kernel(backend, q)
    B = q.shape[0]
    kv_len = None if n_valid is None else jnp.full((B,), jnp.maximum(n_valid, 1), jnp.int32)  # kernels: >= 1 key
    out, lse = kernel(q, k, v, kv_len, return_lse=True)
    if n_valid is not None:  # a block of padding only: no weight
        lse = jnp.where(n_valid > 0, lse, NEG)
    return out.astype(jnp.float32), lse


def ring_auto_backend(q, k) -> str:
    """What `auto` runs for one ring block: the measured-fastest backend if it returns the log-sum-exp, else the
    platform's best one that does."""
    best = choose_backend(q, k)
    if best in RING_BACKENDS:
        return best
    can = available_backends(q)
    # on TPUs our kernel where splash (no log-sum-exp) would run; never an interpreted kernel on a CPU
    order = {"gpu": ("pallas_mgpu", "cudnn"), "tpu": ("pallas",)}.get(jax.devices()[0].platform, ())
    return next((b for b in order if b in can), "xla")


def _xla_block(q, k, v, n_valid, *, q_chunk: int = 2048):
    """Plain XLA, fp32 logits and statistics; queries in chunks so memory is O(q_chunk × S) per head."""
    B, T, N, K = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(K)
    prec = matmul_precision(q.dtype)  # fp32 parity mode: no TF32 on GPUs
    valid = None if n_valid is None else jnp.arange(S) < n_valid  # (S,)

    def one_chunk(qc):  # (B, C, N, K)
        s = jnp.einsum("bqnh,bknh->bnqk", qc, k, preferred_element_type=jnp.float32, precision=prec) * scale
        if valid is not None:
            s = jnp.where(valid, s, NEG)
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)
        l = p.sum(-1, keepdims=True)
        o = jnp.einsum("bnqk,bknh->bqnh", (p / l).astype(v.dtype), v, preferred_element_type=jnp.float32,
                       precision=prec)
        return o, (m + jnp.log(l))[..., 0].transpose(0, 2, 1)  # lse (B, C, N)

    if T <= q_chunk:
        return one_chunk(q)
    n = -(-T // q_chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * q_chunk - T), (0, 0), (0, 0))).reshape(B, n, q_chunk, N, K).swapaxes(0, 1)
    o, lse = jax.lax.map(one_chunk, qp)  # (n, B, C, ...)
    o = o.swapaxes(0, 1).reshape(B, n * q_chunk, N, K)[:, :T]
    lse = lse.swapaxes(0, 1).reshape(B, n * q_chunk, N)[:, :T]
    return o, lse


def _cudnn_with_lse(q, k, v, kv_len, return_lse: bool = True):
    """cuDNN flash attention with its fp32 softmax statistics (the public `jax.nn.dot_product_attention`
    rounds them to the output dtype, too coarse for the merge): (out, lse (B, T, N) fp32)."""
    if jax.devices()[0].platform != "gpu":
        raise AttentionBackendError("attention backend 'cudnn' needs a GPU")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionBackendError(f"attention backend 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    except ImportError as e:  # a private module: say so plainly if a jax release moves it
        raise AttentionBackendError(f"ring attention with cuDNN needs jax's cuDNN attention module ({e}); "
                                    "use attention_backend='pallas' or 'xla'") from None
    B, T = q.shape[:2]
    kw = {}
    if kv_len is not None:
        kw = dict(q_seqlen=jnp.full((B,), T, jnp.int32), kv_seqlen=kv_len, mask_type=MaskType.PADDING)
    out, lse = cudnn_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), return_residual=True, **kw)
    return out, lse.astype(jnp.float32).transpose(0, 2, 1)  # cuDNN gives (B, N, T)
