"""End-to-end Wan-1.3B text-to-video with random weights: text encode + denoise + decode.

    python benchmarks/e2e.py [--steps 2] [--height 480 --width 832 --frames 81] [--guidance 5.0]
    python benchmarks/e2e.py --steps 50 --cfg-parallel 2          # on 2 GPUs (system params, as the CLI's)

Builds the real-size pipeline (UMT5-XXL, the 1.3B DiT, the Wan VAE) with random bf16 weights made on the
device, warms it up (compile), then times one generation per stage and records peak memory.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.cache import psnr
from benchmarks.common import (
    GpuSampler,
    peak_gib,
    random_like,
    use_key_bias_backend,
    use_long_kv_variant,
    use_xla_norm,
    use_xla_residual_norm,
    write_results,
)
from sdjax import pipeline as pipeline_module
from sdjax.config import ModelConfig, SystemConfig
from sdjax.models.tokenizer import load_tokenizer
from sdjax.models.umt5 import UMT5Config, UMT5Encoder
from sdjax.models.wan.loading import abstract_transformer
from sdjax.models.wan.transformer import WanTransformerConfig
from sdjax.models.wan.vae import AutoencoderKLWan, WanVAEConfig
from sdjax.pipeline import Pipeline
from sdjax.sharding import make_mesh, shard_transformer

TOKENIZER = "tests/fixtures/tokenizer_tiny/tokenizer.json"
PROMPT = "a red circle moves left on a black background"  # real UMT5 vocabulary is not shipped; ids suffice


def build(model: str, backend: str, residual_dtype: str | None = None, layout: dict | None = None) -> Pipeline:
    """`layout`: SystemConfig's cfg_parallel / ulysses / ring (the DiT placed on that mesh, the decode split on it)."""
    cfg = ModelConfig.named(model)
    system = SystemConfig(dtype="bfloat16", residual_dtype=residual_dtype, attention_backend=backend,
                          **(layout or {}))
    dit = random_like(abstract_transformer(WanTransformerConfig.from_dict(cfg.transformer), "bfloat16", backend,
                                           residual_dtype=residual_dtype))
    if system.num_devices > 1:
        shard_transformer(dit, make_mesh(system))
    te_cfg = UMT5Config.from_dict(cfg.text_encoder)
    text_encoder = random_like(nnx.eval_shape(lambda: UMT5Encoder(te_cfg, dtype="bfloat16", rngs=nnx.Rngs(0))))
    vae_cfg = WanVAEConfig.from_dict(cfg.vae)
    vae = random_like(nnx.eval_shape(lambda: AutoencoderKLWan(vae_cfg, dtype=jnp.bfloat16)), scale=0.05)
    return Pipeline(cfg, dit, vae, text_encoder, load_tokenizer(TOKENIZER), system)


def exact_twin(pipe: Pipeline) -> Pipeline:
    """The same pipeline (same weights, shared) with exact attention and an fp32 residual stream: the reference of a
    lossy backend's (or a bf16 stream's) frames."""
    cfg = WanTransformerConfig.from_dict(pipe.config.transformer)
    graph, _ = nnx.split(abstract_transformer(cfg, "bfloat16", "auto", residual_dtype="float32"))
    dit = nnx.merge(graph, nnx.state(pipe.transformer))
    system = SystemConfig(dtype="bfloat16", residual_dtype="float32")
    return Pipeline(pipe.config, dit, pipe.vae, pipe.text_encoder, pipe.tokenizer, system)


