"""Feature caches (sdjax/sampling/cache.py): speed and quality against the threshold, per policy.

    python benchmarks/cache.py --model wan2.1-t2v-1.3b --random-weights              # GPU: speed, 480p 81 frames
    python benchmarks/cache.py --model wan2.1-t2v-1.3b --random-weights --policies "static:2,3" --name cache_speed2
    python benchmarks/cache.py --model sdjax-demo --device cpu                        # demo model: PSNR / SSIM
    python benchmarks/cache.py --weights DIR --policies "teacache:0.05,0.1;static:2"  # any diffusers root

Every run goes through `Pipeline.denoise` (the host loop over the jitted step, the decision on the device).
The reference is the uncached run (policy "none") of the same prompt, seed and settings. Per policy and
threshold: steps computed / skipped, `evals_x` = N / steps computed (the factor of fewer transformer
evaluations), `blocks_x` (the same counting blocks: a skipped fbcache step still runs block 0), denoise
seconds and the speed-up against "none" (after a compile warm-up of each policy), and the quality:

- with real weights (the demo model, `--weights`): frames decoded by the VAE, PSNR (dB, over the whole video,
  frames in [0, 1]) and SSIM (Gaussian 11×11, σ = 1.5, per frame and channel, averaged), mean over prompts;
- with `--random-weights` (the DiT only, no text encoder / VAE; random text contexts): the relative L2 of the
  final latents, which says nothing about visual quality — those runs are for speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_POLICIES = "teacache:0.03,0.05,0.08,0.1,0.15,0.2,0.3;fbcache:0.03,0.05,0.08,0.1,0.15,0.2;static:1.5,2,2.5,3,4"
# Random weights: what a threshold skips means nothing, so fewer points (each run is ~1 min at 480p on an H100;
# split the list over several commands with --policies and --name). fbcache:0 measures its overhead.
DEFAULT_SPEED_POLICIES = "fbcache:0,0.05,0.1;teacache:0.08,0.2;static:2,3"
DEMO_PROMPTS = (  # 4 held-out scenes of tools/demo_data.py (never trained on), then 4 training scenes
    "a red circle moves left on a black background",
    "a green square moves up on a gray background",
    "a blue triangle moves right on a black background",
    "a white circle moves left on a gray background",
    "a yellow circle moves down on a black background",
    "a red circle moves left on a gray background",
    "a blue square moves up on a gray background",
    "a green triangle moves right on a black background",
)


def parse_policies(spec: str) -> list[tuple[str, float]]:
    """"teacache:0.05,0.1;static:2" -> [("teacache", 0.05), ("teacache", 0.1), ("static", 2.0)]."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, values = part.partition(":")
        if not values:
            raise SystemExit(f"--policies: {part!r} needs thresholds, e.g. teacache:0.05,0.1")
        out += [(name.strip(), float(v)) for v in values.split(",")]
    return out


# ------------------------------------------------------------------------------------------ quality metrics


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(a, b) -> float:
    """Mean SSIM of two videos (F, H, W, 3) in [0, 1]: Gaussian window 11×11, σ = 1.5 (Wang et al. 2004)."""
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(z):  # separable 'valid' filter over H (axis 1) and W (axis 2)
        n_h, n_w = z.shape[1] - 10, z.shape[2] - 10
        z = sum(w * z[:, i : i + n_h] for i, w in enumerate(g))
        return sum(w * z[:, :, i : i + n_w] for i, w in enumerate(g))

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


# ------------------------------------------------------------------------------------------ models


def random_pipeline(model: str, dtype: str, backend: str):
    """The real-size DiT with random weights (made on the device); text encoder / VAE abstract (not run)."""
    from flax import nnx

    from benchmarks.common import random_like
    from sdjax.config import ModelConfig, SystemConfig
    from sdjax.models.wan.loading import abstract_transformer
    from sdjax.models.wan.transformer import WanTransformerConfig
    from sdjax.models.wan.vae import AutoencoderKLWan, WanVAEConfig
    from sdjax.pipeline import Pipeline

    cfg = ModelConfig.named(model)
    dit = random_like(abstract_transformer(WanTransformerConfig.from_dict(cfg.transformer), dtype, backend))
    vae = nnx.eval_shape(lambda: AutoencoderKLWan(WanVAEConfig.from_dict(cfg.vae)))  # only its config is read
    return Pipeline(cfg, dit, vae, None, None, SystemConfig(dtype=dtype, attention_backend=backend))


def load_pipeline(args):
    from sdjax.config import SystemConfig
    from sdjax.pipeline import Pipeline

    system = SystemConfig(dtype=args.dtype, attention_backend=args.backend)
    if args.weights:
        return Pipeline.from_pretrained(args.weights, dtype=args.dtype, system=system)
    if args.model == "sdjax-demo":
        return Pipeline.default(system=system, dtype=args.dtype)
    raise SystemExit(f"--model {args.model}: real weights need --weights DIR (or use --random-weights)")


