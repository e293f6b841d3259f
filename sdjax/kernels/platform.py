"""Where our Hopper kernels (Pallas Mosaic GPU: wgmma, TMA, clusters) can run."""

from __future__ import annotations

import jax


def not_hopper_reason() -> str | None:
    """Why this process's first device can't run a Hopper kernel (None if it is an sm_90 GPU)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu" or not str(getattr(dev, "compute_capability", "")).startswith("9."):
        return f"needs an sm_90 (Hopper) GPU, got {dev.device_kind}"
    return None
