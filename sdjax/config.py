"""The parameter taxonomy.

- Model params (`ModelConfig`): static, from `configs/models/<model>.yaml`, tied to the weights.
- User params (`UserParams`): per request, validated on construction, defaults from the model yaml.
- System params (`SystemConfig`): launch-time (parallel layout, attention backend, dtype, paths); frozen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs" / "models"
DTYPES = ("float32", "bfloat16")
SOLVERS = ("unipc", "euler")
CACHE_POLICIES = ("none", "teacache", "fbcache", "static")


class ConfigError(ValueError):
    """A parameter with a value that is not allowed; the message names the field."""


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}={value!r} is not allowed: {allowed}")


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelDefaults:
    """Model-tied defaults for user params (from the model yaml)."""

    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    height: int
    width: int
    num_frames: int
    fps: int
    max_sequence_length: int
    negative_prompt: str = ""
    solver: str = "unipc"
    cache: dict = field(default_factory=lambda: {"policy": "none", "threshold": 0.0})
    # The threshold a request gets when it names a cache policy but no threshold: published or measured for
    # this model's weights. A policy missing here needs an explicit threshold (no silent no-op, no guess).
    cache_thresholds: dict = field(default_factory=dict)

    def __post_init__(self):
        for policy, threshold in self.cache_thresholds.items():
            CacheParams(policy, threshold)  # the model yaml is validated like a request
            if policy == "none":
                _fail("cache_thresholds", policy, f"keys among {', '.join(CACHE_POLICIES[1:])}")


@dataclass(frozen=True)
class ModelLimits:
    """What a request may ask of this model."""

    frame_multiple: int = 4  # num_frames = k * frame_multiple + 1 (the VAE's temporal factor)
    spatial_multiple: int = 16  # VAE x8, patch x2
    max_frames: int = 129
    max_height: int = 1280
    max_width: int = 1280
    max_steps: int = 100


@dataclass(frozen=True)
class ModelConfig:
    """Static model params: architecture sections (diffusers/transformers config names) and defaults."""

    name: str
    transformer: dict
    vae: dict
    text_encoder: dict
    defaults: ModelDefaults
    limits: ModelLimits
    weights: str | None = None  # default weights directory, relative to the yaml's folder (demo model)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"model config {str(path)!r} not found; built-in models: {known}")
        raw = yaml.safe_load(path.read_text())
        try:
            cfg = cls(
                name=raw["name"],
                transformer=dict(raw["transformer"]),
                vae=dict(raw.get("vae") or {}),
                text_encoder=dict(raw.get("text_encoder") or {}),
                defaults=ModelDefaults(**raw["defaults"]),
                limits=ModelLimits(**(raw.get("limits") or {})),
                weights=str((path.parent / raw["weights"]).resolve()) if raw.get("weights") else None,
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path}: malformed model config ({e})") from None
        return cfg

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """A built-in model config by name (e.g. 'wan2.1-t2v-1.3b') or a path to a yaml."""
        if name.endswith((".yaml", ".yml")):
            return cls.from_yaml(name)
        return cls.from_yaml(CONFIG_DIR / f"{name}.yaml")

    def user_params(self, **kwargs) -> UserParams:
        """UserParams with this model's defaults filled in and its limits checked."""
        return UserParams.for_model(self, **kwargs)


# ----------------------------------------------------------------------------------------------- user


@dataclass(frozen=True)
class CacheParams:
    """Feature-cache choice of one request."""

    policy: str = "none"
    threshold: float = 0.0

    def __post_init__(self):
        if self.policy not in CACHE_POLICIES:
            _fail("cache.policy", self.policy, f"one of {', '.join(CACHE_POLICIES)}")
        if not (isinstance(self.threshold, int | float) and math.isfinite(self.threshold) and self.threshold >= 0):
            _fail("cache.threshold", self.threshold, "a finite number >= 0")