# ------------------------------------------------------------------------------------------ runs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdjax-demo", help="model yaml name (wan2.1-t2v-1.3b, sdjax-demo, ...)")
    p.add_argument("--weights", help="a diffusers-format root to load instead of the model's default")
    p.add_argument("--random-weights", action="store_true", help="random DiT, denoise only (GPU speed runs)")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default="auto", help="attention backend")
    p.add_argument("--policies", default=None, help='e.g. "teacache:0.05,0.1;fbcache:0.1;static:2" (default: '
                   f'{DEFAULT_POLICIES!r}; with --random-weights {DEFAULT_SPEED_POLICIES!r})')
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--prompts", type=int, default=None, help="how many demo prompts (default 8; 1 with random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file stem (default cache_speed / cache_quality)")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import peak_gib, write_results
    from sdjax.pipeline import TextEmbeddings

    on_gpu = jax.devices()[0].platform == "gpu"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    spec = args.policies or (DEFAULT_SPEED_POLICIES if args.random_weights else DEFAULT_POLICIES)
    runs = [("none", 0.0)] + parse_policies(spec)
    t0 = time.perf_counter()
    pipe = random_pipeline(args.model, args.dtype, args.backend) if args.random_weights else load_pipeline(args)
    build_s = time.perf_counter() - t0
    n_prompts = args.prompts or (1 if args.random_weights else len(DEMO_PROMPTS))
    prompts = [DEMO_PROMPTS[k % len(DEMO_PROMPTS)] for k in range(n_prompts)]
    kw = {k: v for k, v in dict(num_inference_steps=args.steps, height=args.height, width=args.width,
                                num_frames=args.frames, guidance_scale=args.guidance, seed=args.seed).items()
          if v is not None}
    num_layers = pipe.transformer.config.num_layers

    def text_for(params, k):
        if not args.random_weights:
            return pipe.encode_text(params)
        shape = (1, params.max_sequence_length, pipe.transformer.config.text_dim)
        cond = jax.random.normal(jax.random.key(100 + k), shape, jnp.float32)
        uncond = jax.random.normal(jax.random.key(200 + k), shape) if params.guidance_scale > 1 else None
        return TextEmbeddings(cond, uncond)

    def run(policy, threshold, prompt, k, warm=False):
        params = pipe.user_params(prompt=prompt, cache={"policy": policy, "threshold": threshold}, **kw)
        if warm:  # compile this policy's step (both branches of its lax.cond) outside the timing
            params = pipe.user_params(prompt=prompt, cache={"policy": policy, "threshold": threshold},
                                      **{**kw, "num_inference_steps": 2})
        text = text_for(params, k)
        jax.block_until_ready(text.cond)
        stats = {}
        t = time.perf_counter()
        z = jax.block_until_ready(pipe.denoise(params, text, stats=stats))
        seconds = time.perf_counter() - t
        frames = None if args.random_weights or warm else pipe.decode(z)
        return np.asarray(z), frames, stats, seconds, params

    what = "random DiT weights (speed only)" if args.random_weights else "loaded weights"
    name = args.name or ("cache_speed" if args.random_weights else "cache_quality")

    def save(rows):
        params = pipe.user_params(prompt=prompts[0], **kw)
        header = (f"{pipe.config.name}, {what}, {args.dtype}, {params.width}x{params.height}x{params.num_frames}, "
                  f"{params.num_inference_steps} steps {params.solver}, guidance {params.guidance_scale}, "
                  f"{len(prompts)} prompt(s), seed {args.seed}; reference: policy none. evals_x = steps / steps "
                  f"computed; blocks_x counts fbcache's block 0 on skipped steps. static: threshold = mean "
                  f"interval between computed steps after a warm-up of ceil(N/10) steps. Build {build_s:.1f} s, "
                  f"peak {peak_gib() or 0:.1f} GiB.")
        write_results(name, rows, header)

    rows, reference = [], {}
    for policy, threshold in runs:
        run(policy, threshold, prompts[0], 0, warm=True)
        per_prompt = []
        for k, prompt in enumerate(prompts):
            z, frames, stats, seconds, params = run(policy, threshold, prompt, k)
            if policy == "none":
                reference[k] = (z, frames)
            z0, f0 = reference[k]
            q = {"rel_l2_latents": float(np.linalg.norm(z - z0) / np.linalg.norm(z0))}
            if frames is not None:
                q.update(psnr_dB=psnr(frames, f0), ssim=ssim(frames, f0))
            per_prompt.append((stats, seconds, q))
        n = params.num_inference_steps
        computed = float(np.mean([s["steps_computed"] for s, _, _ in per_prompt]))
        skipped = n - computed
        blocks = computed + (skipped / num_layers if policy == "fbcache" else 0.0)
        row = {"policy": policy, "threshold": threshold, "steps": n, "computed": computed, "skipped": skipped,
               "evals_x": n / computed, "blocks_x": n / blocks,
               "denoise_s": float(np.mean([s for _, s, _ in per_prompt]))}
        for key in per_prompt[0][2]:
            row[key] = float(np.mean([q[key] for _, _, q in per_prompt]))
        row["speedup"] = rows[0]["denoise_s"] / row["denoise_s"] if rows else 1.0
        rows.append(row)
        print(row, flush=True)
        save(rows)  # after every policy: a run cut short keeps what it measured


if __name__ == "__main__":
    main()
