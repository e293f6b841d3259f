"""gelu(x @ w + b) as one Hopper GEMM (Pallas Mosaic GPU): the bias and tanh-GELU run in the epilogue.

Why: in a Wan block the FFN's first GEMM writes a 32,760 × 8,960 bf16 hidden state that XLA then reads and
writes again for bias + GELU — 14.6 ms of a 463 ms forward (1.3B 480p, H200; benchmarks/NOTES.md). Here the
accumulator gets bias and GELU in registers before its one store.

Persistent and ping-pong, so the epilogue costs no tensor-core time: one CTA per SM walks the output tiles
(`block_m` × `block_n`, column blocks fastest so that x rows are shared and w stays in L2) with three
warpgroups:
  - warpgroup 2 issues TMA copies of every tile's x and w blocks, in order, into a `stages`-deep ring and
    gives its registers to the others (setmaxnreg);
  - warpgroups 0 and 1 take alternate tiles: each runs its tile's wgmma chain (fp32 accumulator in
    registers), then its epilogue — acc + b → GELU (y·sigmoid(2u) with exp2, fp32) → bf16 → shared memory →
    TMA store — while the other warpgroup's wgmmas for the next tile keep the tensor cores busy.
Each warpgroup has its own "ready" barriers per ring slot, so it waits exactly on the loads of its own tiles.
Ragged rows cost nothing: TMA zero-fills reads past the end of x and drops writes past the end of the output.

Checked against float64 in Pallas's GPU interpreter on CPU (tests/kernels/test_gelu_dense.py); timed by
`benchmarks/ffn.py` on a GPU.
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
_LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class GeluDenseConfig:
    block_m: int = 128  # output tile rows (one compute warpgroup's tile)
    block_n: int = 128  # output tile columns
    block_k: int = 64  # reduction step (64 bf16 = one 128-byte swizzle row)
    stages: int = 4  # depth of the x / w shared-memory ring (4 and 5 measured within noise; 4 leaves smem spare)
    ctas: int | None = None  # persistent CTAs (default: the device's SM count)
    cooperative: bool = False  # experiment: 256-row CTA tiles (both warpgroups share w), 2-CTA clusters sharing x
    tanh_gelu: bool = False  # experiment: the epilogue's GELU through tanh.approx (one MUFU op, not two)
    rows_fastest: bool = False  # experiment: cooperative tile order

    def __post_init__(self):
        if self.block_m % 64 or self.block_n % 64 or self.block_k != 64:
            raise ValueError(f"GeluDenseConfig: block_m, block_n multiples of 64 and block_k = 64, got {self}")
        if self.stages < 2:
            raise ValueError(f"GeluDenseConfig: stages must be >= 2, got {self.stages}")


def unsupported_reason(x, w, config: GeluDenseConfig = GeluDenseConfig()) -> str | None:
    """Why this kernel can't run these inputs (None if it can). Platform checks live in the dispatcher."""
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        return f"needs bfloat16 x and w, got {x.dtype} and {w.dtype}"
    K, N = w.shape
    if K % config.block_k:
        return f"needs the reduction dim to be a multiple of {config.block_k}, got {K}"
    if N % config.block_n:
        return f"needs the output dim to be a multiple of {config.block_n}, got {N}"
    return None


def gelu_tanh(y):
    """0.5·y·(1 + tanh u) = y·sigmoid(2u), u = √(2/π)(y + 0.044715 y³): one exp2 and one division, fp32."""
    two_u_log2e = (2.0 * _GELU_C * _LOG2_E) * (y + 0.044715 * y * y * y)
    return y / (1.0 + jnp.exp2(-two_u_log2e))


def _gelu_via_tanh(y):
    """0.5·y·(1 + tanh u): with approx math one tanh.approx (MUFU) where `gelu_tanh` spends an ex2 and a rcp."""
    u = _GELU_C * y * (1.0 + 0.044715 * y * y)
    half_y = 0.5 * y
    return half_y + half_y * jnp.tanh(u)


