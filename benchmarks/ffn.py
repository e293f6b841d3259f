"""The FFN's fc1 + bias + GELU: XLA (cuBLAS GEMM, then a fusion) against our epilogue-fused Hopper GEMM.

    python benchmarks/ffn.py [--configs 128x128x3,128x64x4,64x128x4] [--no-forward]

At Wan's FFN shapes (1.3B: 1,536 → 8,960; 14B: 5,120 → 13,824; 32,760 tokens, and 65,520 for batched CFG),
checks the fused kernel against XLA (relative L2) and times: fc1 + bias + GELU alone per backend and kernel
config (`block_m x block_n x stages`), the whole FFN (fc1 → GELU → fc2), and the 1.3B 480p DiT forward with
`fused_backend` xla vs auto, in the same process. Device-timed (the kernels' own time, benchmarks/gemm.py).
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import parse_xla_options, random_like, write_results
from benchmarks.dit_step import TEXT_LEN
from benchmarks.gemm import ms as device_ms
from sdjax.config import ModelConfig
from sdjax.kernels.dense import gelu_dense
from sdjax.kernels.gelu_dense_mgpu import GeluDenseConfig, gelu_dense_mgpu
from sdjax.models.wan.loading import abstract_transformer
from sdjax.models.wan.transformer import WanTransformerConfig

SHAPES = {"1.3b": (1536, 8960), "14b": (5120, 13824)}


def ms(fn, *args) -> float:
    return device_ms(jax.jit(fn), *args)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="128x128x3,128x128x2,64x128x4",
                   help="block_m x block_n x stages")
    p.add_argument("--cases", default="1.3b-32760,1.3b-65520,14b-32760")
    p.add_argument("--no-forward", action="store_true")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="also time the XLA fc1 compiled with these options (e.g. xla_gpu_enable_cublaslt=true: "
                        "bias + GELU in cuBLASLt's epilogue)")
    args = p.parse_args()
    configs = {c: GeluDenseConfig(block_m=int(c.split("x")[0]), block_n=int(c.split("x")[1]),
                                  stages=int(c.split("x")[2]))
               for c in args.configs.split(",")}
    rows = []
    for case in args.cases.split(","):
        size, M = case.split("-")
        K, N = SHAPES[size]
        kx, kw, kb, k2 = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(kx, (int(M), K), jnp.bfloat16)
        w = (jax.random.normal(kw, (K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
        b = (0.1 * jax.random.normal(kb, (N,))).astype(jnp.bfloat16)
        w2 = (jax.random.normal(k2, (N, K), jnp.float32) / np.sqrt(N)).astype(jnp.bfloat16)
        tflop = 2 * int(M) * K * N / 1e12
        ref = np.asarray(jax.jit(lambda x, w, b: gelu_dense(x, w, b, backend="xla"))(x, w, b), np.float32)
        base = ms(lambda x, w, b: gelu_dense(x, w, b, backend="xla"), x, w, b)
        rows.append({"case": case, "what": "fc1 + bias + GELU, xla", "ms": base, "TFLOP_per_s": tflop / base * 1e3})
        if options := parse_xla_options(args.xla_option):
            xla = lambda x, w, b: gelu_dense(x, w, b, backend="xla")
            compiled = jax.jit(xla).lower(x, w, b).compile(compiler_options=options)
            t = device_ms(compiled, x, w, b)
            out = np.asarray(compiled(x, w, b), np.float32)
            rows.append({"case": case, "what": f"fc1 + bias + GELU, xla with {' '.join(args.xla_option)}", "ms": t,
                         "TFLOP_per_s": tflop / t * 1e3, "speedup": base / t,
                         "rel_l2_vs_xla": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                         "gemm_epilogue": ",".join(sorted(set(re.findall(r'"epilogue":"(\w+)"', compiled.as_text()))))})
        for name, cfg in configs.items():
            try:
                fn = lambda x, w, b, cfg=cfg: gelu_dense_mgpu(x, w, b, config=cfg)
                out = np.asarray(jax.jit(fn)(x, w, b), np.float32)
                t = ms(fn, x, w, b)
                rows.append({"case": case, "what": f"fc1 + bias + GELU, fused {name}", "ms": t,
                             "TFLOP_per_s": tflop / t * 1e3, "speedup": base / t,
                             "rel_l2_vs_xla": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))})
            except Exception as e:  # a config that does not fit shared memory is reported, not fatal
                rows.append({"case": case, "what": f"fused {name}", "error": f"{type(e).__name__}: {str(e)[:90]}"})
            print(rows[-1], flush=True)
        for backend in ("xla", "pallas_mgpu"):
            t = ms(lambda x, w, b, w2, backend=backend: gelu_dense(x, w, b, backend=backend) @ w2, x, w, b, w2)
            rows.append({"case": case, "what": f"whole FFN (fc1 → GELU → fc2), {backend}", "ms": t,
                         "TFLOP_per_s": 2 * tflop / t * 1e3})
            print(rows[-1], flush=True)
    if not args.no_forward:
        cfg = WanTransformerConfig.from_dict(ModelConfig.named("wan2.1-t2v-1.3b").transformer)
        x = jax.random.normal(jax.random.key(1), (1, 16, 21, 60, 104), jnp.float32)
        t, ctx = jnp.full((1,), 500.0), jax.random.normal(jax.random.key(2), (1, TEXT_LEN, cfg.text_dim))
        outs = {}
        for fused_backend in ("xla", "auto"):
            model = random_like(abstract_transformer(cfg, "bfloat16", "auto", fused_backend=fused_backend))
            fwd = jax.jit(lambda m, x, t, c: m(x, t, c))
            outs[fused_backend] = np.asarray(fwd(model, x, t, ctx), np.float32)
            rows.append({"case": "1.3b-480p-b1", "what": f"DiT forward, fused_backend={fused_backend}",
                         "ms": ms(lambda m, x, t, c: m(x, t, c), model, x, t, ctx)})
            print(rows[-1], flush=True)
            del model
        diff = np.linalg.norm(outs["auto"] - outs["xla"]) / np.linalg.norm(outs["xla"])
        rows[-1]["rel_l2_vs_xla"] = float(diff)
    write_results("ffn", rows, "fc1 + bias + tanh-GELU: XLA vs our epilogue-fused Mosaic GPU GEMM; bf16, random "
                               "inputs; config = block_m (per compute warpgroup) x block_n x stages; device time.")


if __name__ == "__main__":
    main()
