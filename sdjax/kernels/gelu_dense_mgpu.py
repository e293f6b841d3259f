"""gelu(x @ w + b) as one Hopper GEMM (Pallas Mosaic GPU): the bias and tanh-GELU run in the epilogue.

Why: in a Wan block the FFN's first GEMM writes a 32,760 × 8,960 bf16 hidden state that XLA then reads and
writes again for bias + GELU. Here the accumulator gets bias and GELU in registers before its one store.
Device-timed on an H200 (benchmarks/results/gemm_fused_fc1_*s6_NVIDIA_H200.md, 1.3B fc1, 32,760 tokens): cuBLAS
then XLA's bias + GELU 1.54-1.56 ms, this kernel 1.25-1.27 (cuBLAS's GEMM alone 1.13-1.15); at 65,520 tokens
(batched CFG) 3.07-3.11 → 2.49-2.53. The 1.3B forward: 461.8 → 459.4 ms (B=1), 908.7 → 899.9 (B=2).

Cooperative and clustered, so the main loop reads little from L2 (the limit of a 128 × 128 tile a warpgroup,
which ran at ~660 TFLOP/s, benchmarks/NOTES.md):
  - a CTA's tile is 2 · block_m rows × block_n columns: its two compute warpgroups take block_m rows each and
    share one w tile;
  - two CTAs of a cluster take neighbouring column tiles of the same rows, and each x tile is multicast to both;
  - the third warpgroup of each CTA issues the TMA copies into a `stages`-deep ring (Pallas's warp-specialized
    pipeline, which also releases multicast slots across the cluster); the CTAs are persistent and walk the
    tiles column pairs fastest, so consecutive tiles reuse x rows.
The epilogue (bias, GELU as 0.5·y·(1 + tanh u) — one tanh.approx on the MUFU with approx math — bf16, TMA store)
does not overlap the main loop; the tanh form halved its MUFU work against y·sigmoid(2u) (1.30 → 1.25 ms). On an
H100 that epilogue keeps the kernel at ~680 TFLOP/s where cuBLAS's GEMM alone reaches ~780 at this K. Running it
under the next tile's wgmmas with a second accumulator a warpgroup measured slower (2.65 → 3.00 ms at 65,520 tokens:
two 128 × 128 fp32 accumulators are 256 registers a thread; with 128 × 64 tiles 3.08 — benchmarks/NOTES.md,
session 12), as did a wgmma left in flight across k-steps (session 11).
Ragged rows cost nothing: TMA zero-fills reads past the end of x and drops writes past the end of the output.

Checked against float64 in Pallas's GPU interpreter on CPU, clusters and race detection included
(tests/kernels/test_gelu_dense.py); timed by `benchmarks/gemm.py` on a GPU.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column
_GELU_C = math.sqrt(2.0 / math.pi)
SMEM_BYTES = 227 * 1024  # shared memory a Hopper CTA may use


@dataclasses.dataclass(frozen=True)
class GeluDenseConfig:
    block_m: int = 128  # rows of one compute warpgroup's part of a CTA tile (the CTA's is 2 · block_m)
    block_n: int = 128  # columns of a CTA tile (a cluster's is 2 · block_n)
    block_k: int = 64  # reduction step (64 bf16 = one 128-byte swizzle row)
    stages: int = 3  # depth of the x / w shared-memory ring (3 and 4 measured within noise; 4 needs a split store)
    clusters: int | None = None  # persistent clusters of 2 CTAs (default: half the device's SM count)

    def __post_init__(self):
        if self.block_m % 64 or self.block_n % 64 or self.block_k != 64:
            raise ValueError(f"GeluDenseConfig: block_m, block_n multiples of 64 and block_k = 64, got {self}")
        if self.stages < 2:
            raise ValueError(f"GeluDenseConfig: stages must be >= 2, got {self.stages}")
        if self.smem_bytes() > SMEM_BYTES:
            raise ValueError(f"GeluDenseConfig: {self} needs {self.smem_bytes()} bytes of shared memory, "
                             f"more than {SMEM_BYTES}")

    def smem_bytes(self) -> int:
        ring = self.stages * (2 * self.block_m + self.block_n) * self.block_k * 2
        return ring + 2 * self.block_m * self.block_n * 2 + 2 * self.block_n * 4  # + output staging and bias


def unsupported_reason(x, w, config: GeluDenseConfig = GeluDenseConfig()) -> str | None:
    """Why this kernel can't run these inputs (None if it can). Platform checks live in the dispatcher."""
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        return f"needs bfloat16 x and w, got {x.dtype} and {w.dtype}"
    K, N = w.shape
    if K % config.block_k:
        return f"needs the reduction dim to be a multiple of {config.block_k}, got {K}"
    if N % (2 * config.block_n):
        return f"needs the output dim to be a multiple of {2 * config.block_n} (a cluster's columns), got {N}"
    return None


