"""Wan VAE decode on one GPU: sdjax (fp32 / bf16, latent frames per scan step) against diffusers.

    python benchmarks/vae_decode.py [--sizes 480x832,720x1280] [--per-step 1,3] [--layouts nhwc,xla] [--no-diffusers]
                                    [--transfer [--devices 1,2]]

Random weights (real architecture), 81 frames (21 latent frames). Reports seconds and peak memory.
`--transfer`: the pipeline's decode to frames (`jit_decode_frames`) with the frames copied to the host as float32
(what `Pipeline.decode` returns), against the device time alone, the program writing them to pinned host memory,
and smaller host copies (uint8, float16).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for the torch side

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.common import random_like, timed, torch_timing, write_results
from sdjax.config import ModelConfig, SystemConfig
from sdjax.models.wan.vae import COMPILER_OPTIONS, AutoencoderKLWan, WanVAEConfig
from sdjax.pipeline import jit_decode_frames
from sdjax.sharding import AXES, make_mesh
from sdjax.sharding.vae import shard_vae


def bench_transfer(cfg, h, w, devices: int = 1) -> list[dict]:
    """Seconds of the pipeline's decode to frames: on the device alone, and with the frames copied to the host.
    `devices` > 1: the decode split over that many GPUs (the pipeline's on a mesh), and its frames gathered on the
    devices first (one replicated array) against the host assembling them from the split."""
    mesh = None if devices == 1 else make_mesh(SystemConfig(ulysses=devices), jax.devices()[:devices])
    vae = shard_vae(random_like(nnx.eval_shape(lambda: AutoencoderKLWan(cfg, dtype=jnp.bfloat16)), scale=0.05),
                    mesh)
    z = jax.random.normal(jax.random.key(0), (1, cfg.z_dim, 21, h // 8, w // 8), jnp.float32)
    frames = jit_decode_frames(mesh)
    frames_u8 = jit_decode_frames(mesh, "uint8")
    ways = {
        "device only": lambda: jax.block_until_ready(frames(vae, z)),
        "float32 to host (output_type np)": lambda: np.asarray(frames(vae, z)),
        "uint8 to host (output_type uint8: the CLI's and the service's)": lambda: np.asarray(frames_u8(vae, z)),
    }
    if mesh is None:
        pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
        frames_pinned = jax.jit(frames.__wrapped__, compiler_options=COMPILER_OPTIONS, out_shardings=pinned)
        as_f16 = jax.jit(lambda f: f.astype(jnp.float16))
        ways["float32, the program's output in pinned host memory"] = lambda: np.asarray(frames_pinned(vae, z))
        ways["float16 to host, then float32"] = lambda: np.asarray(as_f16(frames(vae, z))).astype(np.float32)
        other = "float32, the program's output in pinned host memory"
    else:
        gathered = jax.jit(frames.__wrapped__, compiler_options=COMPILER_OPTIONS,
                           out_shardings=NamedSharding(mesh, PartitionSpec()))
        by_frame = jax.jit(lambda v, z: jax.lax.with_sharding_constraint(
            frames.__wrapped__(v, z), NamedSharding(mesh, PartitionSpec(AXES))), compiler_options=COMPILER_OPTIONS)
        ways["float32 gathered on the devices, then to host"] = lambda: np.asarray(gathered(vae, z))
        ways["float32 split over frames on the devices, then to host"] = lambda: np.asarray(by_frame(vae, z))
        other = "float32 split over frames on the devices, then to host"
    same = np.array_equal(ways["float32 to host (output_type np)"](), ways[other]())
    rows = []
    for what, fn in ways.items():
        fn()
        rows.append({"size": f"{w}x{h}x81", "dtype": "bfloat16", "devices": devices, "what": what,
                     "sdjax_s": float(np.median(timed(fn, warmup=1, iters=3))),
                     "frames_equal": same if what == other else None})
        print(rows[-1], flush=True)
    return rows


def bench_sdjax(cfg, h, w, dtype, per_step, options):
    vae = random_like(nnx.eval_shape(lambda: AutoencoderKLWan(cfg, dtype=dtype)), scale=0.05)
    z = jax.random.normal(jax.random.key(0), (1, cfg.z_dim, 21, h // 8, w // 8), jnp.float32)
    fn = jax.jit(lambda v, z: v.decode(z, latent_frames_per_step=per_step), compiler_options=options)
    t0 = time.perf_counter()
    compiled = fn.lower(vae, z).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    need = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30
    s = float(np.median(timed(compiled, vae, z, warmup=1, iters=3)))
    video = np.asarray(compiled(vae, z), np.float32)  # same seed, same weights for every layout: comparable
    del vae
    return s, compile_s, need, video


def bench_diffusers(cfg, h, w, dtype):
    import torch
    from diffusers import AutoencoderKLWan as TorchVAE

    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    with torch.device("cuda"):
        vae = TorchVAE(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                       num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample))
    vae = vae.to(tdtype).eval()
    z = torch.randn(1, cfg.z_dim, 21, h // 8, w // 8, device="cuda", dtype=tdtype)
    seconds, peak = torch_timing(functools.partial(vae.decode, z), warmup=1, iters=2)
    del vae
    torch.cuda.empty_cache()
    return seconds, peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="480x832,720x1280")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--per-step", default="1,3", help="latent frames per scan step to time")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="nhwc", help="comma-separated: nhwc (the pipeline's COMPILER_OPTIONS), "
                                                      "xla (XLA's own conv layouts)")
    p.add_argument("--transfer", action="store_true", help="also time the frames' copy to the host")
    p.add_argument("--devices", default="1", help="--transfer on these GPU counts (comma list; > 1: split decode)")
    p.add_argument("--tag", default="", help="suffix of the result file name (runs in one call must not share one)")
    args = p.parse_args()
    cfg = WanVAEConfig.from_dict(ModelConfig.named("wan2.1-t2v-1.3b").vae)
    rows, videos = [], {}
    for size in args.sizes.split(","):
        h, w = map(int, size.split("x"))
        for dtype, layout, per_step in itertools.product(args.dtypes.split(","), args.layouts.split(","),
                                                     map(int, args.per_step.split(","))):
            options = COMPILER_OPTIONS if layout == "nhwc" else None
            s, c, need, video = bench_sdjax(cfg, h, w, jnp.dtype(dtype), per_step, options)
            row = {"size": f"{w}x{h}x81", "dtype": dtype, "conv_layout": layout, "latents_per_step": per_step,
                   "sdjax_s": s, "compile_s": c, "xla_buffers_GiB": need}
            # Layouts and chunking change only the convolution algorithms cuDNN picks and the order of
            # sums: the frames may differ from the first variant's by rounding.
            first = videos.setdefault((size, dtype), video)
            if first is not video:
                row["max_abs_vs_first"] = float(np.abs(video - first).max())
                row["rel_l2_vs_first"] = float(np.linalg.norm(video - first) / np.linalg.norm(first))
            if per_step == 1 and layout == "nhwc" and not args.no_diffusers:
                try:
                    d, peak = bench_diffusers(cfg, h, w, dtype)
                    row.update(diffusers_s=d, diffusers_peak_GiB=peak, speedup=d / s)
                except Exception as e:
                    row["diffusers_error"] = f"{type(e).__name__}: {str(e)[:60]}"
            rows.append(row)
            print(row, flush=True)
        if args.transfer:
            for n in map(int, args.devices.split(",")):
                rows += bench_transfer(cfg, h, w, n)
                write(rows, args.tag)  # after each part: a run cut short keeps what it measured
    write(rows, args.tag)


def write(rows, tag):
    write_results("vae_decode" + (f"_{tag}" if tag else ""), rows,
                  "Wan VAE decode, random weights, 81 frames (21 latent frames), B=1.")


if __name__ == "__main__":
    main()
