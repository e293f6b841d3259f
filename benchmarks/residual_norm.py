"""A Wan block's residual add + the next LayerNorm, and its first LayerNorm: XLA against our one-pass Pallas (Triton)
kernels.

    PYTHONPATH=$PWD python benchmarks/residual_norm.py [--shapes 1.3b,14b] [--batch 2] [--configs 16:8,4:4]

At Wan 480p (32,760 tokens, B=2: the CFG batch) and both of a block's sites — after the self-attention (gated,
then norm2's affine LayerNorm) and after the cross-attention (ungated, then the FFN's modulated LayerNorm) — times
`residual_norm` with backend xla (one jitted function) and pallas_triton (its default, then each `--configs` entry,
rows:num_warps); and at the block's start, where nothing joins the stream, `modulated_norm` (u alone: GB/s counts
reading x and writing u). Device-timed (the kernels' own time,
median over 10 calls: `benchmarks.gemm.ms`); GB/s counts reading x and y and writing x′ and u once. The kernel's
outputs are checked against XLA's: x′ identical, u within bf16 rounding (relative L2 ≤ 4e-3; else the script exits
non-zero after writing the table). In the model: `dit_step.py --xla-residual-norm` against the same without.
Writes benchmarks/results/residual_norm_<card>.md (and .json), or under $OUT.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import write_results
from benchmarks.gemm import ms
from sdjax.kernels.residual_norm import modulated_norm, residual_norm, residual_norm_pallas

L, EPS, MAX_REL_L2 = 32760, 1e-6, 4e-3
DIMS = {"1.3b": 1536, "14b": 5120}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="1.3b,14b", help=f"models, comma-separated: {', '.join(DIMS)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--configs", default="", help="extra kernel configs, rows:num_warps, comma-separated")
    args = p.parse_args()
    rows, failed = [], False
    for model in args.shapes.split(","):
        D, B = DIMS[model], args.batch
        ks = jax.random.split(jax.random.key(0), 6)
        x = (4 * jax.random.normal(ks[0], (B, L, D)) + 1).astype(jnp.bfloat16)
        y = jax.random.normal(ks[1], (B, L, D), jnp.bfloat16)
        y_bias = (0.1 * jax.random.normal(ks[2], (D,))).astype(jnp.bfloat16)
        gate = 0.5 * jax.random.normal(ks[3], (B, D))
        sites = {"self-attn (gate, norm2)": (gate, 1 + 0.1 * jax.random.normal(ks[4], (D,)),
                                             0.1 * jax.random.normal(ks[5], (D,))),
                 "cross-attn (modulated LN)": (None, 1 + 0.1 * jax.random.normal(ks[4], (B, D)),
                                               0.1 * jax.random.normal(ks[5], (B, D)))}
        gb = 4 * x.size * 2 / 1e9
        for site, (g, scale, shift) in sites.items():
            fns = {backend: jax.jit(lambda x, y, b, g, sc, sh, backend=backend: residual_norm(
                x, y, b, g, sc, sh, eps=EPS, backend=backend)) for backend in ("xla", "pallas_triton")}
            for spec in filter(None, args.configs.split(",")):
                R, warps = map(int, spec.split(":"))
                fns[f"pallas_triton {spec}"] = jax.jit(lambda x, y, b, g, sc, sh, R=R, warps=warps: (
                    residual_norm_pallas(x, y, b, g, *(jnp.broadcast_to(v, x.shape[::2]) for v in (sc, sh)), eps=EPS,
                                         rows=R, num_warps=warps)))
            rx, ru = (np.asarray(o, np.float32) for o in fns["xla"](x, y, y_bias, g, scale, shift))
            base = ms(fns["xla"], x, y, y_bias, g, scale, shift)
            for name, fn in fns.items():
                t = base if name == "xla" else ms(fn, x, y, y_bias, g, scale, shift)
                row = {"model": model, "B": B, "tokens": L, "site": site, "backend": name, "ms": t,
                       "GB_per_s": gb / t * 1e3, "speedup": base / t}
                if name != "xla":
                    kx, ku = (np.asarray(o, np.float32) for o in fn(x, y, y_bias, g, scale, shift))
                    row["x_identical"] = float((rx == kx).mean())
                    row["u_rel_l2_vs_xla"] = float(np.linalg.norm(ku - ru) / np.linalg.norm(ru))
                    failed |= row["x_identical"] < 1.0 or row["u_rel_l2_vs_xla"] > MAX_REL_L2
                rows.append(row)
                print(row, flush=True)
        scale, shift = 1 + 0.1 * jax.random.normal(ks[4], (B, D)), 0.1 * jax.random.normal(ks[5], (B, D))
        norms = {backend: jax.jit(lambda x, sc, sh, backend=backend: modulated_norm(
            x, sc, sh, eps=EPS, out_dtype=jnp.bfloat16, backend=backend)) for backend in ("xla", "pallas_triton")}
        ru = np.asarray(norms["xla"](x, scale, shift), np.float32)
        base = ms(norms["xla"], x, scale, shift)
        for name, fn in norms.items():
            t = base if name == "xla" else ms(fn, x, scale, shift)
            row = {"model": model, "B": B, "tokens": L, "site": "block start (modulated LN alone)", "backend": name,
                   "ms": t, "GB_per_s": gb / 2 / t * 1e3, "speedup": base / t}
            if name != "xla":
                ku = np.asarray(fn(x, scale, shift), np.float32)
                row["u_rel_l2_vs_xla"] = float(np.linalg.norm(ku - ru) / np.linalg.norm(ru))
                failed |= row["u_rel_l2_vs_xla"] > MAX_REL_L2
            rows.append(row)
            print(row, flush=True)
    write_results("residual_norm", rows, header="x′ = x + gate·(y + b), u = LayerNorm(x′)·scale + shift (block "
                  "start: u = LayerNorm(x)·scale + shift); bf16 stream, random inputs; device time; GB/s: x, y read "
                  "and x′, u written once (block start: x read, u written).")
    if failed:
        sys.exit("residual_norm: the kernel disagrees with XLA (see the table)")


if __name__ == "__main__":
    main()