def gelu_tanh(y):
    """0.5·y·(1 + tanh u), u = √(2/π)(y + 0.044715 y³), in y's dtype (fp32 in the kernel)."""
    half_y = 0.5 * y
    return half_y + half_y * jnp.tanh(_GELU_C * y * (1.0 + 0.044715 * y * y))


# 128-byte swizzle with (8, 64) tiles: the layout wgmma reads without bank conflicts (64 x 2 bytes).
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def gelu_dense_mgpu(x, w, b, *, config: GeluDenseConfig | None = None):
    """gelu_tanh(x @ w + b) in bf16. x (..., K) bf16, w (K, N) bf16, b (N,) any float -> (..., N) bf16."""
    config = config or GeluDenseConfig()
    if (reason := unsupported_reason(x, w, config)) is not None:
        raise ValueError(f"gelu_dense_mgpu {reason}")
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M % 8:  # TMA boxes need whole 8-row tiles
        x2 = jnp.pad(x2, ((0, 8 - M % 8), (0, 0)))
    out = _gelu_dense(x2, w, b.astype(jnp.float32), config)
    return out[:M].reshape(*lead, w.shape[1])


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", None) or 132


def _launch(kernel, clusters: int, x, w, b):
    """`kernel` on `clusters` persistent clusters of 2 CTAs, each 2 compute + 1 copy warpgroups: (M, N) in x's dtype."""
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype),
        grid=(clusters,),
        grid_names=("cluster_grid",),
        cluster=(2,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(x, w, b)


def _gelu_dense(x, w, b, config: GeluDenseConfig):
    M, K = x.shape
    N = w.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    m_tiles, n_pairs = pl.cdiv(M, 2 * bm), N // (2 * bn)
    clusters = min(config.clusters or _num_sms() // 2, m_tiles * n_pairs)

    def pipeline(body, context):
        """The main loop over K: x tiles (2 · bm rows, multicast over the cluster) and w tiles (bn columns)."""
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(K // bk,), memory_registers=40, max_concurrent_steps=config.stages, wg_axis="wg",
            num_compute_wgs=2, compute_context=context,
            in_specs=[plgpu.BlockSpec((2 * bm, bk), lambda k: (0, k), transforms=_SWIZZLED,
                                      memory_space=plgpu.SMEM, collective_axes=("cluster",)),
                      plgpu.BlockSpec((bk, bn), lambda k: (k, 0), transforms=_SWIZZLED, memory_space=plgpu.SMEM)])

    def kernel(x_ref, w_ref, b_ref, o_ref):
        def scoped(ring, o_smem, b_smem, b_ready):
            wg, cta = lax.axis_index("wg"), lax.axis_index("cluster")

            @plgpu.nd_loop((m_tiles * n_pairs,), collective_axes="cluster_grid")
            def _tile(info):
                (t,) = info.index
                m0 = (t // n_pairs) * 2 * bm
                cols = pl.ds((2 * lax.rem(t, n_pairs) + cta) * bn, bn)  # column pairs fastest: x rows reused

                def epilogue_around(main_loop):
                    plgpu.copy_gmem_to_smem(b_ref.at[cols], b_smem.at[wg], b_ready.at[wg])

                    def run(acc_ref):
                        main_loop(acc_ref)
                        acc = acc_ref[...]
                        plgpu.barrier_wait(b_ready.at[wg])
                        bias = plgpu.load(b_smem.at[wg], layout=_COL)
                        y = gelu_tanh(acc + lax.broadcast_in_dim(bias, acc.shape, [1]))
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has read o_smem
                        o_smem.at[wg][...] = y.astype(o_ref.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[pl.ds(m0 + wg * bm, bm), cols])

                    pl.run_scoped(run, plgpu.ACC((bm, bn), jnp.float32))

                def step(_k, x_smem, w_smem, acc_ref):
                    plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * bm, bm)], w_smem)
                    plgpu.wgmma_wait(0)  # the slot goes back to the copy warpgroup when this returns
                    return acc_ref

                pipeline(step, epilogue_around)(x_ref.at[pl.ds(m0, 2 * bm), :], w_ref.at[:, cols], allocations=ring)

            plgpu.wait_smem_to_gmem(0)

        unused = lambda *_, **__: None  # the allocations do not depend on the bodies
        pl.run_scoped(scoped, pipeline(unused, unused).get_allocations(x_ref, w_ref),
                      plgpu.SMEM((2, bm, bn), x.dtype, transforms=_SWIZZLED), plgpu.SMEM((2, bn), jnp.float32),
                      plgpu.Barrier(num_barriers=2), collective_axes="wg")

    return _launch(kernel, clusters, x, w, b)