@dataclass(frozen=True)
class UserParams:
    """Per-request knobs, named as diffusers' WanPipeline names them. Use `ModelConfig.user_params(...)`."""

    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    seed: int
    height: int
    width: int
    num_frames: int
    max_sequence_length: int
    flow_shift: float
    solver: str
    cache: CacheParams

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            _fail("prompt", self.prompt, "a non-empty string")
        if not isinstance(self.negative_prompt, str):
            _fail("negative_prompt", self.negative_prompt, "a string")
        for name in ("num_inference_steps", "height", "width", "num_frames", "max_sequence_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            _fail("seed", self.seed, "an integer in [0, 2**63)")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g) or g < 0:
            _fail("guidance_scale", g, "a finite number >= 0")
        s = self.flow_shift
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
            _fail("flow_shift", s, "a finite number > 0")
        if self.solver not in SOLVERS:
            _fail("solver", self.solver, f"one of {', '.join(SOLVERS)}")
        if not isinstance(self.cache, CacheParams):
            _fail("cache", self.cache, "CacheParams(policy=..., threshold=...)")

    @classmethod
    def for_model(cls, model: ModelConfig, *, prompt: str, seed: int | None = None, cache=None,
                  **kwargs) -> UserParams:
        d, lim = model.defaults, model.limits
        allowed = {f.name for f in dataclasses.fields(cls)} - {"prompt", "seed", "cache"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            allowed_all = sorted(allowed | {"prompt", "seed", "cache"})
            raise ConfigError(f"unknown user param(s) {unknown}; allowed: {allowed_all}")
        values = {name: kwargs.get(name) for name in allowed}
        for name, v in values.items():
            if v is None:
                values[name] = getattr(d, name)
        if seed is None:
            import secrets

            seed = secrets.randbits(31)
        if cache is None or isinstance(cache, dict):
            cache = _cache_params(d, cache or {})
        params = cls(prompt=prompt, seed=seed, cache=cache, **values)
        params.check_limits(lim)
        return params

    def check_limits(self, lim: ModelLimits) -> None:
        m = lim.frame_multiple
        if (self.num_frames - 1) % m or self.num_frames > lim.max_frames:
            _fail("num_frames", self.num_frames, f"{m}k+1 (1, {m + 1}, {2 * m + 1}, ...) and <= {lim.max_frames}")
        for name, hi in (("height", lim.max_height), ("width", lim.max_width)):
            v = getattr(self, name)
            if v % lim.spatial_multiple or v > hi:
                _fail(name, v, f"a multiple of {lim.spatial_multiple} and <= {hi}")
        if self.num_inference_steps > lim.max_steps:
            _fail("num_inference_steps", self.num_inference_steps, f"an integer in [1, {lim.max_steps}]")


# ----------------------------------------------------------------------------------------------- system


# `--attention-backend` of both command lines (python -m sdjax.serve, python -m sdjax.generate); argparse help.
ATTENTION_BACKEND_HELP = ("auto: the fastest exact kernel measured here; or a name (sdjax.kernels.attention.BACKENDS); "
                          "lossy on Hopper: pallas_mgpu_int8 (int8 Q·Kᵀ, ~8%% faster), "
                          "pallas_mgpu_int8_fp8 (+ fp8 P·V, ~14%% faster)")
RESIDUAL_DTYPE_HELP = ("where the DiT's residual stream is stored (default: in --dtype, as diffusers; float32: as the "
                       "original Wan code, more accurate, ~1%% slower)")


def _cache_params(d: ModelDefaults, cache: dict) -> CacheParams:
    """A request's cache dict -> CacheParams. Absent fields: the model's default policy; for the threshold, the
    default's own when the policy is the default one, else the model's recommended one for that policy."""
    unknown = sorted(set(cache) - {"policy", "threshold"})
    if unknown:
        raise ConfigError(f"unknown cache field(s) {unknown}; allowed: ['policy', 'threshold']")
    policy = cache.get("policy", d.cache["policy"])
    if "threshold" in cache:
        return CacheParams(policy, cache["threshold"])
    if policy == d.cache["policy"]:
        return CacheParams(policy, d.cache.get("threshold", 0.0))
    if policy == "none":
        return CacheParams(policy, 0.0)
    if policy in d.cache_thresholds:
        return CacheParams(policy, d.cache_thresholds[policy])
    CacheParams(policy)  # an unknown policy: its own error first
    recommended = ", ".join(f"{k}: {v}" for k, v in d.cache_thresholds.items()) or "none"
    _fail("cache.threshold", None, f"a number >= 0, required with cache.policy={policy!r}: this model has no "
                                   f"recommended threshold for it (recommended ones: {recommended})")


@dataclass(frozen=True)
class SystemConfig:
    """Launch-time params, fixed after init."""

    dtype: str = "bfloat16"
    # Where the DiT's residual stream is stored: None = in `dtype` (bf16: as diffusers, whose error it matches;
    # its element-wise passes move half the bytes), or "float32" (as the original Wan code; the more accurate).
    residual_dtype: str | None = None
    attention_backend: str = "auto"
    cfg_parallel: int = 1
    ulysses: int = 1
    ring: int = 1
    shard_weights: bool = False  # split the DiT's block weights over the mesh (14B on smaller cards)
    compile_cache_dir: str | None = None  # JAX's persistent compilation cache (a warm start compiles in seconds)
    weights: str | None = None  # the model directory to serve (None: the embedded demo model)

    def __post_init__(self):
        from sdjax.kernels.attention import BACKENDS

        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.residual_dtype not in (None, "float32", self.dtype):
            _fail("residual_dtype", self.residual_dtype, f"None (the dtype, {self.dtype}) or float32")
        if self.attention_backend not in BACKENDS:
            _fail("attention_backend", self.attention_backend, f"one of {', '.join(BACKENDS)}")
        for name in ("cfg_parallel", "ulysses", "ring"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "an integer >= 1")
        if self.cfg_parallel > 2:
            _fail("cfg_parallel", self.cfg_parallel, "1 or 2 (conditional and unconditional branches)")

    @property
    def num_devices(self) -> int:
        return self.cfg_parallel * self.ulysses * self.ring

    def apply_to_runtime(self) -> None:
        """Process-wide JAX settings these params imply; entry points (CLI, service) call it once at start."""
        if self.compile_cache_dir:
            import jax

            Path(self.compile_cache_dir).mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", str(self.compile_cache_dir))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
