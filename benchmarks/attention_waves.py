"""Does the exact attention kernel's time follow whole waves of CTAs, or the work?

    python benchmarks/attention_waves.py [--batches 1,2] [--rows 32760,32256,33792] [--tag X]

Keys fixed at Wan-1.3B 480p's 32,760 (12 heads x 128); the query rows vary. Every CTA does the same work (all keys),
so if the kernel runs in waves its time is ceil(clusters / cluster slots) x a wave's time, else it is proportional
to the rows. The report lists both predictions, scaled from the first row count's time, beside each measurement.
Variants run interleaved, twice, so the card's clock drift hits all of them alike.
"""

from __future__ import annotations

import argparse
import math
import statistics

import jax
import jax.numpy as jnp

from benchmarks.attention import _time
from benchmarks.common import card_name, write_results
from sdjax.kernels import flash_mgpu


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--rows", default="32760,32256,33792")
    parser.add_argument("--keys", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = [int(t) for t in args.rows.split(",")]
    S, N, H = args.keys, args.heads, 128
    config = flash_mgpu.default_config(S)
    sms = jax.devices()[0].core_count
    slots = sms // config.cluster  # clusters resident at once: one CTA an SM (registers, shared memory)
    rows_per_cluster = 2 * config.block_q * config.cluster

    key = jax.random.key(0)
    kk, kv = jax.random.split(key)
    fn = jax.jit(flash_mgpu.flash_attention_mgpu)
    times = {}
    for _ in range(2):
        for B in batches:
            k = jax.random.normal(kk, (B, S, N, H), jnp.bfloat16)
            v = jax.random.normal(kv, (B, S, N, H), jnp.bfloat16)
            for T in rows:
                q = jax.random.normal(jax.random.fold_in(key, T), (B, T, N, H), jnp.bfloat16)
                times.setdefault((B, T), []).extend(_time(fn, (q, k, v)))
    out = []
    for B in batches:
        T0 = rows[0]
        t0 = statistics.median(times[(B, T0)])
        clusters0 = B * N * math.ceil(T0 / rows_per_cluster)
        for T in rows:
            clusters = B * N * math.ceil(T / rows_per_cluster)
            ms = statistics.median(times[(B, T)])
            out.append(dict(
                batch=B, rows=T, keys=S, clusters=clusters, waves=round(clusters / slots, 3),
                ms=round(ms, 4), spread=round(max(times[(B, T)]) - min(times[(B, T)]), 4),
                ms_if_waves=round(t0 * math.ceil(clusters / slots) / math.ceil(clusters0 / slots), 4),
                ms_if_work=round(t0 * T / T0, 4),
                tflops=round(4 * B * N * T * S * H / ms / 1e9, 1)))
    header = (f"{card_name()}, {sms} SMs, {slots} cluster slots of {config.cluster} CTA(s), {rows_per_cluster} query "
              f"rows a cluster; config {config}; bf16, {N} heads x {H}. ms: median of 10 timings of many back-to-back "
              f"calls; ms_if_waves / ms_if_work: the first row count's time scaled by whole waves / by rows.")
    write_results(f"attention_waves{'_' + args.tag if args.tag else ''}", out, header)  # (prints the table too)


if __name__ == "__main__":
    main()
