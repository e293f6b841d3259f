"""Reference outputs of diffusers' WanTransformer3DModel on small random models (parity fixtures).

Run with the reference environment (Python 3.11, torch CPU, diffusers):
    /path/to/refvenv/bin/python tools/make_wan_dit_fixtures.py
Writes tests/fixtures/wan_dit/<name>/{config.json, diffusion_pytorch_model.safetensors, io.npz} and, for the
first config, the same weights in the original Wan layout under original/.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "wan_dit"

CONFIGS = {
    # name: (transformer kwargs, latent shape (B, C, F, H, W), text rows, timesteps)
    "heads2_odd": (dict(num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                        text_dim=32, ffn_dim=32, num_layers=3, rope_max_seq_len=32),
                   (1, 16, 3, 6, 10), 12, [999]),
    "heads3_b2": (dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4,
                       text_dim=24, ffn_dim=48, num_layers=3, rope_max_seq_len=32),
                  (2, 4, 5, 4, 6), 9, [500, 3]),
    "heads4_deep": (dict(num_attention_heads=4, attention_head_dim=8, in_channels=8, out_channels=8,
                         text_dim=16, ffn_dim=40, num_layers=4, rope_max_seq_len=32),
                    (1, 8, 2, 8, 6), 16, [250]),
}

# diffusers -> original Wan names (inverse of the loader's table), for the original-layout fixture.
TO_ORIGINAL = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights with non-trivial magnitudes, so every path matters in the comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "scale_shift_table" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def main() -> None:
    for idx, (name, (kwargs, latent_shape, text_rows, timesteps)) in enumerate(CONFIGS.items()):
        gen = torch.Generator().manual_seed(1234 + idx)
        model = WanTransformer3DModel(**kwargs).eval()
        randomise(model, gen)
        B = latent_shape[0]
        latents = torch.randn(latent_shape, generator=gen)
        context = torch.randn(B, text_rows, kwargs["text_dim"], generator=gen)
        context[:, text_rows // 2 :] = 0.0  # Wan zero-pads the text context
        t = torch.tensor(timesteps, dtype=torch.int64)
        with torch.no_grad():
            out = model(hidden_states=latents, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        # diffusers' own bf16 run (from_pretrained keeps its fp32 modules; bf16 residual stream): the error a
        # bf16 model of ours is held to.
        bf16 = WanTransformer3DModel.from_pretrained(d, torch_dtype=torch.bfloat16).eval()
        with torch.no_grad():
            out_bf16 = bf16(hidden_states=latents.bfloat16(), timestep=t, encoder_hidden_states=context.bfloat16(),
                            return_dict=False)[0].float()
        np.savez_compressed(d / "io.npz", latents=latents.numpy(), timestep=t.numpy(),
                            context=context.numpy(), output=out.numpy(), output_diffusers_bf16=out_bf16.numpy())
        if idx == 0:  # the same weights in the original Wan checkpoint layout
            orig = d / "original"
            orig.mkdir(exist_ok=True)
            sd = {}
            for k, v in model.state_dict().items():
                for pat, repl in TO_ORIGINAL:
                    k2, n = re.subn(pat, repl, k)
                    if n:
                        k = k2
                        break
                sd[k] = v.contiguous()
            save_file(sd, orig / "diffusion_pytorch_model.safetensors")
            dim = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
            (orig / "config.json").write_text(json.dumps({
                "_class_name": "WanModel", "dim": dim, "num_heads": kwargs["num_attention_heads"],
                "ffn_dim": kwargs["ffn_dim"], "freq_dim": 256, "in_dim": kwargs["in_channels"],
                "out_dim": kwargs["out_channels"], "num_layers": kwargs["num_layers"], "eps": 1e-6,
                "text_len": 512, "model_type": "t2v", "text_dim": kwargs["text_dim"]}, indent=1))
        print(name, "output", tuple(out.shape), "norm", float(out.norm()))
    (OUT / "README.txt").write_text("Generated by tools/make_wan_dit_fixtures.py (diffusers WanTransformer3DModel, "
                                    "random weights). Do not edit by hand.\n")


if __name__ == "__main__":
    main()
