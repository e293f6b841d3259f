"""Clock, power and energy per FLOP of the Wan-1.3B 480p B=1 forward's big kernels, each looped back to back.

    python benchmarks/kernel_power.py [--seconds 3] [--only attention,fc1_gelu,...,forward] [--tag T]
    python benchmarks/kernel_power.py --only attention --attention-variants 'mgpu:64,128,2,0,1,4,1,1,1;...'

Why: under sustained load the cards run at their 700 W cap (nvidia-smi's throttle reason: software power cap),
so a kernel's speed there is its energy per FLOP as much as its schedule. Each kernel runs alone at the forward's
shapes (32,760 tokens, bf16, `GEMM_COMPILER_OPTIONS` as the model compiles them): a second of calls to reach the
cap, then `--seconds` more while nvidia-smi samples the SM clock and board power. Reported: ms a call (host
clock over the whole loop: dispatch is asynchronous, so the device stays busy for calls of ≳ 0.5 ms), TFLOP/s,
mean clock and power, joules a call and picojoules a FLOP, and the tensor cores' share of their peak at the
measured clock (4,096 bf16 FLOP a clock an SM). `copy` is a memory-bound reference (TB/s instead of FLOPs);
`forward` the whole B=1 forward the same way (its steady state under the cap, where dit_step.py times 5 calls
from a cool card). `--attention-variants` adds rows for variants of our exact kernel (benchmarks/attention.py's
syntax), each with its output's largest difference from the default's: short timings rank them at a cool card's
clock, these at the cap.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks.attention import _make_fn
from benchmarks.common import GpuSampler, write_results
from sdjax.kernels.attention import attention
from sdjax.numerics import GEMM_COMPILER_OPTIONS

TOKENS, DIM, FFN, HEADS, HEAD_DIM = 32760, 1536, 8960, 12, 128  # Wan-1.3B at 480p, 81 frames
KERNELS = ("attention", "qkv", "projection", "fc1_gelu", "fc1_no_gelu", "fc2_stream", "copy")


def kernels():
    """name -> (jitted fn, args, FLOP a call, bytes a call) of the forward's big kernels alone."""
    keys = iter(jax.random.split(jax.random.key(0), 12))

    def rnd(shape, scale=1.0):
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(jnp.bfloat16)

    S, D, F = TOKENS, DIM, FFN
    x, h = rnd((S, D)), rnd((S, F))
    w_qkv, w_o, w1, w2 = rnd((D, 3 * D), 0.02), rnd((D, D), 0.02), rnd((D, F), 0.02), rnd((F, D), 0.02)
    b_qkv, b_o, b1 = rnd((3 * D,), 0.02), rnd((D,), 0.02), rnd((F,), 0.02)
    q, k, v = (rnd((1, S, HEADS, HEAD_DIM)) for _ in range(3))
    gemm = lambda fn: jax.jit(fn, compiler_options=GEMM_COMPILER_OPTIONS)
    linear = gemm(lambda x, w, b: x @ w + b)
    return {
        "attention": (jax.jit(lambda q, k, v: attention(q, k, v)), (q, k, v), 4 * S * S * HEADS * HEAD_DIM, 0),
        "qkv": (linear, (x, w_qkv, b_qkv), 2 * S * D * 3 * D, 0),
        "projection": (linear, (x, w_o, b_o), 2 * S * D * D, 0),
        "fc1_gelu": (gemm(lambda x, w, b: jax.nn.gelu(x @ w + b, approximate=True)), (x, w1, b1), 2 * S * D * F, 0),
        "fc1_no_gelu": (linear, (x, w1, b1), 2 * S * D * F, 0),
        "fc2_stream": (gemm(lambda h, w, b, x: (h @ w + b) + x), (h, w2, b_o, x), 2 * S * D * F, 0),
        "copy": (jax.jit(lambda h: h * 2), (h,), 0, 2 * h.size * h.dtype.itemsize),
    }


def forward():
    """The whole Wan-1.3B 480p B=1 forward, as benchmarks/dit_step.py times it (random weights, 512 text tokens)."""
    from benchmarks.dit_step import flops, random_forward_inputs
    from sdjax.config import ModelConfig
    from sdjax.models.wan.transformer import WanTransformerConfig

    cfg = WanTransformerConfig.from_dict(ModelConfig.named("wan2.1-t2v-1.3b").transformer)
    fn = jax.jit(lambda m, x, t, c: m(x, t, c), compiler_options=GEMM_COMPILER_OPTIONS)
    return fn, random_forward_inputs(cfg, (21, 60, 104), 1), flops(cfg, TOKENS, 1), 0


def loop(fn, args, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)  # each output is dropped as the next is dispatched: memory stays flat
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def measure(fn, args, flop, nbytes, seconds):
    jax.block_until_ready(fn(*args))
    per_call = loop(fn, args, 3) / 3
    loop(fn, args, max(3, int(1.0 / per_call)))  # reach the power cap
    calls = max(10, int(seconds / per_call))
    with GpuSampler(period_ms=50) as gpu:
        s = loop(fn, args, calls) / calls
    row = {"ms": s * 1e3}
    if flop:
        row["TFLOP/s"] = flop / s / 1e12
    if nbytes:
        row["TB/s"] = nbytes / s / 1e12
    g = gpu.summary()
    if g:
        row.update(MHz=g["sm_clock_MHz"], W=g["power_W"], J_per_call=g["power_W"] * s)
        if flop:
            row["pJ_per_FLOP"] = g["power_W"] * s / flop * 1e12
            sms = jax.devices()[0].core_count
            row["tensor_share"] = flop / s / (4096 * sms * g["sm_clock_MHz"] * 1e6)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--only", help="comma-separated workload names (default: all)")
    p.add_argument("--attention-variants", default="", help="semicolon-separated benchmarks/attention.py kernel "
                   "variants (mgpu:bq,bkv,stages,...), each measured like `attention`")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    names = args.only.split(",") if args.only else [*KERNELS, "forward"]
    if unknown := set(names) - {*KERNELS, "forward"}:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join([*KERNELS, 'forward'])}")
    work = kernels()
    rows = []
    for name in names:
        row = {"kernel": name, **measure(*(forward() if name == "forward" else work[name]), args.seconds)}
        rows.append(row)
        print(row, flush=True)
    default_fn, qkv, flop, _ = work["attention"]
    reference = jax.block_until_ready(default_fn(*qkv)) if args.attention_variants else None
    for spec in filter(None, args.attention_variants.split(";")):
        fn = _make_fn(spec, kv_len_given=False)
        diff = jnp.abs(fn(*qkv).astype(jnp.float32) - reference.astype(jnp.float32)).max()
        row = {"kernel": f"attention {spec}", "max_abs_diff_vs_default": float(diff),
               **measure(fn, qkv, flop, 0, args.seconds)}
        rows.append(row)
        print(row, flush=True)
    write_results("kernel_power" + (f"_{args.tag}" if args.tag else ""), rows,
                  f"Each kernel looped {args.seconds:g} s after 1 s of warm-up; Wan-1.3B 480p B=1 shapes, bf16; "
                  "clock and power sampled by nvidia-smi every 50 ms.")


if __name__ == "__main__":
    main()
