"""Wan2.1 text-to-video as three stages — text encode → denoise → decode — each runnable and timed alone.

    pipe = Pipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", dtype="bfloat16")
    result = pipe(prompt="a cat surfing", num_inference_steps=50, guidance_scale=5.0, seed=0)
    result.frames  # (F, H, W, 3) float32 in [0, 1] (output_type="uint8": 0..255);  result.info: seed, timings, steps

A scheduler (the service) drives the stages one by one: `user_params` → `encode_text` → `denoise` →
`decode`. Arguments are named as diffusers' `WanPipeline` names them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import (
    CACHE_POLICIES,
    CONFIG_DIR,
    SOLVERS,
    CacheParams,
    ConfigError,
    ModelConfig,
    SystemConfig,
    UserParams,
)
from sdjax.kernels.attention import KEY_BIAS_BACKENDS
from sdjax.models.tokenizer import encode_prompts, load_tokenizer, prompt_clean, wan_text_context
from sdjax.models.umt5 import load_text_encoder
from sdjax.models.wan.loading import load_transformer
from sdjax.models.wan.transformer import WanTransformerConfig, fold_text_padding, text_lengths
from sdjax.models.wan.vae import COMPILER_OPTIONS as VAE_COMPILER_OPTIONS
from sdjax.models.wan.vae import load_vae
from sdjax.models.weights import WeightsError, read_config
from sdjax.numerics import GEMM_COMPILER_OPTIONS
from sdjax.sampling import cache, loop, solvers
from sdjax.sharding import vae as parallel_vae

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
DEMO_MODEL = "sdjax-demo"
# Text rows a folded context keeps (`fold_text_padding`): prompts shorter than this attend to that many keys
# instead of max_sequence_length, the same function. On an H100 it saved 4.2 ms of a CFG step (−0.20 s end to
# end; at most 8.6 without cuDNN's key bias, and 64 rows no more: benchmarks/NOTES.md, session 9). 0: off (A/B).
TEXT_FOLD_ROWS = 128


class Cancelled(Exception):
    """Raised by `Pipeline.denoise` when `should_stop()` returned True between two steps."""


@dataclass
class TextEmbeddings:
    """Stage 1 output: Wan text context for each CFG branch, (1, S, text_dim) each."""

    cond: jax.Array
    uncond: jax.Array | None


# The frames' form on the host: "np" float32 in [0, 1] (diffusers' default), or "uint8" 0..255 — what MP4/PNG files
# hold, rounded on the device: a quarter of the bytes to copy and no conversion on the host (NOTES, session 17: the
# 480p/81f decode to the host 0.738 -> 0.717 s on one H200, 0.634 -> 0.494 s on two).
OUTPUT_TYPES = ("np", "uint8")


@dataclass
class GenerationResult:
    frames: np.ndarray  # (F, H, W, 3): float32 in [0, 1], or uint8 with output_type="uint8"
    info: dict = field(default_factory=dict)


def _check_root(root: Path) -> dict:
    if not root.is_dir():
        raise WeightsError(f"{root}: model directory does not exist")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(f"{index_path}: missing (a diffusers-format pipeline root needs model_index.json)")
    index = json.loads(index_path.read_text())
    for name in COMPONENTS:
        if name not in index or not (root / name).is_dir():
            raise WeightsError(f"{root / name}: component {name!r} is missing from the model directory")
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        raise WeightsError(f"{root / 'tokenizer' / 'tokenizer.json'}: missing (sdjax reads the fast-tokenizer file)")
    return index


def _model_config_for(root: Path, transformer_cfg: dict) -> ModelConfig:
    """The built-in model yaml whose architecture equals the checkpoint's; else 1.3B defaults around it."""
    theirs = WanTransformerConfig.from_dict(transformer_cfg)
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = ModelConfig.from_yaml(path)
        if WanTransformerConfig.from_dict(cfg.transformer) == theirs:
            return cfg
    base = ModelConfig.named("wan2.1-t2v-1.3b")
    return dataclasses.replace(base, name=root.name, transformer=transformer_cfg, weights=str(root))


def _scheduler_shift(root: Path) -> float | None:
    path = root / "scheduler" / "scheduler_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        return cfg.get("flow_shift", cfg.get("shift"))
    return None


