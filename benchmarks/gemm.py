"""Can a Mosaic GPU GEMM reach cuBLAS's rate at the DiT's shapes? Tile / cluster sweep of JAX's Hopper matmul.

    python benchmarks/gemm.py [--shapes fc1,fc2,attn] [--quick]

Our fused fc1 + GELU kernel (sdjax/kernels/gelu_dense_mgpu.py) runs 128 x 128 tiles per warpgroup at 520-560
TFLOP/s against cuBLAS's ~745: a 128 x 128 tile reads 32 KB from L2 per 2.1 MFLOP, more than L2 serves at the
tensor rate. Larger CTA tiles (two warpgroups sharing one operand) and 2-CTA clusters (TMA multicast of the
other) cut that traffic. This times cuBLAS (XLA's dot) and the JAX example kernel
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) over its tuning space, at the 1.3B model's GEMM shapes
with M = 32,768 tokens (the example needs whole cluster tiles), and checks each against cuBLAS.

Host-timed, one call at a time: for 0.2-1.5 ms kernels the dispatch and sync add 0.1-0.3 ms, so rows compare with
each other only. Inside the model (a device profile, results/profile_*_b1_NVIDIA_H200.md) cuBLAS runs the 1,536²
GEMMs at 0.218 ms (709 TFLOP/s) and fc2 at 1.153 ms (782), against 0.37 / 1.44 ms here (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import timed, write_results

# (K, N) of the 1.3B block's GEMMs: fc1, fc2, one of q/k/v/o.
SHAPES = {"fc1": (1536, 8960), "fc2": (8960, 1536), "attn": (1536, 1536)}


def ms(fn, *args) -> float:
    return float(np.median(timed(fn, *args, warmup=2, iters=10))) * 1e3


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
