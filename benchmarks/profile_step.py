"""Where a Wan DiT forward spends its GPU time: kernels grouped by kind, from a profiler trace.

    python benchmarks/profile_step.py [--model wan2.1-t2v-1.3b] [--res 480p] [--batch 1]

Traces a few forwards (bf16, random weights) with `jax.profiler`, reads the Perfetto trace it writes, and
sums device time per kernel: attention (our Pallas kernel or cuDNN), GEMMs (cuBLAS / cuBLASLt), XLA fusions
(element-wise and reductions: norms, modulation, RoPE, GELU, residuals) and the rest. Writes the table and
the optimised HLO (to map fusion names to what they compute) next to the other results.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import RESULTS, card_name, random_like, write_results
from benchmarks.dit_step import RES, TEXT_LEN
from sdjax.config import ModelConfig
from sdjax.models.wan.loading import abstract_transformer
from sdjax.models.wan.transformer import WanTransformerConfig

KINDS = (  # first match wins; kernel names as the profiler reports them
    ("attention", re.compile(r"mosaic|flash|attention|fmha|cudnn|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|cublas|sm90_|nvjet|triton_gemm", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|transpose|convert|copy|concatenate|slice", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def device_kernels(trace_dir: Path) -> list[tuple[str, float]]:
    """(kernel name, µs) for every GPU event of the Perfetto trace under `trace_dir`."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and re.search(r"GPU|device", str(e.get("args", {}).get("name", "")), re.I)
                and "host" not in str(e.get("args", {}).get("name", "")).lower()}
    if not gpu_pids:
        names = [e.get("args", {}).get("name") for e in events if e.get("name") == "process_name"]
        raise SystemExit(f"no device timeline in the trace (processes: {names}); this script needs a GPU")
    return [(e["name"], float(e["dur"])) for e in events
            if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="wan2.1-t2v-1.3b")
    p.add_argument("--res", default="480p", choices=sorted(RES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--forwards", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--backend", default="auto", help="attention backend")
    args = p.parse_args()
    cfg = WanTransformerConfig.from_dict(ModelConfig.named(args.model).transformer)
    h, w = RES[args.res]
    model = random_like(abstract_transformer(cfg, "bfloat16", args.backend))
    key = jax.random.key(1)
    x = jax.random.normal(key, (args.batch, 16, 21, h // 8, w // 8), jnp.float32)
    t = jnp.full((args.batch,), 500.0)
    ctx = jax.random.normal(key, (args.batch, TEXT_LEN, cfg.text_dim), jnp.float32)
    compiled = jax.jit(lambda m, x, t, c: m(x, t, c)).lower(model, x, t, ctx).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(model, x, t, ctx))

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.forwards):
                jax.block_until_ready(compiled(model, x, t, ctx))
        kernels = device_kernels(Path(tmp))
    per_name = collections.defaultdict(lambda: [0.0, 0])
    for name, us in kernels:
        per_name[name][0] += us / args.forwards / 1e3
        per_name[name][1] += 1
    per_kind = collections.Counter()
    for name, (ms, _) in per_name.items():
        per_kind[kind_of(name)] += ms
    total = sum(per_kind.values())
    rows = [{"kind": k, "name": "(all)", "ms_per_forward": ms, "share": ms / total} for k, ms in per_kind.most_common()]
    for name, (ms, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
        rows.append({"kind": kind_of(name), "name": name[:90], "ms_per_forward": ms, "share": ms / total,
                     "calls_per_forward": n / args.forwards})
    stem = f"profile_{args.model}_{args.res}_b{args.batch}" + ("" if args.backend == "auto" else f"_{args.backend}")
    write_results(stem, rows, f"Device time per forward by kernel, {args.forwards} forwards traced; total "
                              f"{total:.1f} ms of kernels (bf16, random weights).")
    out_dir = Path(os.environ.get("OUT") or RESULTS)
    card = card_name().split(" x")[0].replace(" ", "_")
    (out_dir / f"{stem}_{card}_hlo.txt.gz").write_bytes(gzip.compress(compiled.as_text().encode()))


if __name__ == "__main__":
    main()
