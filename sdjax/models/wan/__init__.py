"""Wan2.1: the diffusion transformer (and, beside it, the VAE)."""

from sdjax.models.wan.loading import load_transformer
from sdjax.models.wan.transformer import WanTransformer3DModel, WanTransformerConfig

__all__ = ["WanTransformer3DModel", "WanTransformerConfig", "load_transformer"]