def _check_components(transformer, vae, text_encoder, tokenizer) -> None:
    """Components from different checkpoints fail here by name, not as a shape error deep inside a jitted stage (or,
    for a tokenizer larger than the embedding table, as NaN embeddings without any error)."""
    dit, z = transformer.config, vae.config.z_dim
    if dit.in_channels != z or dit.out_channels != z:
        raise WeightsError(f"transformer: in_channels={dit.in_channels}, out_channels={dit.out_channels}, but the "
                           f"vae has z_dim={z}: the two do not belong together")
    if text_encoder is None:  # driven by precomputed prompt embeddings (benchmarks)
        return
    text = text_encoder.config
    if dit.text_dim != text.d_model:
        raise WeightsError(f"transformer: text_dim={dit.text_dim}, but the text encoder has d_model={text.d_model}: "
                           f"the two do not belong together")
    if tokenizer is not None and tokenizer.get_vocab_size() > text.vocab_size:
        raise WeightsError(f"tokenizer: {tokenizer.get_vocab_size()} tokens, but the text encoder embeds only "
                           f"vocab_size={text.vocab_size}: the two do not belong together")


class Pipeline:
    """The Wan2.1 text-to-video pipeline over loaded components."""

    def __init__(self, config: ModelConfig, transformer, vae, text_encoder, tokenizer,
                 system: SystemConfig | None = None):
        self.config = config
        self.system = system or SystemConfig()
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        _check_components(transformer, vae, text_encoder, tokenizer)
        vcfg = vae.config
        self.temporal_factor = vcfg.temporal_factor
        self.spatial_factor = vcfg.spatial_factor
        # On a mesh (system layout > 1 device) the DiT carries it; the VAE decode splits over the same devices.
        parallel = getattr(transformer, "parallel", None)
        self.mesh = None if parallel is None else parallel.mesh
        parallel_vae.shard_vae(vae, self.mesh)
        self._encode = jax.jit(lambda enc, ids, mask: enc(ids, mask), compiler_options=GEMM_COMPILER_OPTIONS)
        self._decode = {output_type: jit_decode_frames(self.mesh, output_type) for output_type in OUTPUT_TYPES}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | Path | None, dtype: str | None = None, system: SystemConfig | None = None,
                        model_config: ModelConfig | str | None = None) -> Pipeline:
        """Load a diffusers-format root (model_index.json, tokenizer/, text_encoder/, transformer/, vae/)."""
        system = system or SystemConfig()
        dtype = dtype or system.dtype
        if path is None and system.weights is None:
            raise ConfigError("from_pretrained: give a model directory (path=…, or SystemConfig(weights=…))")
        root = Path(path if path is not None else system.weights)
        _check_root(root)
        if isinstance(model_config, str):
            model_config = ModelConfig.named(model_config)
        if model_config is None:
            model_config = _model_config_for(root, read_config(root / "transformer"))
        shift = _scheduler_shift(root)
        if shift is not None and shift != model_config.defaults.flow_shift:
            defaults = dataclasses.replace(model_config.defaults, flow_shift=float(shift))
            model_config = dataclasses.replace(model_config, defaults=defaults)
        residual_dtype = system.residual_dtype if dtype == system.dtype else None  # `dtype` overrides the system's
        transformer = load_transformer(root / "transformer", dtype=dtype, residual_dtype=residual_dtype,
                                       attention_backend=system.attention_backend,
                                       expected_config=WanTransformerConfig.from_dict(model_config.transformer),
                                       system=system)
        # The VAE follows the pipeline dtype: fp32 convolutions run without tensor cores (9.2 s vs 1.0 s in bf16 at
        # 480p on an H100), and a bf16 decode stays within ~57 dB PSNR of fp32 (benchmarks/NOTES.md).
        vae = load_vae(root / "vae", dtype=dtype)
        text_encoder = load_text_encoder(root / "text_encoder", dtype=dtype)
        tokenizer = load_tokenizer(root / "tokenizer" / "tokenizer.json")
        return cls(model_config, transformer, vae, text_encoder, tokenizer, system)

    @classmethod
    def default(cls, system: SystemConfig | None = None, dtype: str = "float32") -> Pipeline:
        """The embedded demo model shipped inside the package (runs offline, on a CPU)."""
        cfg = ModelConfig.named(DEMO_MODEL)
        return cls.from_pretrained(cfg.weights, dtype=dtype, system=system, model_config=cfg)

    # ------------------------------------------------------------------ stages

    def user_params(self, **kwargs) -> UserParams:
        return self.config.user_params(**kwargs)

    def latent_shape(self, params: UserParams) -> tuple[int, ...]:
        z = self.vae.config.z_dim
        return (1, z, (params.num_frames - 1) // self.temporal_factor + 1,
                params.height // self.spatial_factor, params.width // self.spatial_factor)

    def encode_prompt(self, prompt: str, max_sequence_length: int) -> jax.Array:
        """One prompt -> Wan text context (1, S, D): real tokens kept, the rest zeroed."""
        ids, mask = encode_prompts(self.tokenizer, [prompt_clean(prompt)], max_sequence_length)
        hidden = self._encode(self.text_encoder, jnp.asarray(ids), jnp.asarray(mask))
        return wan_text_context(hidden, jnp.asarray(mask)).astype(jnp.float32)

    def encode_text(self, params: UserParams, *, prompt_embeds=None, negative_prompt_embeds=None) -> TextEmbeddings:
        """Stage 1: text encoder on the prompt and (when CFG is on) the negative prompt."""
        cond = (jnp.asarray(prompt_embeds, jnp.float32) if prompt_embeds is not None
                else self.encode_prompt(params.prompt, params.max_sequence_length))
        uncond = None
        if params.guidance_scale > 1.0:  # diffusers' rule: CFG only above 1
            uncond = (jnp.asarray(negative_prompt_embeds, jnp.float32) if negative_prompt_embeds is not None
                      else self.encode_prompt(params.negative_prompt, params.max_sequence_length))
        return TextEmbeddings(cond, uncond)

    def initial_latents(self, params: UserParams) -> jax.Array:
        return jax.random.normal(jax.random.key(params.seed), self.latent_shape(params), jnp.float32)

    def denoise(self, params: UserParams, text: TextEmbeddings, *, latents=None, on_step=None,
                should_stop=None, stats: dict | None = None) -> jax.Array:
        """Stage 2: the flow-matching loop. One compiled step per latent shape and cache policy; the host drives
        the steps, the feature cache (`params.cache`) decides on the device. `stats`, a dict, receives
        `steps_computed` / `steps_skipped` (and the per-step log) after the loop."""
        state, shared, static = self._step_inputs(params, text, latents)
        n = params.num_inference_steps
        for i in range(n):
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped before step {i + 1} of {n}")
            state = loop.denoise_step(self.transformer, state, jnp.int32(i), *shared, **static)
            if on_step is not None:
                on_step(i + 1, n)
        if stats is not None:
            stats.update(cache.summary(state.cache, n))
        return state.latents

    def _step_inputs(self, params: UserParams, text: TextEmbeddings, latents=None):
        """What the compiled step takes for this request: (the loop state at step 0, the traced inputs every step
        shares after the step index, the static arguments)."""
        if latents is None:
            latents = self.initial_latents(params)
        elif tuple(latents.shape) != self.latent_shape(params):
            raise ConfigError(f"latents: shape {tuple(latents.shape)} does not match height/width/num_frames "
                              f"(expected {self.latent_shape(params)})")
        n, max_steps = params.num_inference_steps, self.config.limits.max_steps
        schedule = solvers.make_schedule(params.solver, n, params.flow_shift).padded(max_steps)
        schedule = jax.tree.map(jnp.asarray, schedule)
        do_cfg = text.uncond is not None
        uncond = text.uncond if do_cfg else text.cond
        guidance = jnp.float32(params.guidance_scale)
        policy = params.cache.policy
        plan = cache.make_plan(policy, params.cache.threshold, n, max_steps, self.transformer.config)
        plan = jax.tree.map(jnp.asarray, plan)
        cond, uncond = self._fold_text_padding(text.cond, uncond)
        state = loop.init_state(params.solver, latents, policy, model=self.transformer, do_cfg=do_cfg,
                                max_steps=max_steps)
        return state, (schedule, cond, uncond, guidance, plan), dict(solver=params.solver, do_cfg=do_cfg,
                                                                      policy=policy)

    def _compile_step(self, params: UserParams, text: TextEmbeddings) -> None:
        """Compiles (without running) the step this request would run; a later call finds it in jit's cache."""
        state, shared, static = self._step_inputs(params, text)
        loop.denoise_step.lower(self.transformer, state, jnp.int32(0), *shared, **static).compile()

    def _folds_text_of_length(self, S: int) -> bool:
        """Whether contexts of S rows are folded when short prompts leave them padded."""
        return 0 < TEXT_FOLD_ROWS < S and self.transformer.blocks.attn2.backend in ("auto", *KEY_BIAS_BACKENDS)

    def _fold_text_padding(self, cond, uncond):
        """Both CFG contexts as `FoldedText`s of their first TEXT_FOLD_ROWS rows when every prompt's tokens end
        before that (the rest is Wan's zero padding) and the cross-attention takes a key bias; else unchanged."""
        if not self._folds_text_of_length(cond.shape[1]):
            return cond, uncond
        lengths = [int(n) for n in jax.device_get(text_lengths(jnp.concatenate([cond, uncond])))]  # one sync
        if max(lengths) >= TEXT_FOLD_ROWS:
            return cond, uncond
        B = cond.shape[0]
        return (fold_text_padding(cond, lengths[:B], TEXT_FOLD_ROWS),
                fold_text_padding(uncond, lengths[B:], TEXT_FOLD_ROWS))

    def decode(self, latents, output_type: str = "np") -> np.ndarray:
        """Stage 3: VAE decode -> frames (F, H, W, 3), float32 in [0, 1] ("np") or uint8 ("uint8")."""
        _check_output_type(output_type)
        return np.asarray(self._decode[output_type](self.vae, jnp.asarray(latents, jnp.float32)))

    def warmup(self, params: UserParams, output_type: str = "np") -> dict:
        """Compile every stage for this request's shape (the service calls it at start-up).

        The denoise step is compiled once per solver, cache policy and text form (padding folded for prompts
        shorter than TEXT_FOLD_ROWS tokens, whole otherwise), the per-request choices that change the program
        (thresholds are traced values), so no request pays a compile; the persistent compilation cache makes this
        cheap after the first start. The first variant of each text form compiles alone — on a GPU, XLA's
        autotuner times GEMM candidates on the device while it compiles, which concurrent compiles would disturb,
        and each text form has its own cross-attention shapes — the others then reuse its choices and compile
        side by side (XLA compiles outside the GIL); every variant finally runs one step.

        The decode is compiled for `output_type` (the service's: "uint8").
        Returns where the time went: `leads_s` (the first variant of each text form: compile and one step),
        `side_by_side_s` (the other variants' compiles, wall clock) and `side_by_side_compile_s` (their compile times
        summed: side_by_side_s × workers if nothing serializes them), `runs_s` (their one-step runs), `variants`,
        `workers`."""
        params = dataclasses.replace(params, num_inference_steps=1)
        clock, compile_s = time.perf_counter, []

        def compile_step(variant):
            start = clock()
            self._compile_step(*variant)
            compile_s.append(clock() - start)

        t0 = clock()
        text = self.encode_text(params)
        forms = [text]
        if self._folds_text_of_length(text.cond.shape[1]):  # short prompts fold their padding; long ones do not
            whole = (None if c is None else c.at[:, -1].set(1.0) for c in (text.cond, text.uncond))  # no padding
            forms.append(TextEmbeddings(*whole))
        variants = [(dataclasses.replace(params, solver=solver, cache=CacheParams(policy, params.cache.threshold)),
                     txt) for txt, solver, policy in itertools.product(forms, SOLVERS, CACHE_POLICIES)]
        per_form = len(SOLVERS) * len(CACHE_POLICIES)
        leads, rest = variants[::per_form], [v for i, v in enumerate(variants) if i % per_form]
        latents = jax.block_until_ready([self.denoise(*v) for v in leads][-1])
        t1 = clock()
        workers = max(1, min(len(rest), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(compile_step, rest))  # (raises the first compile error)
        t2 = clock()
        for variant, txt in rest:
            latents = self.denoise(variant, txt)
        jax.block_until_ready(latents)
        t3 = clock()
        self.decode(latents, output_type)
        return {"leads_s": t1 - t0, "side_by_side_s": t2 - t1, "side_by_side_compile_s": sum(compile_s),
                "runs_s": t3 - t2, "variants": len(variants), "workers": workers}

    # ------------------------------------------------------------------ one call

    def __call__(self, prompt: str, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, max_sequence_length: int | None = None,
                 seed: int | None = None, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 flow_shift: float | None = None, solver: str | None = None, cache=None,
                 output_type: str = "np", progress: bool = True) -> GenerationResult:
        _check_output_type(output_type)  # before any work
        params = self.user_params(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length, seed=seed, flow_shift=flow_shift, solver=solver, cache=cache)
        timings = {}

        t0 = time.perf_counter()
        text = self.encode_text(params, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        jax.block_until_ready(text.cond)
        timings["text_encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        bar = _progress_bar(params.num_inference_steps, progress)
        cache_stats = {}
        z = self.denoise(params, text, latents=None if latents is None else jnp.asarray(latents, jnp.float32),
                         on_step=lambda i, n: bar.update(1) if bar else None, stats=cache_stats)
        z = jax.block_until_ready(z)
        if bar:
            bar.close()
        timings["denoise_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        frames = self.decode(z, output_type)
        timings["decode_s"] = time.perf_counter() - t0
        info = {"model": self.config.name, "seed": params.seed, "params": _public(params), "timings": timings,
                "steps_computed": cache_stats["steps_computed"], "steps_skipped": cache_stats["steps_skipped"]}
        return GenerationResult(frames, info)


def jit_decode_frames(mesh=None, output_type: str = "np"):
    """`fn(vae, latents) -> frames (F, H, W, 3)`, float32 in [0, 1] or uint8 (`output_type`): stage 3 as the pipeline
    compiles it (channels-last convs, the width split over `mesh` when given); benchmarks time this same function.

    On a mesh the frames leave the program whole on every device (an all-gather): the host then copies one array
    instead of assembling the width-split pieces, 0.65 vs 0.73 s for 480p/81f on 2 GPUs (benchmarks/NOTES.md)."""
    whole = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _check_output_type(output_type)
    return jax.jit(lambda v, z: _to_frames(parallel_vae.decode(v, v.denormalize_latents(z), mesh), output_type),
                   compiler_options=VAE_COMPILER_OPTIONS, out_shardings=whole)


def _to_frames(video, output_type: str = "np"):
    """VAE output (1, 3, F, H, W) in [-1, 1] -> frames (F, H, W, 3) fp32 in [0, 1] or uint8, on the device: on the
    host the strided transpose and three passes over 400 MB (480p, 81 frames) took ~0.4 s (benchmarks/NOTES.md)."""
    frames = jnp.clip(video[0].astype(jnp.float32).transpose(1, 2, 3, 0) / 2 + 0.5, 0.0, 1.0)
    if output_type == "uint8":  # rounded to nearest, as sdjax.media.to_uint8 does on the host
        return (frames * 255.0 + 0.5).astype(jnp.uint8)
    return frames


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type={output_type!r} is not allowed; allowed: {', '.join(OUTPUT_TYPES)} "
                          "(float32 frames in [0, 1], or uint8)")


def _public(params: UserParams) -> dict:
    d = dataclasses.asdict(params)
    d["cache"] = dataclasses.asdict(params.cache)
    return d


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoise", unit="step")


def generate(prompt: str, model: str | Path | None = None, *, dtype: str | None = None,
             system: SystemConfig | None = None, **kwargs) -> GenerationResult:
    """One call: load the model (the embedded demo model when `model` is None) and generate."""
    model = model if model is not None else (system.weights if system is not None else None)
    if model is None:
        pipe = Pipeline.default(system=system, dtype=dtype or "float32")
    else:
        pipe = Pipeline.from_pretrained(model, dtype=dtype, system=system)
    return pipe(prompt, **kwargs)
