"""sdjax: JAX inference and serving for diffusion transformers (Wan2.1 first).

    import sdjax
    result = sdjax.generate("a red circle moves left on a black background")
    result.frames  # (F, H, W, 3) float32 in [0, 1]

(`python -m sdjax.generate` is the command-line twin of `sdjax.generate`.)
"""

from sdjax.config import CacheParams, ConfigError, ModelConfig, SystemConfig, UserParams

__all__ = ["CacheParams", "ConfigError", "GenerationResult", "ModelConfig", "Pipeline", "SystemConfig",
           "UserParams", "generate"]


def __getattr__(name):
    # The pipeline pulls in JAX and every model; API-only processes (the service's front) never need it.
    if name in ("GenerationResult", "Pipeline", "generate"):
        from sdjax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
