"""Mosaic GPU GEMMs against cuBLAS at the DiT's shapes: a tile / cluster sweep of JAX's Hopper matmul example.

    python benchmarks/gemm.py [--shapes fc1,fc2,attn,fc1_14b] [--m 32760,65520] [--quick]

A 128 x 128 tile per warpgroup reads 32 KB from L2 per 2.1 MFLOP, more than L2 serves at the tensor rate (our
first fused fc1 kernel ran ~660 TFLOP/s so); larger CTA tiles (two warpgroups sharing one operand) and 2-CTA
clusters (TMA multicast of the other) cut that traffic. This times cuBLAS (XLA's dot) and the JAX example kernel
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) over its tuning space (it needs whole cluster tiles:
M = 32,768), and checks each against cuBLAS.

Device-timed: the kernels' own time from a profiler trace (sum over a call's kernels, median of 10 calls), as
inside the model. (Host timing, this script's first form, added 0.1-0.3 ms a call at these sizes and ranked the
kernels wrongly: benchmarks/NOTES.md, session 5.) fc1 as the model runs it (bias + GELU in cuBLASLt's epilogue):
benchmarks/ffn.py.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import write_results
from benchmarks.profile_step import device_kernels

# (K, N) of the 1.3B block's GEMMs: fc1, fc2, one of q/k/v/o; and the 14B model's fc1.
SHAPES = {"fc1": (1536, 8960), "fc2": (8960, 1536), "attn": (1536, 1536), "fc1_14b": (5120, 13824)}


def ms(fn, *args, calls: int = 10) -> float:
    """Median device time of one call (all its kernels), from a profiler trace of `calls` calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        kernels = [(name, us) for name, us, _ in device_kernels(Path(tmp)) if "memset" not in name.lower()]
    per_kernel = collections.defaultdict(list)
    for name, us in kernels:
        per_kernel[name].append(us)
    # every call launches the same kernels: the median per kernel, summed
    return sum(float(np.median(v)) for v in per_kernel.values()) / 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="fc1,fc2")
    p.add_argument("--m", default="32768", help="token counts, comma-separated")
    p.add_argument("--quick", action="store_true", help="the best tiles only, every grid order")
    args = p.parse_args()
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    D = hm.MatmulDimension
    rows = []
    for shape, M in itertools.product(args.shapes.split(","), [int(m) for m in args.m.split(",")]):
        K, N = SHAPES[shape]
        shape = f"{shape} M={M}"
        x = jax.random.normal(jax.random.key(0), (M, K), jnp.float32).astype(jnp.bfloat16)
        w = (jax.random.normal(jax.random.key(1), (K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
        tflop = 2 * M * K * N / 1e12
        cublas = jax.jit(jnp.dot)  # bf16 out, fp32 accumulation inside cuBLAS (as the model's GEMMs)
        ref = np.asarray(cublas(x, w), np.float32)
        t = ms(cublas, x, w)
        rows.append({"shape": shape, "kernel": "cuBLAS (XLA dot)", "ms": t, "TFLOP_per_s": tflop / t * 1e3,
                     "rel_err_vs_cublas": 0.0})
        print(rows[-1], flush=True)
        if args.quick:  # the best of a first full sweep (results/gemm_NVIDIA_H200.md), every grid order
            combos = [(128, 128, D.M, D.N), (128, 128, D.N, D.M), (64, 256, D.M, None), (128, 128, D.N, D.N)]
            orders = [(D.N, 4), (D.N, 8), (D.N, 16), (D.M, 4), (D.M, 8), (D.M, 16)]
        else:
            tiles = [(128, 128, D.M), (128, 128, D.N), (64, 256, D.M), (128, 64, D.N)]
            combos = [(*t, c) for t in tiles for c in (None, D.M, D.N)]
            orders = [(D.N, 8), (D.M, 8)]
        for (tm, tn, wg, cluster), (minor, width) in itertools.product(combos, orders):
            cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=4, grid_minor_dim=minor,
                                  grid_tile_width=width, wg_dimension=wg, cluster_dimension=cluster)
            name = f"{tm}x{tn} wg={wg} cluster={cluster} minor={minor}/{width}"
            try:
                fn = jax.jit(lambda x, w, cfg=cfg: hm.matmul(x, w, None, config=cfg))
                out = np.asarray(fn(x, w), np.float32)
                t = ms(fn, x, w)
            except Exception as e:  # noqa: BLE001 - a sweep: record why a config can't run
                rows.append({"shape": shape, "kernel": name, "error": str(e).splitlines()[0][:120]})
                print(rows[-1], flush=True)
                continue
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            rows.append({"shape": shape, "kernel": name, "ms": t, "TFLOP_per_s": tflop / t * 1e3,
                         "rel_err_vs_cublas": err})
            print(rows[-1], flush=True)
    write_results("gemm", rows, header=f"GEMM tile sweep, bf16, K x N per shape: {SHAPES}")


if __name__ == "__main__":
    main()
