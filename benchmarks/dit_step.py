"""Wan DiT forward: sdjax against diffusers at the same config and shape, one GPU, bf16, random weights.

    python benchmarks/dit_step.py [--cases 1.3b-480p-b1,1.3b-480p-b2,14b-480p-b1,1.3b-720p-b1] [--no-diffusers]
    python benchmarks/dit_step.py --cases 1.3b-480p-b1 --diffusers-compiled   # against compiled diffusers

A case is size-resolution-batch; batch "cfg" is the sampler's CFG batch (batch 2, block 0's self-attention shared).

Reports ms per forward, the ratio to diffusers (eager, or compiled with `--diffusers-compiled`), model FLOP
utilisation against 764 TFLOP/s (the measured H200 bf16 matmul rate; see shared anchors), compile time, and peak
memory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import re
import time

# JAX would otherwise reserve 75% of the card and starve the torch side of the comparison.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    GpuSampler,
    parse_xla_options,
    peak_gib,
    random_like,
    timed,
    torch_timing,
    use_key_bias_backend,
    use_long_kv_variant,
    use_plain_ffn_add,
    use_xla_norm,
    use_xla_residual_norm,
    write_results,
)
from sdjax.config import ModelConfig
from sdjax.models.wan.loading import abstract_transformer
from sdjax.models.wan.transformer import WanTransformerConfig, fold_text_padding
from sdjax.numerics import GEMM_COMPILER_OPTIONS
from sdjax.pipeline import TEXT_FOLD_ROWS

RES = {"480p": (480, 832), "720p": (720, 1280)}
PEAK_TFLOPS = 764.0
TEXT_LEN = 512


def flops(cfg: WanTransformerConfig, L: int, B: int, cfg_batch: bool = False, text_len: int = TEXT_LEN) -> float:
    """Matmul FLOPs of one forward (shared/research/wan.md §7); a CFG batch runs one self-attention less."""
    d, f, Lt = cfg.dim, cfg.ffn_dim, text_len
    self_attention = 8 * L * d * d + 4 * L * L * d
    per_layer = self_attention + 4 * L * d * d + 4 * Lt * d * d + 4 * L * d * f + 4 * L * Lt * d
    return B * cfg.num_layers * per_layer - (self_attention if cfg_batch else 0)


def parse_case(case: str):
    """"1.3b-480p-b2" -> (model, (h, w), batch 2, False); "...-cfg": a CFG batch (one latent twice, batch 2,
    `cfg_batch=True`: block 0's self-attention shared), as the sampler runs it."""
    size, res, b = case.split("-")
    return f"wan2.1-t2v-{size}", RES[res], 2 if b == "cfg" else int(b[1:]), b == "cfg"


def folded_prompts(ctx, lengths):
    """ctx (B, S, D) as prompts of `lengths` tokens, their zero padding folded as the pipeline folds it."""
    lengths = jnp.asarray(lengths, jnp.int32)
    ctx = jnp.where(jnp.arange(ctx.shape[1])[None, :, None] < lengths[:, None, None], ctx, 0.0)
    return fold_text_padding(ctx, lengths, TEXT_FOLD_ROWS)


def random_forward_inputs(cfg, shape, B, backend="auto", cfg_batch=False, fused_backend="auto", text_len=TEXT_LEN,
                          fold_text=None, residual_dtype=None):
    """(model with random bf16 weights, latents (B, 16, *shape), timesteps, text context) of a benchmark forward."""
    model = random_like(abstract_transformer(cfg, "bfloat16", backend, fused_backend=fused_backend,
                                             residual_dtype=residual_dtype))
    key = jax.random.key(1)
    x = jax.random.normal(key, (B, 16, *shape), jnp.float32)
    if cfg_batch:
        x = jnp.concatenate([x[:1], x[:1]])
    t = jnp.full((B,), 500.0)
    ctx = jax.random.normal(key, (B, text_len, cfg.text_dim), jnp.float32)
    if fold_text is not None:  # a prompt of fold_text tokens (and the empty negative prompt), padding folded
        ctx = folded_prompts(ctx, [fold_text, 1][:B] if cfg_batch else [fold_text] * B)
    return model, x, t, ctx


def bench_sdjax(cfg, shape, B, backend, cfg_batch=False, fused_backend="auto", compiler_options=None,
                text_len=TEXT_LEN, fold_text=None, residual_dtype=None):
    model, x, t, ctx = random_forward_inputs(cfg, shape, B, backend, cfg_batch, fused_backend, text_len, fold_text,
                                             residual_dtype)
    fwd = jax.jit(lambda m, x, t, c: m(x, t, c, cfg_batch=cfg_batch))
    t0 = time.perf_counter()
    compiled = fwd.lower(model, x, t, ctx).compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    with GpuSampler(period_ms=100) as gpu:  # the timed calls' clock and power (the cards run power-capped)
        times = timed(compiled, model, x, t, ctx, warmup=2, iters=5)
    out = compiled(model, x, t, ctx)
    finite = bool(jnp.isfinite(out).all())
    peak = peak_gib()
    # GEMMs whose bias + GELU XLA gave to cuBLASLt's epilogue (the scan's body holds one a block): 0 means the
    # FFN's GELU lost the form XLA's GEMM rewriter matches
    hlo = compiled.as_text()
    gelu_epilogues = hlo.count('"epilogue":"BIAS_GELU"')
    stream_epilogues = len(re.findall(r'"beta":1[,}]', hlo))  # GEMMs adding the stream (the FFN's fc2)
    del model, out
    gc.collect()
    return float(np.median(times)), compile_s, peak, finite, gelu_epilogues, stream_epilogues, gpu.summary()


def bench_diffusers(cfg, shape, B, compiled=False):
    """(seconds per forward, peak GiB, compile seconds or None) of diffusers' model: eager with its default SDPA,
    or `compiled` the strongest way we know (torch.compile max-autotune without CUDA graphs, cuDNN attention)."""
    import torch
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kwargs = {k: getattr(cfg, k) for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers",
                                           "text_dim", "in_channels", "out_channels", "freq_dim", "eps",
                                           "rope_max_seq_len", "qk_norm", "cross_attn_norm")}
    with torch.device("cuda"):
        model = WanTransformer3DModel(patch_size=cfg.patch_size, **kwargs).to(torch.bfloat16).eval()
    x = torch.randn(B, 16, *shape, device="cuda", dtype=torch.bfloat16)
    t = torch.full((B,), 500, device="cuda")
    ctx = torch.randn(B, TEXT_LEN, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    compile_s = None
    if compiled:
        fn = torch.compile(model, mode="max-autotune-no-cudagraphs")
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            t0 = time.perf_counter()
            fn(x, t, ctx, return_dict=False)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
    else:
        fn = model
    backends = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if compiled else contextlib.nullcontext()
    with backends, GpuSampler(period_ms=100) as gpu:  # torch_timing runs without autograd
        seconds, peak = torch_timing(functools.partial(fn, x, t, ctx, return_dict=False), warmup=2, iters=5)
    del model, fn
    torch.cuda.empty_cache()
    return seconds, peak, compile_s, gpu.summary()


def gpu_columns(side: str, summary: dict) -> dict:
    """The timed calls' mean SM clock and board power (nvidia-smi; none on CPU): at the 700 W cap a card's clock,
    and so the same code's time, differs between instances by a few percent (benchmarks/NOTES.md)."""
    if not summary:
        return {}
    return {f"{side}_MHz": summary["sm_clock_MHz"], f"{side}_W": summary["power_W"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="1.3b-480p-b1,1.3b-480p-b2,1.3b-720p-b1,14b-480p-b1")
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--diffusers-compiled", action="store_true",
                   help="diffusers under torch.compile (max-autotune-no-cudagraphs) with cuDNN attention, the "
                        "strongest PyTorch baseline (~6 min of compile a case), instead of eager")
    p.add_argument("--tag", default="", help="suffix of the result file name (e.g. warm_cache)")
    p.add_argument("--long-kv-variant", help="A/B: the exact long-key attention kernel as this variant "
                   "(benchmarks/attention.py syntax, e.g. mgpu:64,192,2,0,1)")
    p.add_argument("--fused-backend", default="auto", help="A/B: xla turns off the element-wise-fusing kernels")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="A/B: an XLA compiler option for the forward's jit (repeatable), over "
                        "GEMM_COMPILER_OPTIONS (e.g. xla_gpu_enable_cublaslt=false)")
    p.add_argument("--xla-norm", action="store_true", help="A/B: q/k RMSNorm + RoPE through XLA, not our kernel")
    p.add_argument("--plain-ffn-add", action="store_true",
                   help="A/B: the FFN's gated residual add as its own pass, not in fc2's GEMM epilogue")
    p.add_argument("--xla-residual-norm", action="store_true",
                   help="A/B: a block's residual adds + LayerNorms through XLA, not our one-pass kernel")
    p.add_argument("--text-len", type=int, default=TEXT_LEN, help="text tokens of the context (Wan pads to 512; "
                   "shorter: what a forward would cost with the padding folded away)")
    p.add_argument("--fold-text", type=int, metavar="TOKENS", help="a prompt of this many tokens, its zero padding "
                   "folded to the pipeline's rows (a key bias), as the pipeline runs it")
    p.add_argument("--key-bias-backend", help="A/B: the attention backend of calls with a key_bias (folded text)")
    p.add_argument("--residual-dtype", choices=("float32", "bfloat16"),
                   help="where the residual stream is stored (SystemConfig.residual_dtype; default bf16)")
    args = p.parse_args()
    use_long_kv_variant(args.long_kv_variant)
    use_xla_norm(args.xla_norm)
    use_key_bias_backend(args.key_bias_backend)
    use_xla_residual_norm(args.xla_residual_norm)
    use_plain_ffn_add(args.plain_ffn_add)
    options = {**GEMM_COMPILER_OPTIONS, **(parse_xla_options(args.xla_option) or {})}
    rows = []
    for case in args.cases.split(","):
        name, (h, w), B, cfg_batch = parse_case(case)
        cfg = WanTransformerConfig.from_dict(ModelConfig.named(name).transformer)
        shape = (21, h // 8, w // 8)  # 81 frames
        L = 21 * (h // 16) * (w // 16)
        # diffusers first: torch hands its cache back (empty_cache), JAX's allocator keeps what it has taken.
        theirs = {}
        if not args.no_diffusers and not cfg_batch:  # (diffusers has no CFG-batch form: its b2 is the baseline)
            try:
                d_s, d_peak, d_compile_s, d_gpu = bench_diffusers(cfg, shape, B, args.diffusers_compiled)
                theirs = dict(diffusers_ms=d_s * 1e3, diffusers_peak_GiB=d_peak, **gpu_columns("diffusers", d_gpu))
                if d_compile_s is not None:
                    theirs["diffusers_compile_s"] = d_compile_s
            except Exception as e:  # a missing wheel or OOM is reported, not fatal for the sdjax numbers
                theirs = dict(diffusers_error=f"{type(e).__name__}: {str(e)[:80]}")
        ms, compile_s, peak, finite, gelu_epilogues, stream_epilogues, gpu = bench_sdjax(
            cfg, shape, B, args.backend, cfg_batch, args.fused_backend, options, args.text_len, args.fold_text,
            args.residual_dtype)
        text_tokens = TEXT_FOLD_ROWS if args.fold_text else args.text_len
        row = {"case": case, "residual": args.residual_dtype or "bfloat16", "tokens": L, "text_tokens": text_tokens,
               "sdjax_ms": ms * 1e3, "compile_s": compile_s,
               "peak_GiB": peak,
               "MFU": flops(cfg, L, B, cfg_batch, text_tokens) / ms / 1e12 / PEAK_TFLOPS, "finite": finite,
               "gelu_epilogues": gelu_epilogues, "stream_epilogues": stream_epilogues, **gpu_columns("sdjax", gpu),
               **theirs}
        if "diffusers_ms" in theirs:
            row["speedup"] = theirs["diffusers_ms"] / (ms * 1e3)
        rows.append(row)
        print(row, flush=True)
    write_results("dit_step" + (f"_{args.tag}" if args.tag else ""), rows,
                  "bf16, random weights, 81 frames, one forward; diffusers " + (
                      "torch.compile(max-autotune-no-cudagraphs) + cuDNN attention." if args.diffusers_compiled
                      else "eager (SDPA)."))


if __name__ == "__main__":
    main()
