"""What the service needs from an engine, how one is made, and how its frames become a file.

The real engine is `sdjax.pipeline.Pipeline` (imported lazily: the service imports without it); any object
with the methods of `Engine` works (`--engine module:callable` picks a factory, e.g. the tests' fake engine).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sdjax.media import save


@runtime_checkable
class Engine(Protocol):
    """The stage API of `sdjax.pipeline.Pipeline` that the scheduler drives.

    `config` has `.name`, `.defaults` (ModelDefaults) and `.limits` (ModelLimits). Optional attributes the
    service reads when present: `version` (weights version label). `denoise` fills `stats` (a dict) with
    `steps_computed` / `steps_skipped` of the feature cache.
    """

    config: Any

    def user_params(self, **kw) -> Any: ...  # UserParams; raises sdjax.config.ConfigError naming the field

    def encode_text(self, params) -> Any: ...

    def denoise(self, params, text, *, on_step=None, should_stop=None, stats=None) -> Any: ...  # raises on stop

    # (F, H, W, 3): float32 in [0, 1] ("np") or uint8 ("uint8": what the service writes)
    def decode(self, latents, output_type: str = "np") -> np.ndarray: ...

    def warmup(self, params, output_type: str = "np") -> dict | None: ...  # compiles decode for output_type


EngineFactory = Callable[..., Engine]  # factory(settings, model: str | None) -> Engine


def pipeline_engine(settings, model: str | None = None) -> Engine:
    """The real engine: `Pipeline.from_pretrained(model)` or, with no model named, the embedded default."""
    from sdjax.pipeline import Pipeline

    system = settings.system_config()
    system.apply_to_runtime()
    if model is None:
        return Pipeline.default(system=system, dtype=settings.dtype or "float32")
    return Pipeline.from_pretrained(model, dtype=settings.dtype, system=system)


def resolve_factory(spec: str | None) -> EngineFactory:
    """'package.module:callable' -> the callable; None -> the real pipeline."""
    if not spec:
        return pipeline_engine
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--engine {spec!r} must look like 'package.module:factory'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--engine {spec!r} cannot be loaded: {e}") from e


def check_engine(engine) -> None:
    """Fail at start-up, naming what is missing, when an engine does not have the methods the scheduler calls (an
    `--engine` written to an older protocol: `decode` / `warmup` take `output_type` since the service asks for
    uint8 frames)."""
    missing = [name for name in ("user_params", "encode_text", "denoise", "decode", "warmup")
               if not callable(getattr(engine, name, None))]
    if missing or not hasattr(engine, "config"):
        raise TypeError(f"engine {type(engine).__name__} lacks {', '.join(missing or ['config'])}: "
                        "see sdjax.serve.engine.Engine")
    for name in ("decode", "warmup"):
        params = inspect.signature(getattr(engine, name)).parameters
        if "output_type" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"engine {type(engine).__name__}.{name} must take output_type ('np' | 'uint8'): "
                            "see sdjax.serve.engine.Engine")


def engine_version(engine: Engine) -> str:
    return str(getattr(engine, "version", None) or "1")


# ------------------------------------------------------------------------------------- artefacts


def write_artefact(frames: np.ndarray, path_stem: Path, fps: int, metadata: dict) -> Path:
    """MP4 (H.264, yuv420p) or, for one frame, PNG, with the generation params in the file's metadata."""
    return Path(save(frames, Path(str(path_stem) + (".png" if len(frames) == 1 else ".mp4")), fps, metadata))
