"""Train the embedded demo model (sdjax/assets/demo): a small Wan2.1 text-to-video model on synthetic clips.

    python3 tools/train_demo.py --out /tmp/demo --tar $OUT/demo.tar --samples $OUT/samples.png   # GPU, ~6 min
    .venv/bin/python tools/train_demo.py --out /tmp/demo --vae-seconds inf --vae-steps 5600 \
        --dit-seconds inf --dit-steps 10000                                     # CPU, same steps: days

The shipped weights come from the first command on one H200 (benchmarks/results/demo_training.md): the
phases are time-budgeted and the LR schedules follow the budget; on a slow machine give step counts instead.
The training is not bit-reproducible (GPU reductions); copy the written root to sdjax/assets/demo.

The same three Wan components as the real model, at a small size, trained with optax on clips from
tools/demo_data.py (64×64, 17 frames, "a red circle moves left on a black background", …):

1. Tokenizer + text encoder. A word-level `tokenizer.json` (the prompt words, T5 specials <pad>=0 </s>=1
   <unk>=2) and a small UMT5 encoder, randomly initialised and **frozen**: it is a fixed feature extractor
   of the word ids. Its residual branches are scaled down so each output row is dominated by its own word
   (plus a little context and position); the DiT's text MLP and cross-attention learn to read these
   features. Frozen keeps the recipe two-stage and makes held-out word combinations look like training
   ones to the DiT (a jointly trained encoder could entangle the words of the training combinations).
2. VAE (`AutoencoderKLWan`, time ×4, space ×8: 64×64×17 → 16×5×8×8) trained as a KL autoencoder
   (MSE + β·KL, β small), the object's pixels weighted 1 + OBJECT_WEIGHT (they are a few % of the frame
   and carry the colour the prompt names); `latents_mean` / `latents_std` in its config are measured on
   encoded data, so the DiT sees unit-scale latents, as Wan's do.
3. DiT (`WanTransformer3DModel`, patch (1,2,2) → 5·4·4 = 80 tokens) trained with flow matching on the
   VAE latents: x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0, σ ~ U(0, 1), timestep σ·1000; the text is
   replaced by the empty prompt's context with probability 0.1 (for classifier-free guidance). EMA
   weights are exported.

Both networks train in bf16 mixed precision (fp32 master weights and optimizer state; the forward casts
them to bf16 — for the DiT, sdjax's own bf16 model with its fp32 islands), falling back to fp32 if the
backend rejects it. Only scenes in `demo_data.TRAIN_SCENES` are used for training; the `HELD_OUT` scenes
are sampled at the end and scored with `demo_data.detect` (colour and motion) for a few sampler settings.

Output: a diffusers-format root (model_index.json, scheduler/, tokenizer/, text_encoder/, transformer/,
vae/) read by the project's own loaders (and by diffusers' WanPipeline), weights in float16 safetensors;
optionally a .tar of it (a GPU run returns one file) and a PNG of held-out samples; a log
(`train_log.json`) with the recipe, losses, timings and eval scores. The root is re-exported during DiT
training, so a run cut short still leaves usable weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tarfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdjax.models.umt5 import UMT5Config, UMT5Encoder, checkpoint_keys  # noqa: E402
from sdjax.models.wan.loading import checkpoint_tensors  # noqa: E402
from sdjax.models.wan.transformer import WanTransformer3DModel, WanTransformerConfig  # noqa: E402
from sdjax.models.wan.vae import AutoencoderKLWan, History, WanVAEConfig  # noqa: E402
from sdjax.sampling import solvers  # noqa: E402
from tools import demo_data as data  # noqa: E402

# --------------------------------------------------------------------------------------------- configs

MAX_SEQUENCE_LENGTH = 16
SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5

TEXT_ENCODER = dict(  # transformers UMT5Config names
    vocab_size=32, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=16,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")
TEXT_BRANCH_SCALE = 0.25  # residual-branch output projections scaled down at init (see the docstring)

VAE = dict(base_dim=16, decoder_base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
           temperal_downsample=[False, True, True])

TRANSFORMER = dict(  # diffusers WanTransformer3DModel names
    patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

SCHEDULER = {  # diffusers UniPCMultistepScheduler, Wan flow config (research/wan.md §2.4); flow_shift set at export
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False}

# The tokenizer is word-level, so transformers loads it as a generic fast tokenizer (its T5TokenizerFast
# insists on a Unigram model); the encoder and everything else are the classes of a real Wan root.
MODEL_INDEX = {
    "_class_name": "WanPipeline", "_diffusers_version": "0.33.0.dev0",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"]}


OBJECT_WEIGHT = 10.0  # VAE loss weight of object pixels over background pixels (see object_weights)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------- 1. text: tokenizer + UMT5


def build_tokenizer():
    """Word-level tokenizer.json: lower-cased words, T5 specials, `$A </s>` template (as T5's fast tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in data.VOCAB_WORDS:
        vocab[w] = len(vocab)
    if len(vocab) > TEXT_ENCODER["vocab_size"]:
        raise ValueError(f"vocabulary ({len(vocab)}) exceeds the text encoder's vocab_size")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def tokenize(tok, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, L) as Wan does: words + </s>, right-padded with <pad> to MAX_SEQUENCE_LENGTH."""
    L = MAX_SEQUENCE_LENGTH
    ids, mask = np.zeros((len(prompts), L), np.int32), np.zeros((len(prompts), L), np.int32)
    for b, enc in enumerate(tok.encode_batch(prompts, add_special_tokens=False)):
        row = [*enc.ids[: L - 1], 1]
        ids[b, : len(row)], mask[b, : len(row)] = row, 1
    return ids, mask


def init_text_encoder(seed: int) -> UMT5Encoder:
    cfg = UMT5Config(model_type="umt5", **TEXT_ENCODER)
    enc = UMT5Encoder(cfg, rngs=nnx.Rngs(seed))
    blocks = enc.encoder.block
    for proj in (blocks.layer[0].SelfAttention.o, blocks.layer[1].DenseReluDense.wo):
        proj.weight.set_value(proj.weight[...] * TEXT_BRANCH_SCALE)
    return enc


def text_contexts(enc: UMT5Encoder, tok, prompts: list[str]) -> np.ndarray:
    """Wan text context (B, L, D): encoder rows of the real tokens (EOS included), zeros after."""
    ids, mask = tokenize(tok, prompts)
    hidden = enc(jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(jnp.where(jnp.asarray(mask)[..., None] > 0, hidden, 0.0), np.float32)


# ------------------------------------------------------------------------------------------------ 2. VAE


def init_vae(seed: int) -> AutoencoderKLWan:
    """AutoencoderKLWan with fan-in normal conv weights (the class itself builds zeros, to be loaded).

    Biases start small but non-zero: a gray pixel is exactly 0 in [-1, 1], and the gradient of the VAE's
    RMS norm (x / ‖x‖) at an exactly-zero activation is NaN.
    """
    vae = AutoencoderKLWan(WanVAEConfig.from_dict(VAE))
    g = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        if path[-1] == "weight":
            fan_in = int(np.prod(var.shape[:-1]))
            var.set_value(jnp.asarray(g.normal(0, 1 / math.sqrt(fan_in), var.shape), jnp.float32))
        elif path[-1] == "bias":
            var.set_value(jnp.asarray(g.normal(0, 0.01, var.shape), jnp.float32))
    return vae


def vae_moments(vae: AutoencoderKLWan, video):
    """video (B, F, H, W, 3) in [-1, 1] -> posterior mean, logvar (B, F', H', W', Z), whole clip in one pass."""
    h = vae.quant_conv(vae.encoder(video, History(None)))
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def vae_decode_raw(vae: AutoencoderKLWan, z):
    """z (B, F', H', W', Z) -> video (B, F, H, W, 3), not clamped (for the loss)."""
    return vae.decoder(vae.post_quant_conv(z), History(None))


def render_video(p):
    return data.render(p, xp=jnp) * 2.0 - 1.0  # (B, F, H, W, 3) in [-1, 1]


def train_step_with_fallback(make_step, mixed: bool, history: dict, name: str):
    """The jitted step in bf16 mixed precision, or fp32 if that fails to compile/run on this backend."""
    steps = {True: make_step(True), False: make_step(False)} if mixed else {False: make_step(False)}
    state = {"mixed": mixed, "checked": False}

    def step(*a):
        if state["checked"]:
            return steps[state["mixed"]](*a)
        try:
            out = jax.block_until_ready(steps[state["mixed"]](*a))
        except Exception as e:  # e.g. a bf16 kernel the backend lacks: train in fp32 instead
            if not state["mixed"]:
                raise
            log(f"{name}: bf16 mixed precision failed ({type(e).__name__}: {str(e)[:200]}); using fp32")
            state["mixed"] = False
            out = steps[False](*a)
        state["checked"] = True
        history[f"{name}_precision"] = "bf16 mixed (fp32 master weights)" if state["mixed"] else "fp32"
        return out

    return step


def object_weights(video, p):
    """Loss weights (B, F, H, W, 1): 1 on the background, 1 + OBJECT_WEIGHT on the object (a few % of the
    pixels, whose colour is what the prompt is about)."""
    bg = jnp.asarray(np.array(list(data.BACKGROUNDS.values()), np.float32))[p["background"]] * 2 - 1
    on_object = jnp.max(jnp.abs(video - bg[:, None, None, None, :]), axis=-1, keepdims=True) > 0.05
    return 1.0 + OBJECT_WEIGHT * on_object


def train_vae(vae, args, rng: np.random.Generator, history: dict):
    graphdef, params = nnx.split(vae, nnx.Param)
    schedule = lambda frac: args.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=args.vae_lr))
    opt_state = tx.init(params)

    def make_step(mixed: bool):
        dt = jnp.bfloat16 if mixed else jnp.float32

        @jax.jit
        def step(params, opt_state, p, key, lr):
            video = render_video(p)
            weights = object_weights(video, p)

            def loss_fn(params):
                m = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dt), params))
                mean, logvar = (a.astype(jnp.float32) for a in vae_moments(m, video.astype(dt)))
                z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
                sq = jnp.square(vae_decode_raw(m, z.astype(dt)).astype(jnp.float32) - video)
                kl = jnp.mean(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))
                return jnp.mean(weights * sq) + args.vae_kl * kl, (jnp.mean(sq), kl)

            (_, (rec, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            opt_state[1].hyperparams["learning_rate"] = lr
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, rec, kl

        return step

    step = train_step_with_fallback(make_step, args.mixed, history, "vae")
    t0, n, key = time.perf_counter(), 0, jax.random.key(1)
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed > args.vae_seconds or (args.vae_steps and n >= args.vae_steps):
            break
        scenes = [data.TRAIN_SCENES[i] for i in rng.integers(0, len(data.TRAIN_SCENES), args.vae_batch)]
        p = data.sample_params(rng, scenes)
        frac = max(elapsed / args.vae_seconds, n / args.vae_steps if args.vae_steps else 0.0)
        lr = jnp.float32(schedule(frac) * min(1.0, (n + 1) / 50))
        params, opt_state, rec, kl = step(params, opt_state, p, jax.random.fold_in(key, n), lr)
        n += 1
        if n == 1 or n % 200 == 0:
            rec, kl = float(rec), float(kl)
            history.setdefault("vae_loss", []).append([n, round(time.perf_counter() - t0, 1), rec, kl])
            log(f"vae step {n:5d}  rec {rec:.5f} ({10 * math.log10(4 / max(rec, 1e-12)):.1f} dB)  kl {kl:.3f}")
    history["vae_steps"] = n
    history["vae_seconds"] = round(time.perf_counter() - t0, 1)
    nnx.update(vae, params)
    return vae


def encode_clips(vae, p, batch: int) -> np.ndarray:
    """Posterior means (N, Z, F', H', W') of the clips described by render params `p`."""
    enc = jax.jit(lambda m, q: jnp.moveaxis(vae_moments(m, render_video(q))[0], -1, 1))
    N = len(p["size"])
    out = []
    for i in range(0, N, batch):
        out.append(np.asarray(enc(vae, {k: v[i : i + batch] for k, v in p.items()})))
    return np.concatenate(out)


def vae_psnr(vae, rng, n: int = 32) -> float:
    """Reconstruction PSNR (dB, range [-1, 1]) of the posterior mean on fresh held-out-scene clips."""
    scenes = [data.HELD_OUT[i % len(data.HELD_OUT)] for i in range(n)]
    p = data.sample_params(rng, scenes)
    video = render_video(p)
    rec = jax.jit(lambda m, v: m.decode(jnp.moveaxis(vae_moments(m, v)[0], -1, 1)))(vae, video)
    mse = float(jnp.mean(jnp.square(jnp.moveaxis(rec, 1, -1) - video)))
    return 10 * math.log10(4.0 / mse)


# ------------------------------------------------------------------------------------------------ 3. DiT


def dtype_caster(reference_state):
    """Casts a state of the same structure leaf by leaf to the dtypes of `reference_state`."""
    keystr = jax.tree_util.keystr
    ref = {keystr(k): v.dtype for k, v in jax.tree_util.tree_flatten_with_path(reference_state)[0]}
    return lambda state: jax.tree_util.tree_map_with_path(lambda k, x: x.astype(ref[keystr(k)]), state)


def train_dit(dit, pool_z, pool_scene, contexts, empty_ctx, args, history, export_fn):
    """Flow matching on normalised latents `pool_z` (N, C, F, H, W); `contexts[pool_scene]` is the text.

    fp32 master weights; the forward runs the sdjax bf16 model (bf16 matmuls, fp32 where `FP32_PARAMS` /
    the residual stream say) when `args.mixed`, else the fp32 model.
    """
    graphdef, params = nnx.split(dit, nnx.Param)
    bf16_model = nnx.eval_shape(lambda: WanTransformer3DModel(dit.config, dtype="bfloat16", rngs=nnx.Rngs(0)))
    graphdef_bf16, state_bf16 = nnx.split(bf16_model, nnx.Param)
    to_bf16 = dtype_caster(state_bf16)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(optax.adamw)(learning_rate=args.dit_lr, weight_decay=0.01))
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    pool_z, pool_scene = jnp.asarray(pool_z), jnp.asarray(pool_scene)
    contexts, empty_ctx = jnp.asarray(contexts), jnp.asarray(empty_ctx)

    def make_step(mixed: bool):
        @jax.jit
        def step(params, opt_state, ema, key, lr, decay):
            k_idx, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
            idx = jax.random.randint(k_idx, (args.dit_batch,), 0, pool_z.shape[0])
            x0 = pool_z[idx]
            ctx = contexts[pool_scene[idx]]
            drop = jax.random.uniform(k_drop, (args.dit_batch,)) < args.cfg_dropout
            ctx = jnp.where(drop[:, None, None], empty_ctx[None], ctx)
            sigma = jax.random.uniform(k_sigma, (args.dit_batch,))
            noise = jax.random.normal(k_noise, x0.shape)
            s = sigma[:, None, None, None, None]
            xt = (1.0 - s) * x0 + s * noise

            def loss_fn(params):
                model = nnx.merge(graphdef_bf16, to_bf16(params)) if mixed else nnx.merge(graphdef, params)
                v = model(xt, sigma * 1000.0, ctx).astype(jnp.float32)
                return jnp.mean(jnp.square(v - (noise - x0)))

            loss, grads = jax.value_and_grad(loss_fn)(params)
            opt_state[1].hyperparams["learning_rate"] = lr
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
            return params, opt_state, ema, loss

        return step

    step = train_step_with_fallback(make_step, args.mixed, history, "dit")
    t0, n, key, last_export = time.perf_counter(), 0, jax.random.key(2), time.perf_counter()
    losses = []
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed > args.dit_seconds or (args.dit_steps and n >= args.dit_steps):
            break
        frac = min(max(elapsed / args.dit_seconds, n / args.dit_steps if args.dit_steps else 0.0), 1.0)
        lr = args.dit_lr * min(1.0, (n + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        decay = min(args.ema, (1 + n) / (10 + n))
        params, opt_state, ema, loss = step(params, opt_state, ema, jax.random.fold_in(key, n),
                                            jnp.float32(lr), jnp.float32(decay))
        losses.append(loss)
        n += 1
        if n % 500 == 0 or n == 1:
            mean_loss = float(jnp.mean(jnp.stack(losses)))
            losses = []
            history.setdefault("dit_loss", []).append([n, round(time.perf_counter() - t0, 1), mean_loss])
            log(f"dit step {n:6d}  loss {mean_loss:.4f}  lr {lr:.2e}")
        if export_fn is not None and time.perf_counter() - last_export > args.export_every:
            nnx.update(dit, ema)
            export_fn()
            last_export = time.perf_counter()
    history["dit_steps"] = n
    history["dit_seconds"] = round(time.perf_counter() - t0, 1)
    nnx.update(dit, ema)
    return dit


# ------------------------------------------------------------------------------------------ 4. evaluation


@jax.jit
def _sample(dit, vae, x, ctx, uncond, sched, guidance):
    def body(i, carry):
        x, st = carry
        t = jnp.full((2 * x.shape[0],), sched.timesteps[i])
        v_cond, v_uncond = jnp.split(dit(jnp.concatenate([x, x]), t, jnp.concatenate([ctx, uncond])), 2)
        v = v_uncond + guidance * (v_cond - v_uncond)  # CFG, as sdjax.sampling.loop does it
        return solvers.step("unipc", sched, st, i, v, x)

    x, _ = jax.lax.fori_loop(0, sched.num_steps, body, (x, solvers.init_state("unipc", x)))
    return vae.decode(vae.denormalize_latents(x))


def sample_videos(dit, vae, ctx, empty_ctx, seeds, steps: int, guidance: float, shift: float) -> np.ndarray:
    """Batched UniPC sampling with CFG, as the pipeline does it (noise from `jax.random.key(seed)`);
    frames (B, F, H, W, 3) in [0, 1]."""
    shape = (1, VAE["z_dim"], (data.NUM_FRAMES - 1) // 4 + 1, data.HEIGHT // 8, data.WIDTH // 8)
    noise = jnp.concatenate([jax.random.normal(jax.random.key(int(s)), shape, jnp.float32) for s in seeds])
    sched = jax.tree.map(jnp.asarray, solvers.make_schedule("unipc", steps, shift).padded(100))
    uncond = jnp.broadcast_to(jnp.asarray(empty_ctx)[None], ctx.shape)
    video = _sample(dit, vae, noise, jnp.asarray(ctx), uncond, sched, jnp.float32(guidance))  # (B, 3, F, H, W)
    return np.clip(np.asarray(video).transpose(0, 2, 3, 4, 1) / 2 + 0.5, 0, 1)


def evaluate(dit, vae, contexts, empty_ctx, scenes, seeds, steps, guidance, shift) -> dict:
    idx = [data.ALL_SCENES.index(s) for s in scenes for _ in seeds]
    all_seeds = [sd for _ in scenes for sd in seeds]
    frames = sample_videos(dit, vae, contexts[idx], empty_ctx, all_seeds, steps, guidance, shift)
    got = [data.detect(f) for f in frames]
    want = [(data.ALL_SCENES[i].colour, data.ALL_SCENES[i].motion) for i in idx]
    colour = np.mean([g[0] == w[0] for g, w in zip(got, want, strict=True)])
    motion = np.mean([g[1] == w[1] for g, w in zip(got, want, strict=True)])
    both = np.mean([g == w for g, w in zip(got, want, strict=True)])
    return dict(steps=steps, guidance=guidance, shift=shift, n=len(idx), colour=float(colour),
                motion=float(motion), both=float(both)), frames


# ---------------------------------------------------------------------------------------------- 5. export


def _f16(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(np.float16))


def export_transformer(dit: WanTransformer3DModel, out: Path) -> None:
    tensors = {key: _f16(v) for key, v in checkpoint_tensors(dit).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"))
    cfg = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", **TRANSFORMER,
           "added_kv_proj_dim": None, "image_dim": None, "pos_embed_seq_len": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export_vae(vae: AutoencoderKLWan, out: Path) -> None:
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        key = ".".join(str(p) for p in path)
        v = np.asarray(var[...])
        if key.endswith(".gamma"):  # diffusers WanRMS_norm: (C, 1, 1) in the attention block, else (C, 1, 1, 1)
            v = v.reshape(-1, 1, 1) if ".attentions." in key else v.reshape(-1, 1, 1, 1)
        elif v.ndim == 5:
            v = v.transpose(4, 3, 0, 1, 2)  # (kT, kH, kW, I, O) -> (O, I, kT, kH, kW)
        elif v.ndim == 4:
            v = v.transpose(3, 2, 0, 1)  # (kH, kW, I, O) -> (O, I, kH, kW)
        tensors[key] = _f16(v)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"))
    c = vae.config
    cfg = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0", "attn_scales": [],
           "base_dim": c.base_dim, "decoder_base_dim": c.decoder_base_dim, "dim_mult": list(c.dim_mult), "dropout": 0.0,
           "in_channels": 3, "is_residual": False, "latents_mean": [round(float(x), 6) for x in c.latents_mean],
           "latents_std": [round(float(x), 6) for x in c.latents_std], "num_res_blocks": c.num_res_blocks,
           "out_channels": 3, "patch_size": None, "scale_factor_spatial": c.spatial_factor,
           "scale_factor_temporal": c.temporal_factor, "temperal_downsample": list(c.temperal_downsample),
           "z_dim": c.z_dim}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export_text_encoder(enc: UMT5Encoder, out: Path) -> None:
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(enc, nnx.Param)):
        keys = checkpoint_keys(path, enc.config)
        value = np.asarray(var[...])
        for i, k in enumerate(keys):
            tensors[k] = _f16(value[i] if len(keys) > 1 else value)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    t = TEXT_ENCODER
    cfg = {"architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0, "d_ff": t["d_ff"], "d_kv": t["d_kv"],
           "d_model": t["d_model"], "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
           "eos_token_id": 1, "feed_forward_proj": t["feed_forward_proj"], "initializer_factor": 1.0,
           "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": t["layer_norm_epsilon"],
           "model_type": "umt5", "num_decoder_layers": t["num_layers"], "num_heads": t["num_heads"],
           "num_layers": t["num_layers"], "output_past": True, "pad_token_id": 0,
           "relative_attention_max_distance": t["relative_attention_max_distance"],
           "relative_attention_num_buckets": t["relative_attention_num_buckets"], "scalable_attention": True,
           "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer", "torch_dtype": "float16",
           "vocab_size": t["vocab_size"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export_tokenizer(tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": [],
         "model_max_length": MAX_SEQUENCE_LENGTH}, indent=2) + "\n")


def export_root(out: Path, tok, enc, vae, dit, shift: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, "flow_shift": shift},
                                                                        indent=2) + "\n")
    export_tokenizer(tok, out / "tokenizer")
    export_text_encoder(enc, out / "text_encoder")
    export_vae(vae, out / "vae")
    export_transformer(dit, out / "transformer")
    make_readable(out)


def write_tar(root: Path, tar_path: Path) -> None:
    tmp = tar_path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        tf.add(root, arcname=root.name)
    os.replace(tmp, tar_path)


def make_readable(root: Path) -> None:
    for f in root.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)


