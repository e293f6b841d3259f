"""A small deterministic engine with the `Pipeline` stage API, for the service tests.

Real numpy frames (a function of seed and prompt), a sleep per denoising step so that cancel-mid-denoise,
drain and worker-kill are testable, `on_step` / `should_stop` honoured like `Pipeline.denoise`. A prompt
containing FAIL_MARK makes denoise raise (an engine error).

`make(settings, model)` is the `--engine tests.serve.fake_engine:make` factory. `model` may name a directory
holding `fake.json` ({"version": ..., "name": ..., "step_seconds": ..., "fail_warmup": ...}); a missing or
malformed file is a broken model. Env `SDJAX_FAKE_STEP_SECONDS` sets the default step time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdjax.config import ModelConfig, ModelDefaults, ModelLimits
from sdjax.media import to_uint8

DEFAULTS = ModelDefaults(num_inference_steps=8, guidance_scale=5.0, flow_shift=3.0, height=32, width=48,
                         num_frames=5, fps=8, max_sequence_length=16, cache_thresholds={"teacache": 0.1})
LIMITS = ModelLimits(frame_multiple=4, spatial_multiple=16, max_frames=33, max_height=256, max_width=256,
                     max_steps=200)
PATCH = 8  # latent pixels per frame pixel side
FAIL_MARK = "[engine-fail]"


class Cancelled(Exception):
    """Like sdjax.pipeline.Cancelled."""


@dataclass
class FakeLatents:
    array: np.ndarray  # (F, H/8, W/8, 3)
    cache_skip_ratio: float


class FakeEngine:
    def __init__(self, name: str = "fake-tiny", version: str = "v1", step_seconds: float = 0.02,
                 fail_warmup: bool = False):
        self.config = ModelConfig(name=name, transformer={}, vae={}, text_encoder={}, defaults=DEFAULTS,
                                  limits=LIMITS)
        self.version = version
        self.step_seconds = step_seconds
        self.fail_warmup = fail_warmup
        self.warmed: list[tuple[int, int, int]] = []
        self.output_types: set[str] = set()  # the frames' forms the caller asked for (warm-up and decode)

    def user_params(self, **kw):
        return self.config.user_params(**kw)

    def encode_text(self, params) -> np.ndarray:
        time.sleep(self.step_seconds)
        digest = hashlib.sha256(params.prompt.encode()).digest()
        return np.frombuffer(digest[:3], np.uint8).astype(np.float32) / 255.0  # the prompt's colour

    def denoise(self, params, text, *, on_step=None, should_stop=None, stats=None) -> FakeLatents:
        rng = np.random.default_rng(params.seed)
        z = rng.random((params.num_frames, params.height // PATCH, params.width // PATCH, 3), dtype=np.float32)
        n, skipped = params.num_inference_steps, 0
        if FAIL_MARK in params.prompt:
            raise RuntimeError("fake engine: the denoiser blew up")
        for i in range(n):
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped before step {i + 1} of {n}")
            if params.cache.policy != "none" and i % 2 == 1:
                skipped += 1  # a "cached" step: free
            else:
                time.sleep(self.step_seconds)
                z = 0.7 * z + 0.3 * text
            if on_step is not None:
                on_step(i + 1, n)
        if stats is not None:
            stats.update(steps_computed=n - skipped, steps_skipped=skipped)
        return FakeLatents(z, skipped / n)

    def decode(self, latents: FakeLatents, output_type: str = "np") -> np.ndarray:
        time.sleep(self.step_seconds)
        self.output_types.add(output_type)
        frames = np.repeat(np.repeat(latents.array, PATCH, axis=1), PATCH, axis=2)
        frames = np.clip(frames, 0.0, 1.0).astype(np.float32)  # (F, H, W, 3)
        return to_uint8(frames) if output_type == "uint8" else frames

    def warmup(self, params, output_type: str = "np") -> dict:
        if self.fail_warmup:
            raise RuntimeError("fake engine: warm-up failed (broken weights)")
        self.warmed.append((params.width, params.height, params.num_frames))
        self.output_types.add(output_type)
        return {"leads_s": 0.0, "side_by_side_s": 0.0, "side_by_side_compile_s": 0.0, "runs_s": 0.0, "variants": 1,
                "workers": 1}  # the shape of Pipeline.warmup's answer


def make(settings, model: str | None = None) -> FakeEngine:
    step = float(os.environ.get("SDJAX_FAKE_STEP_SECONDS", "0.02"))
    if model is None:
        return FakeEngine(step_seconds=step)
    path = Path(model) / "fake.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a fake model directory holds fake.json)")
    spec = json.loads(path.read_text())  # malformed JSON = broken weights
    return FakeEngine(name=spec.get("name", "fake-tiny"), version=str(spec["version"]),
                      step_seconds=float(spec.get("step_seconds", step)), fail_warmup=bool(spec.get("fail_warmup")))
