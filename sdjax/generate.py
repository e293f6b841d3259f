"""`python -m sdjax.generate --prompt "…" --out video.mp4`: one video from the command line.

Without --model it uses the embedded demo model. Prints a progress bar over the denoising steps and a
per-stage timing summary; writes MP4 (H.264, yuv420p) or PNG when --frames is 1.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from sdjax.config import ATTENTION_BACKEND_HELP, CACHE_POLICIES, RESIDUAL_DTYPE_HELP


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdjax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers-format Wan root (default: the embedded demo model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the model's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="num_frames, 4k+1 (1 writes a PNG)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default: the model's)")
    p.add_argument("--solver", default=None, choices=["unipc", "euler"])
    p.add_argument("--cache", default=None, choices=CACHE_POLICIES,
                   help="feature-cache policy (default: the model's)")
    p.add_argument("--cache-threshold", type=float, default=None,
                   help="the policy's threshold (default: the model's recommended one for the policy)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 for the demo model, bfloat16 otherwise")
    p.add_argument("--residual-dtype", default=None, choices=["float32", "bfloat16"], help=RESIDUAL_DTYPE_HELP)
    p.add_argument("--attention-backend", default="auto",
                   help=ATTENTION_BACKEND_HELP)
    p.add_argument("--compile-cache-dir", default=None,
                   help="JAX persistent compilation cache: a second run with the same shapes compiles in seconds")
    p.add_argument("--out", default=None, help="output path (.mp4 or .png); default outputs/<seed>.mp4")
    from sdjax.sharding.launch import add_args

    add_args(p)  # --cfg-parallel / --ulysses / --ring and the multi-host flags
    return p.parse_args(argv)


def _cache_arg(args) -> dict | None:
    cache = {"policy": args.cache, "threshold": args.cache_threshold}
    return {k: v for k, v in cache.items() if v is not None} or None


def main(argv=None) -> int:
    args = parse_args(argv)
    from sdjax import media
    from sdjax.config import ConfigError, SystemConfig
    from sdjax.models.weights import WeightsError
    from sdjax.pipeline import Pipeline
    from sdjax.sharding.launch import initialize_from_args, layout_kwargs

    try:
        if initialize_from_args(args) and args.seed is None:
            from sdjax.sharding.multihost import broadcast

            args.seed = broadcast(secrets.randbits(31))  # every host must draw the same noise
        system = SystemConfig(dtype=args.dtype or ("float32" if args.model is None else "bfloat16"),
                              residual_dtype=args.residual_dtype, attention_backend=args.attention_backend,
                              compile_cache_dir=args.compile_cache_dir,
                              weights=args.model,
                              **layout_kwargs(args))
        system.apply_to_runtime()
        pipe = (Pipeline.default(system=system, dtype=system.dtype) if args.model is None
                else Pipeline.from_pretrained(args.model, system=system))
        result = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                      width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, seed=args.seed, flow_shift=args.shift, solver=args.solver,
                      cache=_cache_arg(args), output_type="uint8")  # what the file holds, rounded on the device
    except (ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    frames = result.frames
    out = Path(args.out or f"outputs/{result.info['seed']}.{'png' if len(frames) == 1 else 'mp4'}")
    if len(frames) == 1 and out.suffix.lower() == ".mp4":
        out = out.with_suffix(".png")
    from sdjax.sharding.multihost import is_leader

    if not is_leader():
        return 0  # every host computed the video; process 0 writes it
    path = media.save(frames, out, fps=pipe.config.defaults.fps, metadata=result.info["params"])
    t = result.info["timings"]
    computed = result.info["steps_computed"]
    steps = computed + result.info["steps_skipped"]
    print(f"text encode {t['text_encode_s']:.2f} s | denoise {t['denoise_s']:.2f} s ({computed} of {steps} steps "
          f"computed) | decode {t['decode_s']:.2f} s")
    print(f"wrote {path.resolve()} ({len(frames)} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"seed {result.info['seed']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
