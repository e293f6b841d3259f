"""The service's start-up compile: `Pipeline.warmup` with its variants compiled side by side, and one at a time.

    python benchmarks/warmup.py [--model PATH] [--dtype bfloat16] [--height 480 --width 832 --frames 81]

Each mode runs in a fresh process (nothing compiled yet, no persistent compilation cache), the side-by-side one
first. "one at a time" gives the warm-up a pool of one worker: the compile order of the sessions before the pool.
Without --model: the embedded demo model at its default size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import write_results

MODES = ("side_by_side", "one_at_a_time")


def worker(mode: str, model: str | None, dtype: str | None, size: dict) -> dict:
    import os

    import sdjax.pipeline as pipeline_module
    from sdjax.pipeline import Pipeline

    cpus = os.cpu_count()
    if mode == "one_at_a_time":  # the pool sizes itself by the CPU count
        pipeline_module.os.cpu_count = lambda: 1
    if model is None:
        dtype = dtype or "float32"
        pipe = Pipeline.default(dtype=dtype)
    else:
        pipe = Pipeline.from_pretrained(model, dtype)
        dtype = dtype or pipe.system.dtype
    params = pipe.user_params(prompt="warm up", **size)
    t0 = time.perf_counter()
    phases = pipe.warmup(params)
    return {"mode": mode, "model": pipe.config.name, "dtype": dtype,
            "size": f"{params.width}x{params.height}x{params.num_frames}", "warmup_s": time.perf_counter() - t0,
            "cpus": cpus, **phases}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="a diffusers-format Wan root (default: the embedded demo model)")
    p.add_argument("--dtype")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--repeats", type=int, default=1, help="alternate the two modes this many times")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    size = {k: v for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.frames)) if v}
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model, args.dtype, size)), flush=True)
        return
    rows = []
    for mode in MODES * args.repeats:
        cmd = [sys.executable, "-m", "benchmarks.warmup", "--worker", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
        print(rows[-1], flush=True)
    write_results("warmup" + (f"_{args.tag}" if args.tag else ""), rows,
                  "Pipeline.warmup (every solver, cache policy and text form compiled, each run one step, then the "
                  "decode), a fresh process per mode.")


if __name__ == "__main__":
    main()