def save_grid(videos: np.ndarray, path: Path) -> None:
    """One row per video: frames 0, 4, 8, 12, 16 side by side."""
    from PIL import Image

    rows = [np.concatenate(list(v[::4]), axis=1) for v in videos]
    Image.fromarray((np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)).save(path)


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="diffusers-format root to write")
    p.add_argument("--tar", default=None, help="also write the root as this .tar (after each export)")
    p.add_argument("--log", default=None, help="JSON log path (default: <out>/../train_log.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-seconds", type=float, default=160, help="time budget (the LR schedule follows it)")
    p.add_argument("--vae-steps", type=int, default=0,
                   help="stop after this many steps (0: time only); with --vae-seconds inf the schedule follows it")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-5)
    p.add_argument("--pool", type=int, default=16384, help="training clips encoded once for the DiT")
    p.add_argument("--dit-seconds", type=float, default=130)
    p.add_argument("--dit-steps", type=int, default=0)
    p.add_argument("--dit-batch", type=int, default=256)
    p.add_argument("--dit-lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--export-every", type=float, default=45)
    p.add_argument("--no-mixed", dest="mixed", action="store_false",
                   help="train in fp32 (default: bf16 mixed precision, fp32 master weights)")
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--samples", default=None, help="PNG grid of held-out samples (default setting)")
    p.add_argument("--eval-grid", default="20:4:3,20:6:3,20:4:1,30:4:3",
                   help="steps:guidance:shift settings scored on the held-out prompts; the first is the default")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.parent / "train_log.json"
    t_start = time.perf_counter()
    history = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
               "jax": jax.__version__, "args": vars(args), "text_encoder": TEXT_ENCODER, "vae": VAE,
               "transformer": TRANSFORMER, "max_sequence_length": MAX_SEQUENCE_LENGTH,
               "train_scenes": len(data.TRAIN_SCENES), "held_out_scenes": len(data.HELD_OUT)}
    log(f"device {history['device']} ({history['platform']}), jax {jax.__version__}")
    rng = np.random.default_rng(args.seed)
    default_steps, _, default_shift = (float(x) for x in args.eval_grid.split(",")[0].split(":"))

    def save_log():
        history["total_seconds"] = round(time.perf_counter() - t_start, 1)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(json.dumps(history, indent=1) + "\n")

    # 1. text
    tok = build_tokenizer()
    enc = init_text_encoder(args.seed)
    prompts = [s.prompt for s in data.ALL_SCENES]
    contexts = text_contexts(enc, tok, prompts)  # (120, L, D), indexed like data.ALL_SCENES
    empty_ctx = text_contexts(enc, tok, [""])[0]
    history["text_encoder_params"] = count(nnx.state(enc, nnx.Param))
    log(f"text encoder {history['text_encoder_params']:,} params; contexts {contexts.shape}")

    # 2. VAE
    vae = init_vae(args.seed)
    history["vae_params"] = count(nnx.state(vae, nnx.Param))
    log(f"VAE {history['vae_params']:,} params; training for {args.vae_seconds:.0f} s")
    vae = train_vae(vae, args, rng, history)
    train_idx = [data.ALL_SCENES.index(s) for s in data.TRAIN_SCENES]
    pool_scene = rng.choice(train_idx, args.pool)
    t0 = time.perf_counter()
    encode_batch = 256 if history["platform"] == "gpu" else 16  # activations of a 17×64×64 clip are large
    pool_mu = encode_clips(vae, data.sample_params(rng, [data.ALL_SCENES[i] for i in pool_scene]), encode_batch)
    mean = pool_mu.mean((0, 2, 3, 4))
    std = np.maximum(pool_mu.std((0, 2, 3, 4)), 1e-2)
    history["pool_encode_seconds"] = round(time.perf_counter() - t0, 1)
    vae_cfg = WanVAEConfig.from_dict({**VAE, "latents_mean": mean.tolist(), "latents_std": std.tolist()})
    vae.config = vae_cfg
    history["vae_psnr_db"] = round(vae_psnr(vae, rng), 2)
    history["latents_mean"], history["latents_std"] = mean.round(4).tolist(), std.round(4).tolist()
    log(f"VAE recon PSNR {history['vae_psnr_db']} dB (held-out scenes); latent std {std.round(3).tolist()}")
    pool_z = ((pool_mu - mean[None, :, None, None, None]) / std[None, :, None, None, None]).astype(np.float32)
    save_log()

    # 3. DiT
    dit = WanTransformer3DModel(WanTransformerConfig.from_dict(TRANSFORMER), rngs=nnx.Rngs(args.seed))
    history["transformer_params"] = count(nnx.state(dit, nnx.Param))
    log(f"DiT {history['transformer_params']:,} params; training for {args.dit_seconds:.0f} s")

    def export(shift=default_shift):
        export_root(out, tok, enc, vae, dit, shift)
        if args.tar:
            write_tar(out, Path(args.tar))
        save_log()
        log(f"exported {out}")

    dit = train_dit(dit, pool_z, pool_scene, contexts, empty_ctx, args, history, export)
    export()

    # 4. held-out evaluation over a few sampler settings
    seeds = list(range(args.eval_seeds))
    history["eval"] = []
    for setting in args.eval_grid.split(","):
        steps, guidance, shift = setting.split(":")
        t0 = time.perf_counter()
        res, frames = evaluate(dit, vae, contexts, empty_ctx, data.HELD_OUT, seeds, int(steps), float(guidance),
                               float(shift))
        res["seconds"] = round(time.perf_counter() - t0, 1)
        history["eval"].append(res)
        if args.samples and len(history["eval"]) == 1:
            save_grid(frames[:: len(seeds)], Path(args.samples))
        log(f"held-out {setting}: colour {res['colour']:.3f} motion {res['motion']:.3f} both {res['both']:.3f}")
        save_log()
    res, _ = evaluate(dit, vae, contexts, empty_ctx, data.TRAIN_SCENES[:24], seeds, int(default_steps),
                      *(float(x) for x in args.eval_grid.split(",")[0].split(":")[1:]))
    history["eval_train_scenes"] = res
    log(f"train scenes (default setting): both {res['both']:.3f}")
    save_log()
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
