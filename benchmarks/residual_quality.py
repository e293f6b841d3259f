"""What storing the DiT's residual stream in bf16 costs in output quality, on trained weights.

    python benchmarks/residual_quality.py            # CPU: the demo model, 8 prompts, PSNR / SSIM

The same prompts and seeds through the pipeline three ways: all fp32 (the reference), bf16 with the residual
stream in fp32 (the original Wan's placement) and bf16 with the stream in bf16 (diffusers' placement,
`SystemConfig.residual_dtype`). Frames of both bf16 runs against the fp32 ones, and against each other.
Writes benchmarks/results/residual_quality_<model>_<device>.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.cache import DEMO_PROMPTS, psnr, ssim  # noqa: E402
from benchmarks.common import write_results  # noqa: E402


def main():
    from sdjax.config import SystemConfig
    from sdjax.pipeline import Pipeline

    kw = dict(progress=False, cache={"policy": "none", "threshold": 0.0})
    frames = {}
    for name, dtype, residual in (("fp32", "float32", "float32"), ("bf16, fp32 stream", "bfloat16", "float32"),
                                  ("bf16, bf16 stream", "bfloat16", "bfloat16")):
        pipe = Pipeline.default(system=SystemConfig(dtype=dtype, residual_dtype=residual), dtype=dtype)
        frames[name] = [pipe(p, seed=i, **kw).frames for i, p in enumerate(DEMO_PROMPTS)]
    rows = []
    for run, ref in (("bf16, fp32 stream", "fp32"), ("bf16, bf16 stream", "fp32"),
                     ("bf16, bf16 stream", "bf16, fp32 stream")):
        mine = [{"run": run, "against": ref, "prompt": p, "psnr_dB": psnr(a, b), "ssim": ssim(a, b)}
                for p, a, b in zip(DEMO_PROMPTS, frames[run], frames[ref], strict=True)]
        mean = {key: float(np.mean([r[key] for r in mine])) for key in ("psnr_dB", "ssim")}
        rows += [*mine, {"run": run, "against": ref, "prompt": "(mean)", **mean}]
    pipe_name = pipe.config.name
    write_results(f"residual_quality_{pipe_name}", rows,
                  "Frames of the bf16 pipeline with the DiT's residual stream in fp32 or bf16 against the fp32 "
                  "pipeline (same prompt, seed, default steps, no cache), the demo model's trained weights; device "
                  f"{jax.devices()[0].device_kind}.")


if __name__ == "__main__":
    main()
