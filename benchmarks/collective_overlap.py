"""Do a sequence-parallel forward's collectives run at the same time as its kernels? Read from a profiler trace.

    python benchmarks/collective_overlap.py --layouts c1u1r2,c1u2r1,c1u1r2g [--model wan2.1-t2v-1.3b] [--calls 2]

Per layout (see `sdjax.bench.sharding`; 1.3B 480p/81f, bf16, random weights, the CFG batch), traces a few
forwards with `jax.profiler` and, on each GPU's timeline, measures the union of the collective kernels' intervals
(NCCL's, or peer copies) and how much of it lies under a compute kernel running on another stream — under the
attention kernel especially. `collective_ms` near `exposed_ms` means the transfers run alone: the schedule may put
them beside the attention, but on the device they wait for it (or it for them).
Writes collective_overlap_<card>.{json,md} under $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.common import card_name, write_results
from benchmarks.profile_step import gpu_timelines, kind_of
from sdjax.bench.sharding import Layout, inputs, latent_shape, random_transformer, token_count, transformer_config
from sdjax.numerics import GEMM_COMPILER_OPTIONS

COLLECTIVE = re.compile(r"nccl|memcpy.*(p2p|peer|ptop)", re.I)
COPY = re.compile(r"memcpy|memset", re.I)


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def covered(spans: list[tuple[float, float]], by: list[tuple[float, float]]) -> float:
    """Length of the (merged) `spans` that lies under the (merged) `by`."""
    total, j = 0.0, 0
    for a, b in spans:
        while j < len(by) and by[j][1] <= a:
            j += 1
        k = j
        while k < len(by) and by[k][0] < b:
            total += min(b, by[k][1]) - max(a, by[k][0])
            k += 1
    return total


def overlap(kernels: list[tuple[str, float, float]], calls: int) -> dict:
    """ms a call from one GPU's (kernel name, µs, start µs): the collectives' union, the part under any compute
    kernel, under the attention, and exposed; the attention's and the GEMMs' busy time (`profile_step.kind_of`)."""
    spans = lambda keep: union([(ts, ts + us) for n, us, ts in kernels if keep(n)])
    coll = spans(COLLECTIVE.search)
    compute = spans(lambda n: not COLLECTIVE.search(n) and not COPY.search(n))
    attn = spans(lambda n: kind_of(n) == "attention")
    gemm = spans(lambda n: kind_of(n) == "gemm")
    length = lambda merged: sum(b - a for a, b in merged) / calls / 1e3
    under = covered(coll, compute) / calls / 1e3
    names = collections.Counter()
    for n, us, _ in kernels:
        if COLLECTIVE.search(n):
            names[re.sub(r"\(.*", "", n)[:60]] += us / calls / 1e3
    return {"collective_ms": length(coll), "under_compute_ms": under,
            "under_attention_ms": covered(coll, attn) / calls / 1e3, "exposed_ms": length(coll) - under,
            "compute_ms": length(compute), "attention_ms": length(attn), "gemm_ms": length(gemm),
            "top": ", ".join(f"{n} {ms:.1f}" for n, ms in names.most_common(3))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="c1u1r1,c1u1r2,c1u2r1,c1u1r2g")
    p.add_argument("--model", default="wan2.1-t2v-1.3b")
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    from sdjax.config import SystemConfig
    from sdjax.sharding import make_mesh, put_replicated

    cfg = transformer_config(args.model)
    shape = latent_shape(480, 832, 81)
    host = inputs(cfg, shape, batch=2, text_len=512)
    rows = []
    for spec in args.layouts.split(","):
        lay = Layout.parse(spec)
        mesh = None if lay.devices == 1 else make_mesh(
            SystemConfig(cfg_parallel=lay.cfg, ulysses=lay.ulysses, ring=lay.ring), jax.devices()[: lay.devices])
        model = random_transformer(cfg, "bfloat16", "auto", mesh, kv_exchange=lay.kv_exchange)
        x, t, c = (jax.device_put(a, jax.devices()[0]) if mesh is None else put_replicated(a, mesh) for a in host)
        forward = jax.jit(lambda m, x, t, c: m(x, t, c), compiler_options=GEMM_COMPILER_OPTIONS)
        compiled = forward.lower(model, x, t, c).compile()
        jax.block_until_ready(compiled(model, x, t, c))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(model, x, t, c))
            times.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                for _ in range(args.calls):
                    jax.block_until_ready(compiled(model, x, t, c))
            lines = gpu_timelines(Path(tmp))
        for device, kernels in sorted(lines.items()):
            row = {"layout": lay.name, "device": device, "ms": sorted(times)[1] * 1e3,
                   "tokens": token_count(cfg, shape), **overlap(kernels, args.calls)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, compiled
    write_results(f"collective_overlap{args.tag}", rows,
                  f"{args.model} 480p/81f CFG batch, bf16, random weights; `ms`: host-timed forward (median of 3); "
                  f"the rest per GPU timeline, ms a forward ({args.calls} traced); card {card_name()}; "
                  f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


if __name__ == "__main__":
    main()
