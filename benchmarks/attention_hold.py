"""How often our Hopper kernel's held maxima (`frozen_max`) apply to a trained model's self-attention.

    python benchmarks/attention_hold.py               # CPU or GPU: the demo model's trained weights, 8 prompts
    python benchmarks/attention_hold.py --model DIR   # a diffusers-format checkpoint directory (e.g. Wan2.1)

The kernel fixes a warpgroup's row maxima after the first key block where every row's Cauchy–Schwarz bound
|q_i| · max_j |k_j| is within FROZEN_MAX_SLACK (log2 units) of its first block's maximum; where
not, it keeps the online maximum: 10.6-10.75 ms against the held 9.45-9.64 at Wan-1.3B 480p on an H200
(benchmarks/NOTES.md, session 19).
Random weights always hold; this measures trained ones. Every self-attention call of whole generations (all
steps and layers, exact attention, no feature cache) goes through `flash_mgpu.held_max_slack` — the test as the
kernel computes it, per tile of block_q rows — and the script reports the share of tiles held and the slack's
quantiles. Writes benchmarks/results/attention_hold_<model>_<device>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.attention_quality import self_attention_replaced  # noqa: E402
from benchmarks.cache import DEMO_PROMPTS  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from sdjax.kernels import flash_mgpu  # noqa: E402

HOLD_LIMIT = flash_mgpu.FROZEN_MAX_SLACK


def summary(slacks: list[np.ndarray]) -> dict:
    """Share of tiles held and the slack's quantiles (log2 units) over every recorded call."""
    s = np.concatenate([x.ravel() for x in slacks])
    return {"calls": len(slacks), "tiles": s.size, "held_share": float((s <= HOLD_LIMIT).mean()),
            **{f"slack_p{q}": float(np.percentile(s, q)) for q in (50, 90, 99)}, "slack_max": float(s.max())}


def record_slacks(pipe, prompts, **call_kw) -> list[np.ndarray]:
    """Generate each prompt (exact attention); return the hold test's per-tile slack of every self-attention call."""
    slacks = []

    def attend(q, k, v, kv_len, exact):
        jax.debug.callback(lambda s: slacks.append(np.asarray(s)), flash_mgpu.held_max_slack(q, k))
        return exact(q, k, v, kv_len)

    with self_attention_replaced(attend):
        for i, prompt in enumerate(prompts):
            pipe(prompt, seed=i, **call_kw)
    return slacks


def main():
    from sdjax.config import SystemConfig
    from sdjax.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a diffusers-format checkpoint directory (default: the embedded demo model)")
    ap.add_argument("--prompts", type=int, default=len(DEMO_PROMPTS), help="how many of the demo prompts")
    ap.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    a = ap.parse_args()
    system = SystemConfig(attention_backend="xla")
    pipe = Pipeline.from_pretrained(a.model, system=system) if a.model else Pipeline.default(system=system)
    kw = dict(progress=False, cache={"policy": "none", "threshold": 0.0})
    if a.steps:
        kw["num_inference_steps"] = a.steps
    row = {"model": pipe.config.name, "limit": HOLD_LIMIT,
           **summary(record_slacks(pipe, DEMO_PROMPTS[: a.prompts], **kw))}
    write_results(f"attention_hold_{pipe.config.name}", [row],
                  "The held-maxima test (`flash_mgpu.held_max_slack`, tiles of block_q query rows) over every "
                  "self-attention call of whole generations with exact attention: share of tiles whose slack "
                  f"(b - m0, log2 units) is <= {HOLD_LIMIT:g}, and the slack's quantiles; device "
                  f"{jax.devices()[0].device_kind}.")


if __name__ == "__main__":
    main()