def cache_arg(spec: str) -> dict:
    """"policy[:threshold]" -> the pipeline's cache argument (no threshold: the model's recommended one)."""
    policy, _, threshold = spec.partition(":")
    return {"policy": policy, **({"threshold": float(threshold)} if threshold else {})}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="wan2.1-t2v-1.3b")
    p.add_argument("--steps", default="2")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--cache", default="none:0",
                   help="comma-separated policy[:threshold] runs, e.g. none,teacache:0.2 (a policy alone: the "
                        "model's recommended threshold)")
    p.add_argument("--residual-dtype", choices=("float32", "bfloat16"),
                   help="where the DiT's residual stream is stored (SystemConfig.residual_dtype; default bf16)")
    p.add_argument("--psnr-vs-exact", action="store_true",
                   help="a lossy attention backend or a bf16 residual stream: also generate each run with exact "
                        "attention and an fp32 stream (same weights and seed) and report the frames' PSNR against it")
    p.add_argument("--output-type", choices=("np", "uint8"), default="np",
                   help="the frames' form (np: float32, as sessions 7-17 measured; uint8: the CLI's and the service's)")
    p.add_argument("--tag", default="", help="suffix of the result file name (runs in one call must not share one)")
    p.add_argument("--long-kv-variant", help="A/B: the exact long-key attention kernel as this variant "
                   "(benchmarks/attention.py syntax, e.g. mgpu:64,192,2,0,1)")
    p.add_argument("--xla-norm", action="store_true", help="A/B: q/k RMSNorm + RoPE through XLA, not our kernel")
    p.add_argument("--key-bias-backend", help="A/B: the attention backend of calls with a key_bias (folded text)")
    p.add_argument("--xla-residual-norm", action="store_true",
                   help="A/B: a block's residual adds + LayerNorms through XLA, not our one-pass kernel")
    p.add_argument("--no-text-fold", action="store_true",
                   help="A/B: the cross-attention on the whole padded text (pipeline.TEXT_FOLD_ROWS = 0)")
    for axis in ("cfg-parallel", "ulysses", "ring"):
        p.add_argument(f"--{axis}", type=int, default=1, help="system param: the layout's degree (product = GPUs)")
    p.add_argument("--warmup", choices=("service", "runs"), default="service",
                   help="service: compile every solver, cache policy and text form as the service does at start-up "
                   "(its time is reported); runs: only what the timed runs use (a 2-step run of each, ~4x less on "
                   "a cold machine: for A/B runs)")
    args = p.parse_args()
    if args.no_text_fold:
        pipeline_module.TEXT_FOLD_ROWS = 0
    use_long_kv_variant(args.long_kv_variant)
    use_xla_norm(args.xla_norm)
    use_key_bias_backend(args.key_bias_backend)
    use_xla_residual_norm(args.xla_residual_norm)
    t0 = time.perf_counter()
    layout = dict(cfg_parallel=args.cfg_parallel, ulysses=args.ulysses, ring=args.ring)
    pipe = build(args.model, args.backend, args.residual_dtype, layout)
    build_s = time.perf_counter() - t0
    rows = []
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, guidance_scale=args.guidance, seed=0)
    runs = [(steps, c) for steps in map(int, args.steps.split(",")) for c in args.cache.split(",")]
    t0, phases = time.perf_counter(), {}
    if args.warmup == "service":  # every solver and cache policy, as the service
        phases = {f"warmup_{k}": v for k, v in
                  pipe.warmup(pipe.user_params(prompt="warm up", **kw), args.output_type).items()}
    else:  # the step's schedule is padded to a fixed length: 2 steps compile what 50 run
        for c in dict.fromkeys(c for _, c in runs):
            pipe(PROMPT, num_inference_steps=2, progress=False, cache=cache_arg(c), output_type=args.output_type,
                 **kw)
    warm_s = time.perf_counter() - t0
    exact = exact_twin(pipe) if args.psnr_vs_exact else None
    for steps, c in runs:
        run = dict(num_inference_steps=steps, progress=False, cache=cache_arg(c), output_type=args.output_type, **kw)
        with GpuSampler() as gpu:  # the clock a 50-step run holds (power-capped cards slow down under load)
            r = pipe(PROMPT, **run)
        t = r.info["timings"]
        rows.append({"model": args.model, "size": f"{args.width}x{args.height}x{args.frames}",
                     "layout": "c{cfg_parallel}u{ulysses}r{ring}".format(**layout), "steps": steps,
                     "cache": f"{r.info['params']['cache']['policy']}:{r.info['params']['cache']['threshold']:g}",
                     "computed": r.info["steps_computed"], "cfg": args.guidance > 1,
                     "residual": args.residual_dtype or "bfloat16",
                     "text_encode_s": t["text_encode_s"], "denoise_s": t["denoise_s"],
                     "per_step_s": t["denoise_s"] / steps, "decode_s": t["decode_s"], "frames": args.output_type,
                     "total_s": sum(t.values()), "warmup": args.warmup, "warmup_compile_s": warm_s, **phases,
                     "build_s": build_s,
                     "peak_GiB": peak_gib(), "frames_finite": bool((r.frames == r.frames).all()),
                     **gpu.summary()})
        if exact is not None:
            scale = 255.0 if args.output_type == "uint8" else 1.0  # psnr takes [0, 1]
            rows[-1]["psnr_dB_vs_exact_attention"] = psnr(r.frames / scale, exact(PROMPT, **run).frames / scale)
        print(rows[-1], flush=True)
    write_results("e2e" + (f"_{args.tag}" if args.tag else ""), rows,
                  f"bf16, random weights, {jax.devices()[0].device_kind}; cache as listed.")


if __name__ == "__main__":
    main()