def _smem(shape, dtype):
    # 128-byte swizzle with (8, 64) tiles: the layout wgmma reads without bank conflicts (64 x 2 bytes).
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


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
    impl = _gelu_dense_cooperative if config.cooperative else _gelu_dense
    out = impl(x2, w, b.astype(jnp.float32), config)
    return out[:M].reshape(*lead, w.shape[1])


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", None) or 132


def _gelu_dense(x, w, b, config: GeluDenseConfig):
    M, K = x.shape
    N = w.shape[1]
    bm, bn, bk, stages = config.block_m, config.block_n, config.block_k, config.stages
    n_k, n_cols = K // bk, N // bn
    n_tiles = pl.cdiv(M, bm) * n_cols
    grid = min(config.ctas or _num_sms(), n_tiles)

    def kernel(x_ref, w_ref, b_ref, o_ref, scoped):
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        (x_smem, w_smem, o_smem, b_smem), (x_ready, w_ready, b_ready), free = scoped
        n_local = (n_tiles - cta + grid - 1) // grid  # this CTA's tiles: cta, cta + grid, ...

        def tile_origin(j):
            t = cta + j * grid
            return (t // n_cols) * bm, (t % n_cols) * bn  # column blocks fastest

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(wg, n_local, step=2)
            def _tile(j):
                m0, n0 = tile_origin(j)
                plgpu.copy_gmem_to_smem(b_ref.at[pl.ds(n0, bn)], b_smem.at[wg], b_ready.at[wg])

                def mainloop(acc_ref):
                    @pl.loop(0, n_k)
                    def _(k):
                        slot = lax.rem(j * n_k + k, stages)
                        plgpu.barrier_wait(x_ready.at[wg * stages + slot])
                        plgpu.barrier_wait(w_ready.at[wg * stages + slot])
                        plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot])
                        plgpu.wgmma_wait(1)  # the previous step's wgmma is done: its slot goes back

                        @pl.when(k > 0)
                        def _():
                            plgpu.barrier_arrive(free.at[lax.rem(j * n_k + k + stages - 1, stages)])

                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(free.at[lax.rem(j * n_k + n_k - 1, stages)])
                    return acc_ref[...]

                acc = pl.run_scoped(mainloop, plgpu.ACC((bm, bn), jnp.float32))
                plgpu.barrier_wait(b_ready.at[wg])
                bias = plgpu.load(b_smem.at[wg], layout=_COL)
                y = acc + lax.broadcast_in_dim(bias, acc.shape, [1])
                y = _gelu_via_tanh(y) if config.tanh_gelu else gelu_tanh(y)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read o_smem
                o_smem.at[wg][...] = y.astype(o_ref.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)])

            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, n_local)
            def _tile(j):
                m0, n0 = tile_origin(j)
                owner = lax.rem(j, 2)

                @pl.loop(0, n_k)
                def _(k):
                    step = j * n_k + k
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(free.at[slot])

                    plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, bm), pl.ds(k * bk, bk)], x_smem.at[slot],
                                            x_ready.at[owner * stages + slot])
                    plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(k * bk, bk), pl.ds(n0, bn)], w_smem.at[slot],
                                            w_ready.at[owner * stages + slot])

    def entry(x_ref, w_ref, b_ref, o_ref):
        pl.run_scoped(
            lambda *scoped: kernel(x_ref, w_ref, b_ref, o_ref, scoped),
            (_smem((stages, bm, bk), x.dtype), _smem((stages, bk, bn), w.dtype), _smem((2, bm, bn), x.dtype),
             plgpu.SMEM((2, bn), jnp.float32)),
            (plgpu.Barrier(num_barriers=2 * stages), plgpu.Barrier(num_barriers=2 * stages),
             plgpu.Barrier(num_barriers=2)),
            plgpu.Barrier(num_barriers=stages),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((M, N), x.dtype),
        grid=(grid,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(x, w, b)


def _gelu_dense_cooperative(x, w, b, config: GeluDenseConfig):
    """Both compute warpgroups share one CTA tile (2 * block_m rows x block_n columns, so one w tile feeds both)
    and two CTAs of a cluster take neighbouring column tiles of the same rows, x multicast to both: a quarter of
    the ping-pong kernel's L2 reads per FLOP. The epilogue no longer overlaps the other warpgroup's main loop."""
    M, K = x.shape
    N = w.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if N % (2 * bn):
        raise ValueError(f"gelu_dense_mgpu cooperative: N={N} must be a multiple of {2 * bn}")
    m_iters, n_iters = pl.cdiv(M, 2 * bm), N // (2 * bn)
    grid = min((config.ctas or _num_sms()) // 2, m_iters * n_iters)
    smem = lambda shape, dtype: _smem(shape, dtype)
    ec = bn if config.stages <= 3 else 64  # epilogue chunk columns

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(K // bk,), memory_registers=40, max_concurrent_steps=config.stages, wg_axis="wg",
            num_compute_wgs=2, compute_context=context,
            in_specs=[plgpu.BlockSpec((2 * bm, bk), lambda k: (0, k), transforms=smem((1,), x.dtype).transforms,
                                      memory_space=plgpu.SMEM, collective_axes=("cluster",)),
                      plgpu.BlockSpec((bk, bn), lambda k: (k, 0), transforms=smem((1,), w.dtype).transforms,
                                      memory_space=plgpu.SMEM)])

    def kernel(x_ref, w_ref, b_ref, o_ref):
        ignore = lambda *_, **__: None

        def scoped(allocs, o_smem, b_smem, b_ready):
            wg, cta = lax.axis_index("wg"), lax.axis_index("cluster")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
            def _tile(info):
                (t,) = info.index
                if config.rows_fastest:
                    m_idx, n_pair = lax.rem(t, m_iters), t // m_iters
                else:
                    m_idx, n_pair = t // n_iters, lax.rem(t, n_iters)  # column pairs fastest: x rows shared
                m0, n0 = m_idx * 2 * bm, (2 * n_pair + cta) * bn
                rows = pl.ds(m0, 2 * bm)
                cols = pl.ds(n0, bn)

                def context(run):
                    plgpu.copy_gmem_to_smem(b_ref.at[cols], b_smem.at[wg], b_ready.at[wg])

                    def with_acc(acc_ref):
                        run(acc_ref)
                        acc = acc_ref[...]
                        plgpu.barrier_wait(b_ready.at[wg])
                        for c in range(bn // ec):  # column chunks: with 4 stages a whole tile's staging won't fit
                            bias = plgpu.load(b_smem.at[wg, pl.ds(c * ec, ec)], layout=_COL)
                            part = acc[:, c * ec:(c + 1) * ec]
                            y = part + lax.broadcast_in_dim(bias, part.shape, [1])
                            y = _gelu_via_tanh(y) if config.tanh_gelu else gelu_tanh(y)
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                            o_smem.at[wg][...] = y.astype(o_ref.dtype)
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(o_smem.at[wg],
                                                    o_ref.at[pl.ds(m0 + wg * bm, bm), pl.ds(n0 + c * ec, ec)])

                    pl.run_scoped(with_acc, plgpu.ACC((bm, bn), jnp.float32))

                def mma(_idx, x_smem, w_smem, acc_ref):
                    plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * bm, bm)], w_smem)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                pipeline(mma, context)(x_ref.at[rows, :], w_ref.at[:, cols], allocations=allocs)

            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, pipeline(ignore, ignore).get_allocations(x_ref, w_ref),
                      _smem((2, bm, ec), x.dtype), plgpu.SMEM((2, bn), jnp.float32),
                      plgpu.Barrier(num_barriers=2), collective_axes="wg")

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((M, N), x.dtype),
        grid=(grid,),
        grid_names=("cluster_grid",),
        cluster=(2,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(x, w, b)
