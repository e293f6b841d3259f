"""q/k RMSNorm (+ RoPE) of a Wan attention layer in one pass over HBM (Pallas Mosaic GPU, Hopper).

Why: the RMS statistic spans the whole model dim (all heads), so XLA runs the prologue of q and k as two kernels:
a reduction that reads the whole projection output (32,760 × 1,536 bf16 = 100 MB at Wan-1.3B 480p, twice the
50 MB L2) for each token's sum of squares, then an element-wise pass that reads it again and writes the result.
This kernel reads it from HBM once and writes it once.

How: a CTA owns 64 tokens (one warpgroup's rows in the wgmma register layout, where a row's sum is a few
shuffles) and splits their heads between `warpgroups` warpgroups. The tokens' columns come through shared memory
in chunks of half a head (64 × K/2 bf16, one chunk per RoPE half), each in its own slot of a TMA ring:
  1. each warpgroup streams its chunks, summing (y + bias)² per row in fp32; the warpgroups add their partial
     sums through shared memory;
  2. it walks its heads again, last first: (y + bias) · weight, rotated by the token's angles (halves
     convention: pairs (i, K/2 + i) of a head), times the row's rsqrt(mean + eps) — folded into cos and sin —
     is rounded to bf16 once, written over the chunk in shared memory and stored by TMA.
The ring holds as many chunks as fit next to cos/sin (64 × K/2 fp32 each, loaded once per CTA), bias and weight
(~220 KB: one CTA per SM). At Wan-1.3B that is the whole row block without RoPE, and with it all but one chunk
per warpgroup (1/12 of y), read again as phase 2 starts, likely from L2. Where a row block does not fit (Wan-14B's
5,120 columns: 9 slots for a warpgroup's 40 chunks), phase 1 refills each slot as it goes and phase 2 refills the
freed slots with the first chunks again; walking the heads backwards meets the most recently read chunks first,
likeliest still in L2.
The batch is the fastest grid axis, so the CTAs of the same tokens run together and share cos/sin in L2.
Ragged token counts cost nothing: TMA zero-fills rows read past the end and drops rows written past it.

Checked against float64 in Pallas's GPU interpreter on CPU with race detection, the refilling ring included
(tests/kernels/test_rms_rope_mgpu.py); timed against XLA by `benchmarks/rms_rope.py` on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # tokens of a CTA: one warpgroup's rows in the wgmma register layout
SMEM_BYTES = 227 * 1024  # shared memory a Hopper CTA may use
_RESERVED = 4 * 1024  # Pallas's reduction scratch (2 KB), barriers, alignment
_MAX_SLOTS = 32  # barriers in one group
_WGMMA = plgpu.Layout.WGMMA
_ROW = _WGMMA.reduce(1)  # one value per row
_COL = _WGMMA.reduce(0)  # one value per column
# fp32 tiles of cos/sin: a 128-byte swizzle row is 32 values
_ANGLE_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class RmsRopeConfig:
    warpgroups: int = 2  # warpgroups of a CTA; each takes heads / warpgroups of the CTA's tokens' heads
    stages: int | None = None  # ring slots (half-head chunks) per warpgroup; None: as many as fit

    def __post_init__(self):
        if self.warpgroups not in (1, 2, 3, 4):
            raise ValueError(f"RmsRopeConfig: warpgroups must be 1 to 4, got {self.warpgroups}")
        if self.stages is not None and self.stages < 4:
            raise ValueError(f"RmsRopeConfig: stages must be >= 4 (a refill runs two heads ahead), got {self.stages}")

    def slots(self, dim: int, heads: int, rope: bool) -> int:
        """Ring slots per warpgroup for this shape: the configured depth, capped by shared memory and the chunks
        a warpgroup owns (all of them: the row block stays resident, nothing is read twice)."""
        half = dim // heads // 2
        chunk_bytes = ROWS * half * 2
        fixed = 2 * dim * 4 + (2 * ROWS * half * 4 if rope else 0) + self.warpgroups * ROWS * 4 + _RESERVED
        fit = max(SMEM_BYTES - fixed, 0) // (self.warpgroups * chunk_bytes)
        chunks = 2 * heads // self.warpgroups
        return min(self.stages or chunks, chunks, fit, _MAX_SLOTS // self.warpgroups)


def unsupported_reason(y, heads: int, cos=None, sin=None, config: RmsRopeConfig | None = None) -> str | None:
    """Why this kernel can't run these inputs (None if it can), so that a caller can fall back to XLA."""
    config = config or RmsRopeConfig()
    if y.ndim != 3 or y.dtype != jnp.bfloat16:
        return f"needs a bfloat16 y of shape (B, L, D), got {y.dtype}{tuple(y.shape)}"
    _, L, D = y.shape
    if D % heads:
        return f"needs the model dim to split into heads, got D={D} for {heads} heads"
    K = D // heads
    if K % 64 or K > 256 or heads > 256:  # (bias and weight are one (heads, K) TMA box each)
        return f"needs a head dim that is a multiple of 64, both it and the heads at most 256, got {heads} × {K}"
    if L % 8:
        return f"needs a token count that is a multiple of 8 (TMA's 8-row tiles), got {L}"
    if (cos is None) != (sin is None):
        return "needs both cos and sin, or neither"
    if cos is not None and (cos.shape != (L, K // 2) or sin.shape != (L, K // 2)):
        return f"needs cos and sin of shape {(L, K // 2)}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
    if heads % config.warpgroups:
        return f"needs the heads ({heads}) to split evenly over {config.warpgroups} warpgroups"
    chunks = 2 * heads // config.warpgroups
    slots = config.slots(D, heads, cos is not None)
    if slots < min(4, chunks):
        return f"needs more shared memory than a CTA has at D={D} ({slots} ring slots per warpgroup fit)"
    return None


def rms_norm_rope_mgpu(y, bias, weight, cos=None, sin=None, *, heads: int, eps: float,
                       config: RmsRopeConfig | None = None, return_max_head_norms: bool = False):
    """RMSNorm over the whole model dim of y + bias, times weight, then (with cos/sin) RoPE on each head.

    y (B, L, D) bf16 (a projection's output without its bias), bias (D,), weight (D,), cos/sin (L, K/2) or both
    None, with D = heads · K and each head's RoPE pairs in halves (i, K/2 + i). Math in fp32; returns (B, L, D)
    bf16, rounded once. `return_max_head_norms`: also (B, heads) fp32, each head's largest norm over the tokens
    of the rounded result (the attention kernel's held-maxima bound for keys) — each token's from the same pass,
    so nothing reads the result again for it."""
    config = config or RmsRopeConfig()
    if (reason := unsupported_reason(y, heads, cos, sin, config)) is not None:
        raise ValueError(f"rms_norm_rope_mgpu {reason}")
    D = y.shape[-1]
    if bias.shape != (D,) or weight.shape != (D,):
        raise ValueError(f"rms_norm_rope_mgpu needs bias and weight of shape {(D,)}, got {bias.shape}, {weight.shape}")
    vectors = [v.astype(jnp.float32).reshape(heads, D // heads) for v in (bias, weight)]  # one TMA box each
    angles = [] if cos is None else [cos.astype(jnp.float32), sin.astype(jnp.float32)]
    out = _rms_rope(y, *vectors, *angles, heads=heads, eps=eps, config=config, head_norms=return_max_head_norms)
    if not return_max_head_norms:
        return out
    out, squared_norms = out  # (B, heads, tokens of whole row blocks)
    return out, jnp.sqrt(squared_norms[..., : y.shape[1]].max(axis=-1))


def _rms_rope(y, bias, weight, *angles, heads: int, eps: float, config: RmsRopeConfig, head_norms: bool = False):
    B, L, D = y.shape
    K = D // heads
    W = K // 2  # columns of a chunk: one RoPE half of a head
    rope = bool(angles)
    G = config.warpgroups
    P = heads // G  # heads of a warpgroup
    m = 2 * P  # chunks of a warpgroup
    S = config.slots(D, heads, rope)
    reread = m - S  # chunks [0, m - S) are overwritten in phase 1 and fetched again in phase 2
    tile = 64 if W % 64 == 0 else 32  # bf16 columns of a swizzle row (128 or 64 bytes)
    chunk_transforms = (plgpu.TilingTransform((8, tile)), plgpu.SwizzleTransform(2 * tile))

    def kernel(y_ref, b_ref, w_ref, *refs):
        *angle_refs, o_ref, norms_ref = refs if head_norms else (*refs, None)
        b, rows = lax.axis_index("batch"), pl.ds(lax.axis_index("rows") * ROWS, ROWS)

        def scoped(chunks, vectors, angle_smem, sums, ready, vectors_ready, angles_ready, sums_ready):
            wg = lax.axis_index("wg")

            def cols(j, half):  # a warpgroup's chunk j = 2 · head + half
                return pl.ds((wg * P + j // 2) * K + half * W, W)

            def slot(j):
                return wg * S + lax.rem(j, S)

            def fetch(j, half=None):  # half: j % 2 when known statically
                half = lax.rem(j, 2) if half is None else half
                plgpu.copy_gmem_to_smem(y_ref.at[b, rows, cols(j, half)], chunks.at[slot(j)], ready.at[slot(j)])

            def by_column(which, p, half):  # bias (0) or weight (1) of head p's half, broadcast over the rows
                v = plgpu.load(vectors.at[which, wg * P + p, pl.ds(half * W, W)], layout=_COL)
                return lax.broadcast_in_dim(v, (ROWS, W), [1])

            def x_of(p, half):  # y + bias of head p's half, fp32
                y = plgpu.load(chunks.at[slot(2 * p + half)], layout=_WGMMA).astype(jnp.float32)
                return y + by_column(0, p, half)

            @pl.when(wg == 0)
            def _vectors():
                plgpu.copy_gmem_to_smem(b_ref, vectors.at[0], vectors_ready)
                plgpu.copy_gmem_to_smem(w_ref, vectors.at[1], vectors_ready)

            for j in range(S):
                fetch(j, j % 2)
            if rope:
                @pl.when(wg == 0)
                def _angles():
                    for i, ref in enumerate(angle_refs):
                        plgpu.copy_gmem_to_smem(ref.at[rows], angle_smem.at[i], angles_ready)

            def refill(j, half):  # Pallas syncs the warpgroup first, so every thread has read the slot
                plgpu.commit_smem()  # (orders those reads before the TMA write for the interpreter's checker)
                fetch(j, half)

            # Phase 1: the rows' sum of squares over this warpgroup's heads.
            def accumulate(p, acc):
                for half in (0, 1):
                    j = 2 * p + half
                    plgpu.barrier_wait(ready.at[slot(j)])
                    x = x_of(p, half)
                    acc = acc + x * x
                    if reread:
                        pl.when(j + S < m)(functools.partial(refill, j + S, half if S % 2 == 0 else None))

                return acc

            plgpu.barrier_wait(vectors_ready)
            acc = lax.fori_loop(0, P, accumulate, plgpu.layout_cast(jnp.zeros((ROWS, W), jnp.float32), _WGMMA))
            sum_sq = acc.sum(axis=1)
            if G > 1:  # add the other warpgroups' partial sums
                sums.at[wg][...] = sum_sq
                plgpu.barrier_arrive(sums_ready)
                plgpu.barrier_wait(sums_ready)
                sum_sq = sum(plgpu.load(sums.at[g], layout=_ROW) for g in range(G))
            scale = lax.broadcast_in_dim(lax.rsqrt(sum_sq * (1.0 / D) + eps), (ROWS, W), [0])
            if rope:  # the per-row scale commutes with the rotation: fold it into cos and sin
                plgpu.barrier_wait(angles_ready)
                cos, sin = (plgpu.load(angle_smem.at[i], layout=_WGMMA) * scale for i in range(2))

            # Phase 2: normalize, weight, rotate; heads last first (the ring's newest chunks are still there).
            @pl.loop(0, P)
            def _head(q):
                p = P - 1 - q
                if reread:
                    for half in (0, 1):  # chunks [0, reread) were overwritten in phase 1 and fetched again
                        pl.when(2 * p + half < reread)(lambda half=half: plgpu.barrier_wait(
                            ready.at[slot(2 * p + half)]))
                z1, z2 = (x_of(p, half) * by_column(1, p, half) for half in (0, 1))
                out = (z1 * cos - z2 * sin, z1 * sin + z2 * cos) if rope else (z1 * scale, z2 * scale)
                out = [o.astype(o_ref.dtype) for o in out]
                for half, o in enumerate(out):
                    chunks.at[slot(2 * p + half)][...] = o  # each thread overwrites what it read
                if head_norms:  # each row's squared norm in this head, from registers (4 bytes a row and head)
                    o1, o2 = (o.astype(jnp.float32) for o in out)
                    norms_ref.at[b, wg * P + p, rows][...] = (o1 * o1 + o2 * o2).sum(axis=1)
                plgpu.commit_smem()
                for half in (0, 1):
                    plgpu.copy_smem_to_gmem(chunks.at[slot(2 * p + half)], o_ref.at[b, rows, cols(2 * p, half)],
                                            commit_group=half == 1)
                if reread:  # refill the previous head's slots (its store has read them) with chunks needed again
                    first = 2 * (p + 1) - S  # the chunks j whose j + S are head p + 1's

                    @pl.when(first < reread)
                    def _refill():
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        for d in (0, 1):
                            pl.when((first + d >= 0) & (first + d < reread))(lambda d=d: fetch(first + d))

            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((G * S, ROWS, W), y.dtype, transforms=chunk_transforms),
            plgpu.SMEM((2, heads, K), jnp.float32),
            plgpu.SMEM((2, ROWS, W), jnp.float32, transforms=_ANGLE_TRANSFORMS) if rope else None,
            plgpu.SMEM((G, ROWS), jnp.float32) if G > 1 else None,
            plgpu.Barrier(num_barriers=G * S),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=2) if rope else None,
            plgpu.Barrier(num_arrivals=G) if G > 1 else None,
            collective_axes="wg",
        )

    out_type = jax.ShapeDtypeStruct((B, L, D), y.dtype)
    if head_norms:  # whole row blocks (plain stores are not clipped at L like TMA's)
        out_type = (out_type, jax.ShapeDtypeStruct((B, heads, pl.cdiv(L, ROWS) * ROWS), jnp.float32))
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        # Pallas launches the last grid axis fastest: CTAs of the same tokens run together, sharing cos/sin in L2.
        grid=(pl.cdiv(L, ROWS), B),
        grid_names=("rows", "batch"),
        num_threads=G,
        thread_name="wg",
    )(y, bias, weight, *angles)
