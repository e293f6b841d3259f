"""Compiled memory of the Wan2.1 VAE decode (and optionally encode) at real sizes, without real weights.

Lowers `jax.jit(decode)` for the real config (base_dim 96, dim_mult [1,2,4,4], 2 res-blocks, z 16) with
abstract parameters (`nnx.eval_shape`) and prints XLA's `memory_analysis()` for the backend at hand (CPU here;
GPU buffer assignment differs somewhat, so treat CPU numbers as an estimate).

    .venv/bin/python tools/vae_memory.py                       # 480x832 and 720x1280, 81 frames, bf16 + fp32
    .venv/bin/python tools/vae_memory.py --sizes 480x832 --dtypes bfloat16 --steps 1 2
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from sdjax.models.wan.vae import DTYPES, AutoencoderKLWan, WanVAEConfig

GIB = 1024**3


def decode_memory(cfg: WanVAEConfig, dtype: str, frames: int, height: int, width: int, batch: int = 1,
                  latent_frames_per_step: int = 1, encode: bool = False) -> dict:
    """memory_analysis() of the jitted decode (or encode) for abstract params and inputs, in bytes."""
    jdtype = DTYPES[dtype]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKLWan(cfg, dtype=jdtype)))
    t_lat = 1 + (frames - 1) // cfg.temporal_factor
    s = cfg.spatial_factor
    if encode:
        x = jax.ShapeDtypeStruct((batch, cfg.in_channels, frames, height, width), jdtype)
        fn = lambda st, v: nnx.merge(graphdef, st).encode(v, latent_frames_per_step)  # noqa: E731
    else:
        x = jax.ShapeDtypeStruct((batch, cfg.z_dim, t_lat, height // s, width // s), jdtype)
        fn = lambda st, z: nnx.merge(graphdef, st).decode(z, latent_frames_per_step)  # noqa: E731
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(state, x).compile()
    m = compiled.memory_analysis()
    return {
        "compile_s": time.perf_counter() - t0,
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["480x832", "720x1280"], help="HxW in pixels")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", nargs="+", type=int, default=[1], help="latent_frames_per_step values")
    ap.add_argument("--encode", action="store_true", help="analyse encode instead of decode")
    args = ap.parse_args()
    cfg = WanVAEConfig()  # diffusers defaults = the Wan2.1 VAE
    print(f"backend {jax.default_backend()}, {'encode' if args.encode else 'decode'}, {args.frames} frames")
    print("size       dtype     step  argument  output    temp      arg+temp+out  compile")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for dtype in args.dtypes:
            for step in args.steps:
                r = decode_memory(cfg, dtype, args.frames, h, w, latent_frames_per_step=step,
                                  encode=args.encode)
                arg, out, temp = (r[k] / GIB for k in ("argument", "output", "temp"))
                print(f"{size:10s} {dtype:9s} {step:4d}  {arg:6.2f}G  {out:6.2f}G  {temp:6.2f}G  "
                      f"{arg + temp + out:8.2f}G     {r['compile_s']:5.0f}s", flush=True)


if __name__ == "__main__":
    main()
