"""Flash-attention forward for Hopper (sm_90) in Pallas Mosaic GPU: wgmma, TMA, warp specialisation.

One CTA owns 2 * block_q query rows of one (batch, head) and has three warpgroups:
  - warpgroups 0 and 1 compute, block_q rows each (wgmma needs 64-row tiles per warpgroup);
  - warpgroup 2 only issues TMA copies of K/V blocks into a `stages`-deep shared-memory ring and
    gives its registers to the compute warpgroups (setmaxnreg).
Per key block a compute warpgroup does S = Q Kᵀ (wgmma, Q and K from shared memory), an online softmax
in base 2 (the 1/sqrt(H) scale folded into log2(e), one FMA per logit), and O += P V (wgmma with P from
registers). Three schedules:
  - `overlap=False`: the compute warpgroups "ping-pong" on a shared barrier, so one's softmax runs while
    the other's matmuls occupy the tensor cores (jax's attention_mgpu example does this);
  - `chained=True`, two-phase with or without the ping-pong: a warpgroup's O += P_j V_j and S_{j+1} = Q K_{j+1}ᵀ
    are issued back to back and awaited together (the plain schedule waits for P V before it issues Q Kᵀ, so the
    tensor cores drain between a warpgroup's two matmuls);
  - `overlap=True` (ping-pong optional): inside a warpgroup, S_{j+1} = Q K_{j+1}ᵀ and O += P_j V_j
    are issued together and the softmax of block j+1 runs while P_j V_j is still on the tensor cores
    (FlashAttention-3's intra-warpgroup overlap). With the online maximum O's rescale waits for P_j V_j;
    `chained` + `overlap` runs it in held blocks only (`frozen_max`: O is never touched between them).
Clusters (`cluster=2`): two CTAs with neighbouring query blocks of one head run as a cluster and each K/V block
is loaded from L2 once for both — each CTA's TMA fetches half and multicasts it into both shared memories — so
the L2 -> SMEM traffic halves (~5 TB/s at Wan-1.3B 480p without it: every 128 query rows read all of K and V).
A slot is refilled only when the consumers of both CTAs have released it (a cluster barrier).
Held maxima (`frozen_max`, exact; chained schedule): after the first key block a warpgroup may fix its rows' maxima, so
the later blocks' softmax is exp2, row sum and P's conversion alone (no maximum, no rescale of O and l) — where the
rows' Cauchy–Schwarz bounds |q_i| · max_j |k_j| prove every exponential stays in range (`FROZEN_MAX_MARGIN`);
with or without the ping-pong (without it, the hold test's one cross-warp reduction is serialized).
The last wave (`tail_split`, chained): every cluster does the same work and they run in near lock-step waves, so the
clusters left over after the last whole wave of cluster slots run instead as a few clusters each over consecutive
key ranges, dispatched last; their O (fp32) and log-sum-exp are merged after the kernel (`plan_tail`, `_merge_tail`).
`default_config(S)` picks the variant measured fastest for the key length: 128-key blocks in the chained schedule
without the ping-pong, in clusters of 2, with held maxima and the held blocks' FA3 overlap for long self-attention
(~717 TFLOP/s at Wan-1.3B 480p at the 700 W cap on an H200 vs cuDNN's 558 through JAX), 128-key blocks with the
overlap schedule for short (text) keys.

Lossy int8 mode (`int8_qk=True`, SageAttention's recipe): k is smoothed (its mean over tokens removed — the
softmax does not see it), q is rounded to int8 with one scale per token and head, k with one per 192-key block
and head, and S = Q Kᵀ runs on the int8 tensor cores (2x the bf16 rate) with both scales folded into the
softmax's one FMA a logit (the q scales as a row operand); P V stays bf16. Measured on an H200: 9.25 vs 10.29 ms
at Wan-1.3B 480p, ~1.2% rel. L2 error on random data (bf16: 0.2%). An fp8 (e4m3) Q Kᵀ was faster (8.87 ms) but
4x less accurate and fragile under a key offset.
Lossier `fp8_pv=True` on top (SageAttention2's Hopper recipe): O = P V on the fp8 tensor cores too — P packed
from the fp32 accumulator into wgmma's 8-bit register operand without moving data between threads (its columns
then come in FP8_PV_KEY_ORDER; K's keys are stored in the inverse order, so they reach the tensor core in
natural order), V in e4m3 with one scale per head, transposed (keys last). 7.9-8.2 ms (128-key blocks, 4 stages)
at ~4% rel. L2 on random data; the 1.3B 480p forward 390 ms on an H200 and 397 on an H100, against 459-468
exact (benchmarks/NOTES.md, session 6).

With `return_lse` (exact mode) the kernel also writes each query row's log-sum-exp, the statistic ring attention
merges key blocks by (sdjax.sharding.attention); each warpgroup stores its rows from registers (the long-key configs'
K/V ring leaves no shared memory to stage them). At Wan-1.3B 480p it costs nothing measurable (10.144 vs 10.157 ms on
an H200) and is within 1.5e-6 of float64's (benchmarks/NOTES.md, session 16).

Ragged lengths cost nothing extra: TMA zero-fills rows read past the end of q/k/v and drops rows
written past the end of o, so nothing is padded in memory (except token counts that are not multiples of
8, or fewer keys than `stages` blocks: tiny copies); only the last key block is masked (keys at or past
kv_end = min(kv_len[b], S)), and key blocks wholly past kv_end are never loaded.

A key bias (exact mode, short keys: the cross-attention to Wan's folded text padding) is added to every query's
logits: each compute warpgroup copies its batch row's bias into shared memory once and reads each key block's
slice in the softmax's column layout. On an H100 at the CFG batch's 128 folded keys: 0.221 ms against cuDNN's 0.394,
which reads a materialized (B, 1, T, S) bias (benchmarks/NOTES.md, session 10).

Not CPU-runnable: Pallas's GPU interpreter does not yet interpret this kernel's accumulator-from-registers
steps; CI checks that it lowers for CUDA, and `benchmarks/attention.py` checks it against cuDNN and a float64
reference on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row, laid out like a wgmma accumulator's rows
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per key column


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    block_q: int = 64  # query rows per compute warpgroup (a CTA covers 2 * block_q rows)
    block_kv: int = 128  # keys per pipeline step
    stages: int = 2  # depth of the K/V shared-memory ring
    # FA3 intra-warpgroup overlap of softmax with the P V matmul (with `chained` and `frozen_max`: in held blocks)
    overlap: bool = False
    pingpong: bool = True  # alternate the two compute warpgroups' matmul phases
    # CTAs of a cluster (1, 2 or 4): neighbouring query blocks of one head that share each K/V block, loaded from L2
    # once and multicast into every CTA's shared memory (TMA multicast): 1 / cluster of the L2 -> SMEM traffic.
    cluster: int = 1
    # Exact: the rows' maxima are fixed after the first key block (`FROZEN_MAX_MARGIN`), so the later blocks' softmax
    # has no maximum and O and l no rescale — taken by a warpgroup only where the logits' Cauchy–Schwarz bound proves
    # the fixed maximum keeps every exponential in range. Runs in the chained schedule.
    frozen_max: bool = False
    # Two-phase only: a warpgroup issues O += P_j V_j and S_{j+1} = Q K_{j+1}ᵀ back to back and awaits them together,
    # so its tensor-core phase has no drain between the two (the plain schedule waits for P V before issuing Q Kᵀ).
    # Made for held maxima (O untouched between blocks); with the online maximum at 192-key blocks it measured 2.3x
    # slower (O's rescale beside S, P and O in flight: NOTES, session 19). With `overlap` (and `frozen_max`) the held
    # blocks run FA3's overlap instead; the online fallback stays chained.
    chained: bool = False
    # Chained only: the CTA clusters of the last, partly filled wave (every cluster does the same work, so the SMs
    # would idle while it runs) split their keys into a few ranges each, run as more, shorter clusters and merged by
    # log-sum-exp after the kernel (`plan_tail`).
    tail_split: bool = False

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64:
            raise ValueError(f"MgpuConfig: block_q and block_kv must be multiples of 64, got {self}")
        if self.stages < 2:
            raise ValueError(f"MgpuConfig: stages must be >= 2, got {self.stages}")
        if self.cluster not in (1, 2, 4):
            raise ValueError(f"MgpuConfig: cluster must be 1, 2 or 4, got {self.cluster}")
        if self.frozen_max and not self.chained:
            raise ValueError(f"MgpuConfig: frozen_max needs the chained schedule (chained=True), got {self}")
        if self.chained and self.overlap and (self.pingpong or not self.frozen_max):
            raise ValueError("MgpuConfig: chained with overlap (the held blocks' FA3 overlap) needs frozen_max and no "
                             f"ping-pong, got {self}")
        if self.tail_split and not self.chained:
            raise ValueError(f"MgpuConfig: tail_split needs the chained schedule (chained=True), got {self}")


# Measured on an H200 (benchmarks/NOTES.md, Attention; benchmarks/results/attention_h200*.json):
# - long key sequences (32,760 and 75,600): 192-key blocks with the ping-pong schedule, 637-653 TFLOP/s
#   (128-key blocks: 603-608; 128 + FA3 overlap without ping-pong: 632-649, within run-to-run noise), and each
#   K/V block multicast to a cluster of 2 CTAs: 10.13 vs 10.34-10.37 ms at Wan-1.3B 480p (NOTES, session 8) —
#   but not with int8 Q Kᵀ (9.56 vs 9.44) or fp8 P V (8.06 vs 8.07), which keep one CTA; and the rows' maxima fixed
#   after the first key block (`frozen_max`): Wan-1.3B 480p 9.68-9.94 vs 9.92-10.14 ms, 720p 50.8 vs 52.6, the
#   forward -1.3 to -2.7% (NOTES, session 18) — where a warpgroup's bound test fails it runs ~7% slower than without;
#   held maxima then make 128-key blocks the faster ones (the per-block maximum and rescale that favoured 192 are
#   gone): 9.45-9.67 vs 9.84-10.08 ms at Wan-1.3B 480p, 49.3 vs 50.4 at 720p, 31.4-31.8 vs 33.0 at Wan-14B 480p, the
#   chained ping-pong 0.3-0.7% of that; forward B=1 424.8 -> 409.3 ms, 14B 2,418 -> 2,348 (NOTES, session 19);
#   and the last wave's clusters split over key ranges (`tail_split`): 9.38-9.42 vs 9.52-9.54 ms at Wan-1.3B 480p, the
#   CFG batch -0.4 to -1.3%, 14B -0.3 to -0.9%, 720p unchanged (NOTES, session 20); and the chained schedule
#   without the ping-pong (the two warpgroups' softmax phases may overlap; with it they alternate, and a softmax
#   phase longer than a warpgroup's matmuls idled the tensor cores): at the 700 W cap on an H100 9.354 vs 9.454 /
#   9.501 ms, tensor share 89% vs 87%, bitwise the same output; forward B=1 409.5 vs 415.8 ms (NOTES, session 21);
#   and in held blocks FA3's overlap (S_{j+1} first, P_j V_j under block j + 1's softmax, P converted after the
#   wait): at the cap 9.19-9.20 vs 9.34 ms on an H200, 9.11-9.15 vs 9.27 on an H100, bitwise the same output;
#   forward B=1 397.8 vs 404.4 (H200) and 402.7 vs 408.5 (H100), 720p 1,694 vs 1,735 (NOTES, session 22) — where held
#   rows' largest P is tiny (q x 8 data, ~2^-46) 4% slower than without (not understood);
# - 512 text keys: 192-key blocks pad the third block (387 TFLOP/s), so 128-key blocks with the overlap
#   schedule and no ping-pong (462; the ping-pong 128 variant: 444).
LONG_KV_CONFIG = MgpuConfig(block_kv=128, cluster=2, frozen_max=True, chained=True, tail_split=True, pingpong=False,
                            overlap=True)
LONG_KV_INT8_CONFIG = MgpuConfig(block_kv=192)
SHORT_KV_CONFIG = MgpuConfig(block_kv=128, overlap=True, pingpong=False)
LONG_KV_FROM = 4096  # keys; measured points: 512 (short wins), 32,760 and 75,600 (long wins)
MAX_BIAS_KEYS = 1024  # a key_bias row lives in shared memory whole (4 KB a compute warpgroup)
BIAS_CHUNK = 256  # elements of one TMA copy (its box limit)


# fp8 P V reads V transposed (keys last), so key blocks are whole 128-byte rows of fp8: 128 keys. Ping-pong with 4
# stages measured 8.20 ms, 3: 8.33, 2: 8.74, without ping-pong 9.30+ (benchmarks/results/attention_fp8_sweep_h200).
FP8_PV_CONFIG = MgpuConfig(block_kv=128, stages=4)

# With `frozen_max` a row's exponentials are taken against an m fixed after the first key block: the softmax is the
# same for any m (O / l cancels it); the online maximum only keeps exp2(logit - m) in range, and so does this m. With
# b the row's Cauchy–Schwarz bound |q_i| · max_j |k_j| on its logits and m0 its first block's maximum (log2 units),
# m = max(m0, b - MARGIN): no logit exceeds m by more than MARGIN (P <= 2^MARGIN), and where b - m0 <= MARGIN + DEPTH
# the row's true maximum is at most DEPTH below m (its largest P >= 2^-DEPTH). A warpgroup holds m when all its rows
# pass that test, and keeps the online maximum otherwise. Held, l <= 2^MARGIN · S and O <= l · max|v| stay finite in
# fp32 for max|v| < 2^(127 - MARGIN - log2 S) (2^43 at 1M keys), and every P within 2^-(126 - DEPTH) of its row's
# largest stays a normal fp32 / bf16 number — the same relative rounding as with the online maximum; the smaller ones
# (flushed or subnormal) weigh < S · 2^-30 of the row together (3e-5 at 32,760 keys, under bf16's 4e-3 rounding of O;
# measured: benchmarks/NOTES.md, session 18).
FROZEN_MAX_MARGIN = 64.0
FROZEN_MAX_DEPTH = 96.0
FROZEN_MAX_SLACK = FROZEN_MAX_MARGIN + FROZEN_MAX_DEPTH  # a tile holds where max(b - m0) <= this

# The last wave (`tail_split`). Every cluster of CTAs does the same work, so B · N · ⌈T / rows⌉ clusters on `slots`
# cluster slots (SMs / cluster) leave the SMs idle through the last, partly filled wave: measured on an H200 at
# Wan-1.3B 480p keys, 22 / 22.9 / 23.09 / 23.27 waves of clusters took 8.90 / 9.33 / 9.58 / 9.55-9.65 ms — whole
# waves at 0.40 ms each, nearly in lock-step (benchmarks/NOTES.md, session 20). `plan_tail` splits the keys of the
# last m clusters into `pieces` ranges, so those run as m · pieces shorter clusters after the whole waves. A CTA's
# fixed cost (its start, Q's load, the pipeline's fill, O's store) is about the time of this many keys (the same
# run: 0.10 ms at 23.3 waves, ~4.3 us a CTA, against 12.2 ns a key):
TAIL_PIECE_FIXED_KEYS = 350
TAIL_MIN_PIECE_BLOCKS = 8  # key blocks of a piece (its fixed cost stays small; >= the K/V ring's stages)
TAIL_MAX_PIECES = 8


def plan_tail(units: int, slots: int, key_blocks: int, block_kv: int) -> tuple[int, int] | None:
    """(m, pieces): split the keys of the last m of `units` equal clusters into `pieces` ranges each — or None where
    no split beats whole waves. Modelled in lock-step waves of `slots` clusters (a unit's time 1): m is what the
    whole waves leave (plus whole waves, in case a deeper split packs better), and each piece costs 1 / pieces plus
    a CTA's fixed cost."""
    fixed = TAIL_PIECE_FIXED_KEYS / (key_blocks * block_kv)
    best_time, best = -(-units // slots), None
    for extra_waves in range(3):
        m = units % slots + extra_waves * slots
        if m == 0 or m > units:
            continue
        for pieces in range(2, min(TAIL_MAX_PIECES, key_blocks // TAIL_MIN_PIECE_BLOCKS) + 1):
            time = (units - m) // slots + -(-m * pieces // slots) * (1 / pieces + fixed)
            if time < best_time - 1e-9:
                best_time, best = time, (m, pieces)
    return best


def gpu_cluster_slots(cluster: int) -> int | None:
    """Clusters of `cluster` CTAs resident at once on the default device (one CTA an SM: the long-key configs' shared
    memory), or None off GPUs."""
    device = jax.devices()[0]
    return device.core_count // cluster if device.platform == "gpu" else None


def default_config(S: int, int8_qk: bool = False) -> MgpuConfig:
    """The measured-fastest variant for S keys (and S = Q Kᵀ on the int8 tensor cores)."""
    if S < LONG_KV_FROM:
        return SHORT_KV_CONFIG
    return LONG_KV_INT8_CONFIG if int8_qk else LONG_KV_CONFIG


def unsupported_reason(q, k, v, int8_qk: bool = False, key_bias=None) -> str | None:
    """Why this kernel can't run these inputs (None if it can). Platform checks live in the dispatcher."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16 inputs of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"supports head_dim 64 and 128, got {q.shape[-1]}"
    if int8_qk and q.shape[-1] != 128:  # an int8 row of the swizzled smem tile is 128 bytes
        return f"with int8 q/k supports head_dim 128, got {q.shape[-1]}"
    if key_bias is not None and (int8_qk or k.shape[1] > MAX_BIAS_KEYS):
        return f"takes a key_bias only in exact mode with at most {MAX_BIAS_KEYS} keys, got {k.shape[1]}"
    return None


def _smem(shape, dtype):
    # 128-byte swizzle with (8, 128 bytes) tiles: the layout wgmma reads without bank conflicts.
    tile = (8, 128 // jnp.dtype(dtype).itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform(tile), plgpu.SwizzleTransform(128)))


def flash_attention_mgpu(q, k, v, kv_len=None, *, key_bias=None, config: MgpuConfig | None = None,
                         int8_qk: bool = False, fp8_pv: bool = False, return_lse: bool = False,
                         k_norms=None, cluster_slots: int | None = None):
    """softmax(q kᵀ / sqrt(H) [+ key_bias]) v on Hopper. q (B, T, N, H), k/v (B, S, N, H), kv_len (B,),
    key_bias (B, S) -> (B, T, N, H).

    `return_lse` (exact mode): also return each row's log-sum-exp of its logits, (B, T, N) fp32 in natural-log
    units — what merging attention over separate key blocks needs (ring attention).

    `config` defaults to `default_config(S)`, the fastest variant measured for that many keys (`FP8_PV_CONFIG`
    with `fp8_pv`).
    `int8_qk` (lossy): S = Q Kᵀ on the int8 tensor cores from per-block quantized q, k (`quantize_qk_int8`).
    `fp8_pv` (lossy, with `int8_qk`): O = P V on the fp8 tensor cores, P and V in e4m3 (`quantize_v_fp8`).
    `key_bias` (exact mode, S <= MAX_BIAS_KEYS): added to every query's logit of that key (folded text padding).
    `k_norms` (B, N) (with `config.frozen_max`): `max_key_norms(k)` where the caller has it (taken from k if None).
    `cluster_slots` (with `config.tail_split`): clusters resident at once, for `plan_tail`; defaults to the default
    device's (`gpu_cluster_slots`).
    """
    if config is None:
        config = FP8_PV_CONFIG if fp8_pv else default_config(k.shape[1], int8_qk)
    if (reason := unsupported_reason(q, k, v, int8_qk, key_bias)) is not None:
        raise ValueError(f"flash_attention_mgpu {reason}")
    T, S = q.shape[1], k.shape[1]
    qk_scales = None
    if fp8_pv and (not int8_qk or config.block_kv % 128 or config.overlap):
        raise ValueError(f"flash_attention_mgpu: fp8_pv needs int8_qk, 128-key blocks, no overlap; got {config}")
    if return_lse and int8_qk:
        raise ValueError("flash_attention_mgpu: return_lse only in exact mode (int8_qk=False, fp8_pv=False)")
    if config.frozen_max and (int8_qk or key_bias is not None):
        raise ValueError(f"flash_attention_mgpu: frozen_max only in exact mode without key_bias; got {config}")
    if config.chained and int8_qk:
        raise ValueError(f"flash_attention_mgpu: chained only in exact mode; got {config}")
    out_dtype = v.dtype
    k_norms = (max_key_norms(k) if k_norms is None else k_norms.astype(jnp.float32)) if config.frozen_max else None
    if int8_qk:
        q, k, *qk_scales = quantize_qk_int8(q, k, config.block_q, config.block_kv, config.cluster)
        if fp8_pv:
            k = keys_in_fp8_pv_order(k)
    block_kv = config.block_kv
    n_kv_max = pl.cdiv(S, block_kv)
    stages = min(config.stages, n_kv_max)
    # TMA boxes need token counts that are multiples of the 8-row smem tile, and the first `stages`
    # key blocks are fetched with static offsets that must lie inside K/V: pad only in those (short or
    # odd-length) cases; Wan's lengths (32,760, 75,600, 512) pass through untouched.
    q = _pad_tokens(q, -(-T // 8) * 8)
    S_min = n_kv_max * block_kv if n_kv_max <= stages else -(-S // 8) * 8
    k, v = _pad_tokens(k, S_min), _pad_tokens(v, S_min)
    if key_bias is not None:  # in log2 units, like the kernel's logits; padded keys are masked anyway
        key_bias = jnp.pad(key_bias.astype(jnp.float32) * LOG2_E, ((0, 0), (0, k.shape[1] - S)))
    v_scale = None
    if fp8_pv:
        v, v_scale = quantize_v_fp8(v)
    if config.tail_split:
        cluster_slots = cluster_slots or gpu_cluster_slots(config.cluster)
    out = _flash_mgpu(q, k, v, kv_len, key_bias, qk_scales, v_scale, k_norms, S=S, stages=stages, config=config,
                      out_dtype=out_dtype, with_lse=return_lse, cluster_slots=cluster_slots)
    if return_lse:
        out, lse = out
        return out[:, :T], lse[:, :, :T].transpose(0, 2, 1)
    return out[:, :T] if out.shape[1] != T else out


def max_key_norms(k):
    """max_j |k_j| per batch row and head, (B, N) fp32: with |q_i| (which the kernel takes from Q in shared memory)
    each query row's Cauchy–Schwarz bound on its logits (`frozen_max`)."""
    return jnp.sqrt(jnp.max(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=-1), axis=1))


def held_max_slack(q, k, config: MgpuConfig | None = None):
    """The kernel's hold test, computed outside it (a diagnostic: does a model's attention take the held path?).
    Per compute warpgroup's tile of `block_q` query rows of one batch row and head, the largest b_i - m0_i over its
    rows (log2 units; b_i = |q_i| · max_j |k_j|, m0_i = the maximum of row i's logits over the first block_kv keys):
    (B, N, tiles) fp32. The kernel holds a tile's maxima where this is <= FROZEN_MAX_SLACK."""
    config = config or LONG_KV_CONFIG
    f32 = jnp.float32
    B, T, N, H = q.shape
    c = LOG2_E / math.sqrt(H)
    q32, k32 = q.astype(f32), k.astype(f32)
    bound = jnp.linalg.norm(q32, axis=-1) * max_key_norms(k)[:, None, :] * c  # (B, T, N)
    m0 = jnp.einsum("btnh,bsnh->btns", q32, k32[:, : config.block_kv]).max(axis=-1) * c
    slack = _pad_tokens((bound - m0)[..., None], pl.cdiv(T, config.block_q) * config.block_q)[..., 0]
    return slack.reshape(B, -1, config.block_q, N).max(axis=2).transpose(0, 2, 1)  # padded rows: slack 0


K_MEAN_SAMPLES = 4096


def quantize_qk_int8(q, k, block_q: int, block_kv: int, cluster: int = 1):
    """q, k -> int8: q with one fp32 scale per token and head, k with one per block of `block_kv` keys and head.

    SageAttention's recipe, q's scales finer: k is first smoothed — its mean over the tokens (sampled) removed,
    which shifts every score of a query row by the same amount, so the softmax is unchanged — then q and k are
    rounded to int8 with their row's / block's absmax / 127 as the scale (a per-row q scale costs the kernel
    nothing: its one FMA a logit takes a row operand either way; a per-key scale would cost a multiply a logit).
    Returns (q8, k8, q_scale (B, N, T'), k_scale (B, nk, N)); T' pads T with ones to whole clusters (of
    `cluster` CTAs of 2 · block_q rows), so every compute warpgroup's TMA copy of its scales stays in bounds."""
    f32 = jnp.float32
    B, T, N, _ = q.shape
    # q and k have several readers here (absmax, rounding; k's mean): the barrier keeps them as the bf16 arrays
    # their producer wrote. Without it XLA recomputes the q/k norm + RoPE inside each reader: for k it wrote fp32
    # copies (session 4), for q its absmax reduction ran at ~0.5 TB/s (+3 ms a forward; benchmarks/NOTES.md).
    q, k = jax.lax.optimization_barrier((q, k))
    q_scale = jnp.maximum(jnp.abs(q.astype(f32)).max(axis=-1), 1e-30) / 127.0  # (B, T, N)
    q8 = jnp.clip(jnp.round(q.astype(f32) / q_scale[..., None]), -127, 127).astype(jnp.int8)
    rows = 2 * block_q * cluster  # a cluster's query rows
    T_pad = rows * pl.cdiv(T, rows)
    q_scale = jnp.pad(q_scale.transpose(0, 2, 1), ((0, 0), (0, 0), (0, T_pad - T)), constant_values=1.0)
    # Any per-channel vector subtracted from k leaves the softmax unchanged; the token mean makes k's int8 rounding
    # finest. Long sequences estimate it from >= K_MEAN_SAMPLES evenly strided tokens (a common offset exactly):
    # the full mean cost 3.9 ms a 1.3B 480p forward (a GEMV over a padded fp32 copy of k, benchmarks/NOTES.md);
    # short ones take every token (32 samples cost the demo model ~3 dB).
    stride = max(1, k.shape[1] // K_MEAN_SAMPLES)
    k = k.astype(f32) - k[:, ::stride].astype(f32).mean(axis=1, keepdims=True)
    S = k.shape[1]
    amax = jnp.abs(k).max(axis=-1)  # (B, S, N): a contiguous row reduction, then tiny ones
    # Whole blocks and the ragged tail apart: XLA sinks a pad of amax into the reduction above, materialising a
    # padded fp32 copy of k (measured: benchmarks/NOTES.md).
    whole = S // block_kv
    parts = [amax[:, : whole * block_kv].reshape(B, whole, block_kv, N).max(axis=2)]
    if S % block_kv:
        parts.append(amax[:, whole * block_kv :].max(axis=1, keepdims=True))
    k_scale = jnp.maximum(jnp.concatenate(parts, axis=1), 1e-30) / 127.0  # (B, nk, N)
    k8 = jnp.clip(jnp.round(k / _per_token(k_scale, block_kv, S)), -127, 127).astype(jnp.int8)
    return q8, k8, q_scale, k_scale


# wgmma reads an 8-bit A operand from registers as 4 consecutive columns per thread; the fp32 accumulator layout
# gives each thread columns (2t, 2t+1) of every 8. Packing a thread's two accumulator pairs of one 16-column
# group into one register (`_p_to_fp8`) so presents P's columns to the tensor core in this order: operand
# position i holds accumulator column FP8_PV_KEY_ORDER[i] of each 16. K's rows are stored in the inverse order
# (`keys_in_fp8_pv_order`; column c then holds key `fp8_pv_key_of_column(c)`): position i holds key i, and V is
# read in natural order. (V in this order instead was a transpose XLA ran at ~1/8 of the memory
# rate, 0.38 ms a layer on an H100; K's reordering moves whole token rows, inside its int8 rounding pass.)
FP8_PV_KEY_ORDER = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)
P_FP8_LOG2_SCALE = 8.0  # P is scaled by 2⁸ into e4m3's normal range (the row sum l carries it, O / l cancels it)


def keys_in_fp8_pv_order(k):
    """k (B, S, N, H) -> (B, S16, N, H), S16 = S padded to 16 with zero keys: row 16g + c holds key
    16g + σ(c), σ the inverse of FP8_PV_KEY_ORDER — c = 8·half + 2·pair + e holds key 4·pair + 2·half + e."""
    B, S, N, H = k.shape
    k = _pad_tokens(k, -(-S // 16) * 16)
    return k.reshape(B, -1, 4, 2, 2, N, H).transpose(0, 1, 3, 2, 4, 5, 6).reshape(k.shape)


def fp8_pv_key_of_column(c):
    """The key index held by S's column c (an int array) when K is in `keys_in_fp8_pv_order`."""
    half, pair, e = (c >> 3) & 1, (c >> 1) & 3, c & 1
    return (c - (c & 15)) + 4 * pair + 2 * half + e


def quantize_v_fp8(v):
    """v (B, S, N, H) -> (v8 (B, N, H, S') float8_e4m3fn, scale (B, N) fp32): one absmax / 448 scale per head,
    keys last (fp8 wgmma needs its B operand K-major); S' = S padded to 128 (the TMA tile of a 128-byte swizzled
    row). e4m3 is a float format, so a finer (per-channel) scale or V smoothed (its token mean removed) changes no
    rounding error but the subnormals': the demo model's frames were no closer with them (benchmarks/NOTES.md).
    The model's v carries no bias (folded past the attention)."""
    v8, scale = _fp8_per_head(_pad_tokens(v, -(-v.shape[1] // 128) * 128))
    return v8.transpose(0, 2, 3, 1), scale


def _fp8_per_head(v):
    """v (B, S, N, H) -> (e4m3 values, fp32 scale (B, N) = absmax / 448 per head)."""
    v32 = v.astype(jnp.float32)
    scale = jnp.maximum(jnp.abs(v32).max(axis=(1, 3)), 1e-30) / 448.0
    return jnp.clip(v32 / scale[:, None, :, None], -448.0, 448.0).astype(jnp.float8_e4m3fn), scale


def dequantized_v_fp8(v):
    """The fp32 v the fp8 P V mode multiplies (for checks): e4m3 values x their head's scale."""
    v8, scale = _fp8_per_head(v)
    return v8.astype(jnp.float32) * scale[:, None, :, None]


def _p_to_fp8(p):
    """P (64, n) fp32 in the wgmma accumulator layout -> float8_e4m3fn in wgmma's 8-bit A-operand layout, without
    moving data between threads: columns come out in `FP8_PV_KEY_ORDER` within every 16 (K's rows are stored to
    undo it, `keys_in_fp8_pv_order`)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental import mosaic  # noqa: F401  (registers the Mosaic GPU dialects)
    from jax.experimental.mosaic import gpu as mgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct(p.shape, jnp.float8_e4m3fn, layout=plgpu.Layout.WGMMA_8BIT))
    def pack(_ctx, p):
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        f8x4 = ir.VectorType.get((4,), ir.Float8E4M3FNType.get())
        at = lambda vec, i: vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))

        def two_fp8(pair):  # PTX packs its first operand into the upper byte
            return llvm.inline_asm(i16, [at(pair, 1), at(pair, 0)], "cvt.rn.satfinite.e4m3x2.f32 $0, $1, $2;",
                                   "=h,f,f")

        regs = p.registers
        out = np.empty((regs.shape[0], regs.shape[1] // 2, *regs.shape[2:]), dtype=object)
        for idx in np.ndindex(out.shape):
            lo_src = regs[(idx[0], 2 * idx[1], *idx[2:])]
            hi_src = regs[(idx[0], 2 * idx[1] + 1, *idx[2:])]
            lo, hi = (arith.extui(i32, two_fp8(r)) for r in (lo_src, hi_src))
            word = arith.ori(lo, arith.shli(hi, arith.constant(i32, 16)))
            out[idx] = vector.bitcast(f8x4, vector.broadcast(ir.VectorType.get((1,), i32), word))
        return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT_8BIT, _is_signed=None)

    return pack(p)


def _per_token(scale, block: int, L: int):
    """Block scales (B, n_blocks, N) -> one per token (B, L, N, 1)."""
    return jnp.repeat(scale, block, axis=1)[:, :L, :, None]


def dequantized_qk_int8(q, k, block_q: int | None = None, block_kv: int | None = None):
    """The fp32 q, k whose exact attention the int8 kernel computes (for checks): int8 values x their scale.
    Block sizes default to the kernel's for this many keys (`default_config`)."""
    config = default_config(k.shape[1], int8_qk=True)
    block_q, block_kv = block_q or config.block_q, block_kv or config.block_kv
    q8, k8, q_scale, k_scale = quantize_qk_int8(q, k, block_q, block_kv)
    return (q8.astype(jnp.float32) * q_scale[:, :, : q.shape[1]].transpose(0, 2, 1)[..., None],
            k8.astype(jnp.float32) * _per_token(k_scale, block_kv, k.shape[1]))


def _pad_tokens(x, length: int):
    if x.shape[1] >= length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _flash_mgpu(q, k, v, kv_len, key_bias, qk_scales, v_scale, k_norms, *, S: int, stages: int, config: MgpuConfig,
                out_dtype, with_lse: bool = False, cluster_slots: int | None = None):
    """The kernel proper; keys at or past S (or kv_len) are masked whatever k's padded length.
    `with_lse`: returns (O, lse (B, N, T) fp32, natural log) instead of O.
    `key_bias` (B, S') fp32 in log2 units (S' = k's padded length), added to each key's logits, or None.
    `qk_scales` = (q_scale, k_scale) per block when q, k are int8 (`quantize_qk_int8`), else None;
    `v_scale` = V's per-head scale when v is fp8 (`quantize_v_fp8`), else None;
    `k_norms` = the heads' largest key norms with `config.frozen_max` (`max_key_norms`), else None.
    `cluster_slots` (with `config.tail_split`, no kv_len): clusters resident at once — the last m query clusters then
    run as `pieces` clusters each over consecutive ranges of the keys (`plan_tail`), merged afterwards (`_merge_tail`).
    """
    B, T, N, H = q.shape
    fp8_pv = v_scale is not None  # v is then (B, N, H, S') float8 (`quantize_v_fp8`)
    dtype = out_dtype  # of O, and of P and V unless they are fp8; q/k may be int8 (Q Kᵀ on int8 tensor cores)
    int8_qk = qk_scales is not None
    s_dtype = jnp.int32 if int8_qk else jnp.float32
    block_q, block_kv = config.block_q, config.block_kv
    n_kv_max = pl.cdiv(S, block_kv)
    scale = LOG2_E / math.sqrt(H)
    ragged = kv_len is not None or S % block_kv != 0
    clustered = config.cluster > 1
    multicast = "cluster" if clustered else None
    # A slot is free once the consumers of every CTA it was multicast to are done with it.
    free_barrier = functools.partial(plgpu.ClusterBarrier, collective_axes=("cluster",)) if clustered else plgpu.Barrier
    with_kv_len = kv_len is not None
    with_bias = key_bias is not None
    frozen_max = k_norms is not None
    S_bias = key_bias.shape[1] if with_bias else 0
    bias_chunks = pl.cdiv(S_bias, BIAS_CHUNK)
    rows_per_unit = 2 * block_q * config.cluster  # a cluster's query rows
    grid_q = pl.cdiv(T, rows_per_unit)
    units = B * N * grid_q  # (batch, head, query cluster), query clusters fastest
    tail = None  # (a traced kv_len could leave a piece without keys)
    if config.tail_split and cluster_slots and not with_kv_len:
        tail = plan_tail(units, cluster_slots, n_kv_max, block_kv)
    m_tail, pieces = tail or (0, 1)
    whole = units - m_tail  # units over all keys; then m_tail units as `pieces` clusters each
    assert n_kv_max // pieces >= stages, (tail, stages)  # a piece fills the K/V ring (TAIL_MIN_PIECE_BLOCKS)

    def kv_bounds(kv_len_ref, b):
        """(kv_end, number of key blocks, number of unmasked key blocks) for batch row b."""
        if not with_kv_len:
            return S, n_kv_max, S // block_kv
        kv_end = jnp.clip(kv_len_ref[b], 1, S)
        return kv_end, (kv_end + block_kv - 1) // block_kv, kv_end // block_kv

    def kernel(q_ref, k_ref, v_ref, kv_len_ref, bias_ref, scale_refs, v_scale_ref, k_norms_ref, o_ref, lse_ref,
               part_refs, scoped):
        unit = lax.axis_index("unit")
        if tail:  # tail piece i (the i-th cluster past the whole units): unit whole + i // pieces, key range i % pieces
            in_tail = unit >= whole
            piece = jnp.maximum(unit - whole, 0)
            unit = jnp.where(in_tail, whole + lax.div(piece, pieces), unit)
        b, h, qi = lax.div(unit, N * grid_q), lax.rem(lax.div(unit, grid_q), N), lax.rem(unit, grid_q)
        wg = lax.axis_index("wg")
        if int8_qk:  # logit scales of key block j: the rows' q scales (x log2(e)/sqrt(H)) x block j's k scale
            logit_scale = lambda j, q_rows: q_rows * scale_refs[1][b, j, h]
        else:
            logit_scale = lambda j, q_rows: scale
        (q_smem2, k_smem, v_smem, *extra_smem), (k_ready, v_ready, q_ready, *extra_ready), kv_free, sched = scoped
        k_free, v_free = kv_free
        int8_smem, qs_ready = (extra_smem, extra_ready) if int8_qk else ((), ())
        bias_smem, bias_ready = (extra_smem[0], extra_ready[0]) if with_bias else (None, None)
        kv_end, n_kv, n_full = kv_bounds(kv_len_ref, b)
        kv_lo = 0  # this CTA's key blocks are kv_lo .. kv_lo + n_kv - 1, the first n_full of them unmasked
        if tail:
            key_range = lax.rem(piece, pieces)
            kv_lo = jnp.where(in_tail, lax.div(key_range * n_kv_max, pieces), 0)
            n_kv = jnp.where(in_tail, lax.div((key_range + 1) * n_kv_max, pieces), n_kv_max) - kv_lo
            n_full = jnp.minimum(jnp.maximum(n_full - kv_lo, 0), n_kv)

        def sched_sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        def logits(q_smem, slot):
            """S = Q Kᵀ of the key block in `slot` (awaited with every wgmma this warpgroup has in flight); with the
            ping-pong, the tensor cores go to the other warpgroup before the wait."""

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
                if config.pingpong:
                    sched_sync()
                return s_ref[...]

            return pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), s_dtype))

        def softmax(s, m, l, j, masked, q_rows, frozen=False, hold_bound=None, p_dtype=None):
            """Online-softmax update for key block j: returns (P in V's dtype, m, l, alpha); `frozen`: m is held
            (alpha None, nothing to rescale). `hold_bound` (the rows' logit bounds; the first block with frozen_max):
            also decides whether the warpgroup holds its rows' maxima from here on, and if so takes P against the
            held m — returns (P, m, l, alpha, held)."""
            scale = logit_scale(j, q_rows)
            if int8_qk:  # (int32 -> fp32 through a float-bits trick instead of I2F measured slower: NOTES)
                s = s.astype(jnp.float32)
            if with_bias:  # logits (log2 units) = s · scale + bias: the FMA takes the bias, the exp2 a subtract
                bias = plgpu.load(bias_smem.at[wg, pl.ds(j * block_kv, block_kv)], layout=_COL)
                s = s * scale + lax.broadcast_in_dim(bias, s.shape, [1])
                scale = 1.0
            if masked:
                cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                keys = fp8_pv_key_of_column(cols) if fp8_pv else cols
                s = jnp.where(keys < kv_end - j * block_kv, s, -jnp.inf)
            if frozen:  # (P in `p_dtype` if given)
                p = jnp.exp2(s * scale - lax.broadcast_in_dim(m, s.shape, [0]))
                return p.astype(p_dtype or dtype), m, l + p.sum(axis=1), None
            m_new = jnp.maximum(m, s.max(axis=1) * scale)
            held = None
            if hold_bound is not None:  # one value for the warpgroup: see chained()
                held = jnp.max(hold_bound - m_new) <= FROZEN_MAX_SLACK
                m_new = jnp.maximum(m_new, hold_bound - jnp.where(held, FROZEN_MAX_MARGIN, jnp.inf))
            alpha = jnp.exp2(m - m_new)
            offset = m_new - P_FP8_LOG2_SCALE if fp8_pv else m_new
            scales = lax.broadcast_in_dim(scale, s.shape, [0]) if int8_qk else scale  # one a row, or one for all
            p = jnp.exp2((s if with_bias else s * scales) - lax.broadcast_in_dim(offset, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            p = _p_to_fp8(p) if fp8_pv else p.astype(dtype)
            return (p, m_new, l, alpha) if held is None else (p, m_new, l, alpha, held)

        def two_phase(q_smem, q_rows, carry0):
            """Schedule without intra-warpgroup overlap: S = QKᵀ; softmax; O += PV, per block."""

            def body(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j, stages)
                s = logits(q_smem, slot)
                plgpu.barrier_arrive(k_free.at[slot])
                p, m, l, alpha = softmax(s, m, l, j, masked, q_rows)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                # Keeps the scheduler from sinking the softmax past the barrier (as in jax's example).
                acc, m, l, p = lax.optimization_barrier((acc, m, l, p))
                if config.pingpong:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_ready.at[slot])
                if config.pingpong:
                    plgpu.barrier_wait(sched)

                def pv(o_ref):
                    plgpu.wgmma(o_ref, p, v_smem.at[slot].T if fp8_pv else v_smem.at[slot])

                    @pl.when(j + 1 < n_kv)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(j + 1, stages)])

                # fp8 P·V accumulates in the one fp32 O too: summing each block from zero in a second accumulator
                # (SageAttention2's two-level accumulation) changed no error and cost 9% (benchmarks/NOTES.md).
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m, l

            carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry0)
            if ragged:
                carry = lax.fori_loop(n_full, n_kv, functools.partial(body, masked=True), carry)
            return carry

        def chained(q_smem, q_rows, row_bound, carry0):
            """A warpgroup's matmuls back to back: per key block j, O += P_j V_j and S_{j+1} = Q K_{j+1}ᵀ are issued
            together and awaited together, then the softmax of block j+1 (with the ping-pong the warpgroups take turns,
            the other's matmuls running meanwhile; without it each runs on its own). O stays in its wgmma accumulator
            throughout."""
            _, m, l = carry0
            s = logits(q_smem, 0)
            plgpu.barrier_arrive(k_free.at[0])
            # With frozen_max block 0 also decides whether this warpgroup holds its rows' maxima from here on — one
            # value for all its threads (its wgmmas must take one branch), reduced across its warps. That reduction's
            # shared-memory scratch is the kernel's one: the ping-pong's softmax phases never overlap; without the
            # ping-pong, warpgroup 1's test waits for warpgroup 0's.
            serialize_hold_test = frozen_max and not config.pingpong
            if serialize_hold_test:
                pl.when(wg == 1)(sched_sync)
            p, m, l, _, *held = softmax(s, m, l, kv_lo, ragged, q_rows,
                                        hold_bound=row_bound if frozen_max else None)
            p, m, l = lax.optimization_barrier((p, m, l))  # m depends on the hold test: its reduction stays here
            if serialize_hold_test:
                pl.when(wg == 0)(sched_sync)

            def matmul_phase_start(slot):
                if config.pingpong:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_ready.at[slot])
                if config.pingpong:
                    plgpu.barrier_wait(sched)

            def run(frozen, carry, o_ref):
                def held_overlap_body(j, carry, masked):  # S_{j+1}, then P_j V_j running under block j + 1's softmax
                    p, m, l = carry
                    slot, nxt = lax.rem(j, stages), lax.rem(j + 1, stages)
                    plgpu.barrier_wait(k_ready.at[nxt])

                    def qk_then_pv(s_ref):
                        plgpu.wgmma(s_ref, q_smem, k_smem.at[nxt].T)
                        plgpu.barrier_wait(v_ready.at[slot])
                        plgpu.wgmma(o_ref, p, v_smem.at[slot])
                        return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S_{j+1} done, P_j V_j may still run

                    s = pl.run_scoped(qk_then_pv, plgpu.ACC((block_q, block_kv), s_dtype))
                    plgpu.barrier_arrive(k_free.at[nxt])
                    p, m, l, _ = softmax(s, m, l, kv_lo + j + 1, masked, q_rows, frozen=True, p_dtype=jnp.float32)
                    p, l = lax.optimization_barrier((p, l))  # computed under P_j V_j
                    plgpu.wgmma_wait(0)  # P_j V_j done: V's slot is free
                    plgpu.barrier_arrive(v_free.at[slot])
                    # P_{j+1}'s wgmma registers are written only now: ptxas serializes every wgmma where they are
                    # written while a wgmma is in flight (as FlashAttention-3 converts P after its wait)
                    p = lax.optimization_barrier(p).astype(dtype)
                    return p, m, l

                def body(j, carry, masked):  # P_j V_j, then block j + 1's logits and softmax
                    if frozen and config.overlap:
                        return held_overlap_body(j, carry, masked)
                    p, m, l = carry
                    slot, nxt = lax.rem(j, stages), lax.rem(j + 1, stages)
                    matmul_phase_start(slot)
                    plgpu.wgmma(o_ref, p, v_smem.at[slot])
                    plgpu.barrier_wait(k_ready.at[nxt])
                    s = logits(q_smem, nxt)  # P_j V_j is done too
                    plgpu.barrier_arrive(v_free.at[slot])
                    plgpu.barrier_arrive(k_free.at[nxt])
                    p, m, l, alpha = softmax(s, m, l, kv_lo + j + 1, masked, q_rows, frozen)
                    if not frozen:
                        o_ref[...] = o_ref[...] * lax.broadcast_in_dim(alpha, o_ref.shape, [0])
                    # Keeps the scheduler from sinking the softmax past the barrier (as in jax's example).
                    return lax.optimization_barrier((p, m, l))

                # body j computes block j + 1's softmax: blocks 1 .. n_full - 1 unmasked, the rest masked
                first_masked = max(n_full, 1) if isinstance(n_full, int) else jnp.maximum(n_full, 1)
                carry = lax.fori_loop(0, first_masked - 1, functools.partial(body, masked=False), carry)
                if ragged:
                    carry = lax.fori_loop(first_masked - 1, n_kv - 1, functools.partial(body, masked=True), carry)
                p, m, l = carry
                last = lax.rem(n_kv - 1, stages)
                matmul_phase_start(last)
                plgpu.wgmma(o_ref, p, v_smem.at[last])
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(v_free.at[last])
                return m, l

            def rest(frozen, carry):
                acc, (m, l) = _run_scoped_acc(functools.partial(run, frozen, carry), (block_q, H))
                return acc, m, l

            if not frozen_max:
                return rest(False, (p, m, l))
            return lax.cond(held[0], functools.partial(rest, True), functools.partial(rest, False), (p, m, l))

        def overlapped(q_smem, q_rows, carry0):
            """FA3 schedule: issue S_j = Q K_jᵀ and O += P_{j-1} V_{j-1}, softmax S_j while PV runs."""
            _, m, l = carry0

            def first_qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[0].T)
                return s_ref[...]

            s = pl.run_scoped(first_qk, plgpu.ACC((block_q, block_kv), s_dtype))
            plgpu.barrier_arrive(k_free.at[0])
            p, m, l, _ = softmax(s, m, l, 0, ragged, q_rows)

            def loop(o_ref):
                def body(j, carry, masked):
                    p_prev, m, l = carry
                    slot, prev = lax.rem(j, stages), lax.rem(j - 1, stages)
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[prev])

                    def step(s_ref):
                        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
                        plgpu.wgmma(o_ref, p_prev, v_smem.at[prev])
                        if config.pingpong:
                            sched_sync()
                        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S_j done, PV may still run
                        plgpu.barrier_arrive(k_free.at[slot])
                        p, m_new, l_new, alpha = softmax(s, m, l, j, masked, q_rows)
                        o = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
                        plgpu.barrier_arrive(v_free.at[prev])
                        o_ref[...] = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                        if config.pingpong:
                            sched_sync()
                        return p, m_new, l_new

                    return pl.run_scoped(step, plgpu.ACC((block_q, block_kv), s_dtype))

                first_masked = max(n_full, 1) if isinstance(n_full, int) else jnp.maximum(n_full, 1)
                carry = lax.fori_loop(1, first_masked, functools.partial(body, masked=False), (p, m, l))
                if ragged:
                    carry = lax.fori_loop(first_masked, n_kv, functools.partial(body, masked=True), carry)
                p_last, m_last, l_last = carry
                last = lax.rem(n_kv - 1, stages)
                plgpu.barrier_wait(v_ready.at[last])
                plgpu.wgmma(o_ref, p_last, v_smem.at[last])
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(v_free.at[last])
                return m_last, l_last

            acc, (m, l) = _run_scoped_acc(loop, (block_q, H))
            return acc, m, l

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(240 if config.overlap or config.chained else 232, action="increase")
            q_smem = q_smem2.at[wg]
            cta = lax.axis_index("cluster") if clustered else 0
            q_base = (2 * (config.cluster * qi + cta) + wg) * block_q
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, block_q), h], q_smem, q_ready.at[wg])
            q_rows = None
            if int8_qk:  # this warpgroup's rows' q scales, one per row in the softmax's row layout
                qs_smem = int8_smem[1].at[wg]
                plgpu.copy_gmem_to_smem(scale_refs[0].at[b, h, pl.ds(q_base, block_q)], qs_smem, qs_ready[0].at[wg])
                plgpu.barrier_wait(qs_ready[0].at[wg])
                q_rows = plgpu.load(qs_smem, layout=_ROW) * scale
            if with_bias:  # the batch row's whole key_bias, once (TMA boxes span <= 256 elements: in chunks)
                for c in range(bias_chunks):
                    keys = pl.ds(c * BIAS_CHUNK, min(BIAS_CHUNK, S_bias - c * BIAS_CHUNK))
                    plgpu.copy_gmem_to_smem(bias_ref.at[b, keys], bias_smem.at[wg, keys], bias_ready.at[wg, c])
                for c in range(bias_chunks):
                    plgpu.barrier_wait(bias_ready.at[wg, c])
            plgpu.barrier_wait(q_ready.at[wg])
            row_bound = None
            if frozen_max:  # the rows' logit bounds |q_i| · max_j |k_j| (log2 units), in the softmax's row layout
                q_tile = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                row_bound = jnp.sqrt((q_tile * q_tile).sum(axis=1)) * (k_norms_ref[b, h] * scale)
            m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), _ROW)
            l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), _ROW)
            acc = plgpu.layout_cast(jnp.zeros((block_q, H), jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_ready.at[0])  # n_kv >= 1 always (kv_end is clipped to >= 1)
            if config.pingpong:
                pl.when(wg == 1)(sched_sync)  # offsets warpgroup 1 by one phase
            schedule = (functools.partial(chained, q_smem, q_rows, row_bound) if config.chained else
                        functools.partial(overlapped, q_smem, q_rows) if config.overlap else
                        functools.partial(two_phase, q_smem, q_rows))
            acc, m, l = schedule((acc, m, l))
            if config.pingpong:
                pl.when(wg == 0)(sched_sync)  # balances the barrier's arrivals
            inv_l = 1.0 / l
            if fp8_pv:
                inv_l = inv_l * v_scale_ref[b, h]
            acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])

            def store():
                # Q is no longer needed: its buffer stages O for the TMA store (a buffer of its own if Q is int8)
                o_smem = int8_smem[0].at[wg] if int8_qk else q_smem
                o_smem[...] = acc.astype(dtype)
                if with_lse:  # m is in the kernel's log2 units; l sums exp2(logit - m). Stored from registers:
                    # a staging buffer would not fit beside the long-key configs' K/V ring.
                    lse_ref.at[b, h, pl.ds(q_base, block_q)][...] = m * LN_2 + jnp.log(l)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(q_base, block_q), h])
                plgpu.wait_smem_to_gmem(0)

            def store_piece():  # fp32 O and its log-sum-exp over this piece's keys, from registers (a few units)
                o_part_ref, lse_part_ref = part_refs
                rows = pl.ds((2 * cta + wg) * block_q, block_q)
                o_part_ref.at[piece, rows][...] = acc
                lse_part_ref.at[piece, rows][...] = m * LN_2 + jnp.log(l)

            if tail:
                pl.when(in_tail)(store_piece)
                pl.when(jnp.logical_not(in_tail))(store)
            else:
                store()

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(24 if config.overlap or config.chained else 40, action="decrease")

            def v_block(j):  # (block_kv, H), or (H, block_kv) of the transposed fp8 V
                keys = pl.ds(j * block_kv, block_kv)
                return v_ref.at[b, h, :, keys] if fp8_pv else v_ref.at[b, keys, h]

            def fetch(j, slot):  # (multicast: each CTA of a cluster loads its share of the block for all of them)
                rows = (b, pl.ds(j * block_kv, block_kv), h)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot], collective_axes=multicast)
                plgpu.copy_gmem_to_smem(v_block(j), v_smem.at[slot], v_ready.at[slot], collective_axes=multicast)

            for i in range(stages):
                if not with_kv_len:  # the first `stages` blocks always exist (stages <= n_kv; a tail piece's too)
                    fetch(kv_lo + i, i)
                else:
                    pl.when(i < n_kv)(functools.partial(fetch, i, i))

            @pl.loop(0, n_kv - stages)
            def _(j):
                slot = lax.rem(j, stages)
                rows = (b, pl.ds((kv_lo + j + stages) * block_kv, block_kv), h)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot], collective_axes=multicast)
                plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_block(kv_lo + j + stages), v_smem.at[slot], v_ready.at[slot],
                                        collective_axes=multicast)

            if clustered:  # the peer's consumers still arrive here (remotely) until its last blocks: wait them out
                for i in range(stages):
                    def last_use(i=i):
                        plgpu.barrier_wait(k_free.at[i])
                        plgpu.barrier_wait(v_free.at[i])

                    if not with_kv_len:  # every slot was used
                        last_use()
                    else:
                        pl.when(i < n_kv)(last_use)

    def entry(q_ref, k_ref, v_ref, *rest):
        kv_len_ref, rest = (rest[0], rest[1:]) if with_kv_len else (None, rest)
        bias_ref, rest = (rest[0], rest[1:]) if with_bias else (None, rest)
        scale_refs, rest = (rest[:2], rest[2:]) if int8_qk else (None, rest)
        v_scale_ref, rest = (rest[0], rest[1:]) if fp8_pv else (None, rest)
        k_norms_ref, rest = (rest[0], rest[1:]) if frozen_max else (None, rest)
        o_ref, *rest = rest
        lse_ref, part_refs = (rest[0], rest[1:]) if with_lse else (None, rest)
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, kv_len_ref, bias_ref, scale_refs, v_scale_ref, k_norms_ref,
                                   o_ref, lse_ref, part_refs, scoped),
            (_smem((2, block_q, H), q.dtype), _smem((stages, block_kv, H), k.dtype),
             _smem((stages, H, block_kv) if fp8_pv else (stages, block_kv, H), v.dtype),
             *([_smem((2, block_q, H), dtype), plgpu.SMEM((2, block_q), jnp.float32)] if int8_qk else []),
             *([plgpu.SMEM((2, S_bias), jnp.float32)] if with_bias else [])),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=2), *([plgpu.Barrier(num_barriers=2)] if int8_qk else []),
             *([plgpu.Barrier(num_barriers=(2, bias_chunks))] if with_bias else [])),
            (free_barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    args = (q, k, v) if kv_len is None else (q, k, v, kv_len.astype(jnp.int32))
    args += (key_bias,) if with_bias else ()
    args += (tuple(qk_scales) if int8_qk else ()) + ((v_scale,) if fp8_pv else ()) + ((k_norms,) if frozen_max else ())
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
    if with_lse:  # rows of whole CTAs (plain stores are not clipped at T like TMA's), tokens last
        out_type.append(jax.ShapeDtypeStruct((B, N, grid_q * rows_per_unit), jnp.float32))
    if tail:  # the tail pieces' O and log-sum-exp
        out_type += [jax.ShapeDtypeStruct((m_tail * pieces, rows_per_unit, H), jnp.float32),
                     jax.ShapeDtypeStruct((m_tail * pieces, rows_per_unit), jnp.float32)]
    out = plgpu.kernel(
        entry,
        out_type=tuple(out_type) if len(out_type) > 1 else out_type[0],
        # One grid axis, CUDA's x, in dispatch order: query clusters fastest, so the CTAs resident at once share one
        # head's K/V in L2 (heads fastest cost 11% at 40 heads); the tail pieces last.
        grid=(whole + m_tail * pieces,),
        grid_names=("unit",),
        **(dict(cluster=(config.cluster,), cluster_names=("cluster",)) if clustered else {}),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
    if not tail:
        return out
    o, *lse, o_part, lse_part = out
    out = _merge_tail(o, lse[0] if with_lse else None, o_part, lse_part, whole=whole, heads=N, grid_q=grid_q)
    return out if with_lse else out[0]


def _merge_tail(o, lse, o_part, lse_part, *, whole: int, heads: int, grid_q: int):
    """Writes the tail units' pieces, merged by their log-sum-exp, into the kernel's O and log-sum-exp: -> (O, lse).
    o (B, T', N, H); lse (B, N, grid_q · rows) or None; o_part (m · pieces, rows, H) fp32, lse_part (m · pieces,
    rows), pieces of one unit consecutive."""
    rows = lse_part.shape[1]
    m = o.shape[0] * heads * grid_q - whole
    lse_p = lse_part.reshape(m, -1, rows)
    lse_m = jax.nn.logsumexp(lse_p, axis=1)  # (m, rows)
    weights = jnp.exp(lse_p - lse_m[:, None])
    o_m = (weights[..., None] * o_part.reshape(m, -1, rows, o_part.shape[-1])).sum(axis=1)
    unit = np.arange(whole, whole + m)
    b, h = (unit // (heads * grid_q))[:, None], (unit // grid_q % heads)[:, None]
    token = (unit % grid_q)[:, None] * rows + np.arange(rows)  # (m, rows); past T' (padding rows): dropped
    o = o.at[b, token, h].set(o_m.astype(o.dtype), mode="drop", unique_indices=True)
    return o, None if lse is None else lse.at[b, h, token].set(lse_m, unique_indices=True)


def _run_scoped_acc(fn, shape):
    """Runs fn(acc_ref) with a zeroed fp32 wgmma accumulator; returns (final accumulator, fn's result)."""

    def wrapped(acc_ref):
        out = fn(acc_ref)
        return acc_ref[...], out

    return pl.run_scoped(wrapped, plgpu.ACC(shape, jnp.float32))
