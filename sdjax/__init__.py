"""sdjax: JAX inference and serving for diffusion transformers (Wan2.1 first).

    import sdjax
    result = sdjax.generate("a red circle moves left on a black background")
    result.frames  # (F, H, W, 3) float32 in [0, 1]

(`python -m sdjax.generate` is the command-line twin of `sdjax.generate`.)
"""

from sdjax.config import CacheParams, ConfigError, ModelConfig, SystemConfig, UserParams
from sdjax.pipeline import GenerationResult, Pipeline, generate

__all__ = ["CacheParams", "ConfigError", "GenerationResult", "ModelConfig", "Pipeline", "SystemConfig",
           "UserParams", "generate"]
