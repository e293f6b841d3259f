"""Reference fixtures for the Wan2.1 VAE port (sdjax/models/wan/vae.py), from diffusers' AutoencoderKLWan.

Run with the reference venv:  /work/refvenv/bin/python tools/make_vae_fixtures.py

Writes tests/fixtures/wan_vae_{tiny,mid}/: `save_pretrained` output (config.json + safetensors) and io.npz:
  decode_z      (B, Z, 3, h, w)        random latent (3 latent frames -> 9 video frames)
  decode_out    (B, 3, 9, 8h, 8w)      vae.decode(decode_z) in float32 (clamped to [-1, 1])
  decode_bf16   (B, 3, 9, 8h, 8w)      the same with the model cast to bfloat16 (stored as float32)
  encode_video  (B, 3, 9, 8h, 8w)      random video in [-1, 1]
  encode_mean   (B, Z, 3, h, w)        vae.encode(encode_video).latent_dist.mean in float32

tiny: base_dim 4, decoder_base_dim 6, z_dim 4, dim_mult [1,2,2,2], 1 res-block, float32 weights.
mid:  the real Wan2.1 structure (dim_mult [1,2,4,4], 2 res-blocks, z_dim 16, temporal [F,T,T]) at base_dim 4;
      weights rounded to float16 and saved as float16 to keep the directory under 1 MB (the reference
      outputs are computed from exactly those values in float32).
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.utils import logging

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

CONFIGS = {
    "wan_vae_tiny": dict(
        model=dict(base_dim=4, decoder_base_dim=6, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True],
                   latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.8, 2.0, 1.1]),
        batch=2, latent_hw=(2, 3), save_dtype=torch.float32),
    "wan_vae_mid": dict(
        model=dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True]),
        batch=1, latent_hw=(2, 3), save_dtype=torch.float16),
}


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights with non-trivial magnitude: conv N(0, 1/fan_in)·gain, biases N(0, 0.1²), gains 1 ± 0.3."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * (2 * torch.rand(p.shape, generator=gen) - 1))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = math.prod(p.shape[1:])
                gain = 0.5 if name.startswith("decoder.conv_out") else 1.2
                p.copy_(gain / math.sqrt(fan_in) * torch.randn(p.shape, generator=gen))


def main() -> None:
    logging.set_verbosity_error()  # `.to(bfloat16)` warns about _keep_in_fp32_modules (empty for this VAE)
    for name, spec in CONFIGS.items():
        gen = torch.Generator().manual_seed(1234)
        model = AutoencoderKLWan(**spec["model"]).eval()
        randomize(model, gen)
        if spec["save_dtype"] != torch.float32:  # reference computed from the stored (rounded) values
            model = model.to(spec["save_dtype"]).to(torch.float32)
        z_dim = spec["model"]["z_dim"]
        B, (h, w) = spec["batch"], spec["latent_hw"]
        z = torch.randn((B, z_dim, 3, h, w), generator=gen)
        video = 2 * torch.rand((B, 3, 9, 8 * h, 8 * w), generator=gen) - 1
        with torch.no_grad():
            dec = model.decode(z).sample
            mean = model.encode(video).latent_dist.mean
            dec_bf16 = copy.deepcopy(model).to(torch.bfloat16).decode(z.to(torch.bfloat16)).sample.float()
        clamped = (dec.abs() >= 1.0).float().mean().item()
        bf16_err = ((dec_bf16 - dec).norm() / dec.norm()).item()
        print(f"{name}: decode {tuple(dec.shape)} std {dec.std():.3f} clamped {clamped:.1%}; "
              f"encode {tuple(mean.shape)} std {mean.std():.3f}; diffusers bf16 vs fp32 {bf16_err:.2e}")

        out = ROOT / name
        shutil.rmtree(out, ignore_errors=True)
        model.to(spec["save_dtype"]).save_pretrained(out, safe_serialization=True)
        np.savez(out / "io.npz", decode_z=z.numpy(), decode_out=dec.numpy(), decode_bf16=dec_bf16.numpy(),
                 encode_video=video.numpy(), encode_mean=mean.numpy())
        n_params = sum(p.numel() for p in model.parameters())
        (out / "README.txt").write_text(
            f"Wan2.1 VAE reference fixture ({name}), diffusers AutoencoderKLWan with random weights "
            f"({n_params} parameters, stored as {str(spec['save_dtype']).removeprefix('torch.')}).\n"
            "Regenerate with: /work/refvenv/bin/python tools/make_vae_fixtures.py\n"
            "io.npz: see the docstring of tools/make_vae_fixtures.py.\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"  wrote {out} ({size / 1024:.0f} KiB, {n_params} params)")


if __name__ == "__main__":
    main()
