"""q/k RMSNorm (+ RoPE) of a Wan attention layer: XLA's two passes against our one-pass kernel.

    PYTHONPATH=$PWD python benchmarks/rms_rope.py [--shapes 1.3b,14b] [--configs 2:,1:,2:4]

Per shape (Wan 480p, 32,760 tokens: the self-attention's q/k with RoPE and the cross-attention's q without, at
B=1 and at the CFG batch B=2) this times
  - XLA: (y + bias) in fp32, RMS over the whole model dim, ⊙ weight, RoPE on each head's halves, the RMS scale,
    one bf16 rounding — one jitted function (XLA runs it as a reduction kernel and an element-wise kernel);
  - `sdjax.kernels.rms_rope_mgpu` (the default config, then each `--configs` entry, warpgroups:stages).
Device-timed (the kernels' own time from a profiler trace, median of 20 calls: `benchmarks.gemm.ms`); GB/s
counts one read of y and one write of the output (cos/sin, bias and weight excluded). Each kernel output is
checked against XLA's (relative L2 ≤ 4e-3, else the script exits non-zero after writing the table).
Writes benchmarks/results/rms_rope_<card>.md (and .json), or under $OUT.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import write_results
from benchmarks.gemm import ms
from sdjax.kernels.norm import rms_norm_rope
from sdjax.kernels.rms_rope_mgpu import RmsRopeConfig, rms_norm_rope_mgpu, unsupported_reason

L, EPS, MAX_REL_L2 = 32760, 1e-6, 4e-3
MODELS = {"1.3b": (1536, 12), "14b": (5120, 40)}  # model dim, heads (head dim 128)


def xla_rms_norm_rope(y, bias, weight, cos=None, sin=None, *, heads: int, eps: float):
    """The reference: the model's XLA backend (fp32 math, bias added inside, rounded to bf16 once)."""
    rope = None if cos is None else (cos, sin)
    return rms_norm_rope(y, bias, weight, rope, heads=heads, eps=eps, backend="xla")


def parse_configs(spec: str) -> list[RmsRopeConfig]:
    """"2:,1:,2:4" -> warpgroups:stages entries (stages empty: as many as fit)."""
    configs = []
    for item in filter(None, spec.split(",")):
        warpgroups, _, stages = item.partition(":")
        configs.append(RmsRopeConfig(warpgroups=int(warpgroups), stages=int(stages) if stages else None))
    return configs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="1.3b", help=f"models, comma-separated: {', '.join(MODELS)}")
    p.add_argument("--configs", default="", help="extra kernel configs, warpgroups:stages, comma-separated")
    args = p.parse_args()
    configs = [RmsRopeConfig(), *parse_configs(args.configs)]
    rows, failed = [], False
    for model in args.shapes.split(","):
        D, heads = MODELS[model]
        K = D // heads
        keys = jax.random.split(jax.random.key(0), 4)
        bias = 0.1 * jax.random.normal(keys[1], (D,), jnp.float32)
        weight = 1.0 + 0.1 * jax.random.normal(keys[2], (D,), jnp.float32)
        angles = jax.random.uniform(keys[3], (L, K // 2), jnp.float32, maxval=2 * np.pi)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        for B, rope in ((1, True), (2, True), (1, False), (2, False)):
            y = jax.random.normal(keys[0], (B, L, D), jnp.float32).astype(jnp.bfloat16)
            shape = f"{model} {'q/k + RoPE' if rope else 'cross q'} B={B} ({B}×{L}×{D})"
            operands = (y, bias, weight, cos, sin) if rope else (y, bias, weight)
            gbytes = 2 * y.size * 2 / 1e9
            xla = jax.jit(functools.partial(xla_rms_norm_rope, heads=heads, eps=EPS))
            ref = np.asarray(xla(*operands), np.float32)
            t = ms(xla, *operands, calls=20)
            rows.append({"shape": shape, "impl": "XLA", "ms": t, "GB_per_s": gbytes / t * 1e3, "rel_l2_vs_xla": 0.0})
            print(rows[-1], flush=True)
            for config in configs:
                impl = f"kernel warpgroups={config.warpgroups} stages={config.stages or 'fit'}"
                if (reason := unsupported_reason(y, heads, *operands[3:], config=config)) is not None:
                    rows.append({"shape": shape, "impl": impl, "error": reason})
                    print(rows[-1], flush=True)
                    continue
                slots = config.slots(D, heads, rope)
                kernel = jax.jit(functools.partial(rms_norm_rope_mgpu, heads=heads, eps=EPS, config=config))
                out = np.asarray(kernel(*operands), np.float32)
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                failed |= not err <= MAX_REL_L2
                t = ms(kernel, *operands, calls=20)
                rows.append({"shape": shape, "impl": f"{impl} ({slots} slots of {2 * heads // config.warpgroups})",
                             "ms": t, "GB_per_s": gbytes / t * 1e3, "rel_l2_vs_xla": err})
                print(rows[-1], flush=True)
    write_results("rms_rope", rows, header="q/k RMSNorm + RoPE (and the cross-attention q's RMSNorm), bf16 in and "
                  "out, fp32 math; device time, median of 20 calls; GB/s = (read y + write out) / time. Slots: "
                  "half-head chunks of a 64-token row block a warpgroup keeps in shared memory, of those it owns.")
    if failed:
        sys.exit(f"a kernel output differs from XLA's by more than {MAX_REL_L2} (relative L2)")


if __name__ == "__main__":
    main()
