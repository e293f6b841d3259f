"""Where a Wan generation spends its GPU time: kernels grouped by kind, from a profiler trace.

    python benchmarks/profile_step.py [--target forward|step|decode] [--model wan2.1-t2v-1.3b] [--res 480p]
                                      [--batch 1] [--backend auto] [--cache static:2 --step-index 5]

Targets: `forward` (the DiT alone), `step` (one denoising step as the pipeline runs it: CFG batch of 2·batch,
UniPC update, the jitted `loop.denoise_step`; with `--cache policy:threshold` through that feature cache at step
`--step-index` of 50 — `static:2 --step-index 5` is a step the cache skips, 4 one it computes), `decode` (the VAE
decode to frames, as the pipeline runs it).
Traces a few calls (bf16, random weights) with `jax.profiler`, reads the Perfetto trace it writes, and sums
device time per kernel: attention (our Pallas kernel or cuDNN), GEMMs (cuBLAS / cuBLASLt), convolutions,
XLA fusions (element-wise and reductions: norms, modulation, RoPE, GELU, residuals) and the rest. Also times
the same calls on the host clock: wall time minus kernel time is what the device sat idle, of which the trace's
gaps between one call's kernels (by the kernel each gap ends at) are launch gaps and syncs inside the call.
Writes the table and the optimised HLO (to map fusion names to what they compute) next to the other results.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import RESULTS, card_name, random_like, timed, use_key_bias_backend, write_results
from benchmarks.dit_step import RES, TEXT_LEN, folded_prompts
from sdjax.config import ModelConfig
from sdjax.models.wan.loading import abstract_transformer
from sdjax.models.wan.transformer import WanTransformerConfig
from sdjax.models.wan.vae import AutoencoderKLWan, WanVAEConfig
from sdjax.numerics import GEMM_COMPILER_OPTIONS
from sdjax.pipeline import jit_decode_frames
from sdjax.sampling import cache as cache_lib
from sdjax.sampling import loop, solvers

KINDS = (  # first match wins; kernel names as the profiler reports them
    ("attention", re.compile(r"mosaic|flash|attention|fmha|sdpa", re.I)),
    ("conv", re.compile(r"conv(?!ert)|implicit_gemm|fprop|dgrad|wgrad", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|cublas|sm90_|nvjet|triton_gemm", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|transpose|convert|copy|concatenate|slice", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def gpu_timelines(trace_dir: Path) -> dict[str, list[tuple[str, float, float]]]:
    """{device process name: [(kernel name, µs, start µs)]} from the Perfetto trace under `trace_dir`."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpus = {pid: n for pid, n in names.items() if re.search(r"GPU|device", n, re.I) and "host" not in n.lower()}
    if not gpus:
        raise SystemExit(f"no device timeline in the trace (processes: {list(names.values())}); this script needs "
                         "a GPU")
    out = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpus and "dur" in e:
            out[gpus[e["pid"]]].append((e["name"], float(e["dur"]), float(e["ts"])))
    return dict(out)


def device_kernels(trace_dir: Path) -> list[tuple[str, float, float]]:
    """(kernel name, µs, start µs) for every GPU event of the Perfetto trace under `trace_dir`."""
    return [k for kernels in gpu_timelines(trace_dir).values() for k in kernels]


def idle_gaps(kernels: list[tuple[str, float, float]], calls: int) -> tuple[float, dict[str, float]]:
    """Where the device sits idle inside a call: (ms of gaps between kernels a call, ms a call by the kernel that
    ends each gap). The `calls - 1` longest gaps separate the traced calls and are not counted."""
    events = sorted(kernels, key=lambda k: k[2])
    gaps, end = [], None
    for name, us, ts in events:
        if end is not None and ts > end:
            gaps.append((ts - end, name))
        end = max(end or ts, ts + us)
    inside = sorted(gaps, reverse=True)[calls - 1:]
    by_next = collections.Counter()
    for us, name in inside:
        by_next[name] += us / calls / 1e3
    return sum(us for us, _ in inside) / calls / 1e3, by_next


def build(target: str, model_name: str, res: str, batch: int, backend: str, fold_text: int | None = None,
          fused_backend: str = "auto", residual_dtype: str | None = None, cache: str = "none:0", step_index: int = 10):
    """(callable, its args, a one-line description) for the target; forward and decode come compiled.
    `fold_text`: the prompt has this many tokens (the negative prompt one), zero padding folded like the pipeline.
    `cache` ("policy:threshold") and `step_index` (of 50): the step target's feature cache and step."""
    mcfg = ModelConfig.named(model_name)
    h, w = RES[res]
    key = jax.random.key(1)
    x = jax.random.normal(key, (batch, 16, 21, h // 8, w // 8), jnp.float32)
    if target == "decode":
        vae_cfg = WanVAEConfig.from_dict(mcfg.vae)
        vae = random_like(nnx.eval_shape(lambda: AutoencoderKLWan(vae_cfg, dtype=jnp.bfloat16)), scale=0.05)
        args = (vae, x[:1])
        what = "VAE decode of 21 latent frames to 81 RGB frames (bf16)"
        return jit_decode_frames().lower(*args).compile(), args, what
    cfg = WanTransformerConfig.from_dict(mcfg.transformer)
    dit = random_like(abstract_transformer(cfg, "bfloat16", backend, fused_backend=fused_backend,
                                           residual_dtype=residual_dtype))
    ctx = jax.random.normal(key, (batch, TEXT_LEN, cfg.text_dim), jnp.float32)
    if fold_text:
        cond, uncond = folded_prompts(ctx, [fold_text] * batch), folded_prompts(ctx, [1] * batch)
    else:
        cond = uncond = ctx
    if target == "forward":
        args = (dit, x, jnp.full((batch,), 500.0), cond)
        forward = jax.jit(lambda m, x, t, c: m(x, t, c), compiler_options=GEMM_COMPILER_OPTIONS)
        return forward.lower(*args).compile(), args, f"DiT forward, B={batch}"
    schedule = jax.tree.map(jnp.asarray, solvers.make_schedule("unipc", 50, 3.0).padded(100))
    policy, _, threshold = cache.partition(":")
    plan = cache_lib.make_plan(policy, float(threshold or 0), 50, 100, model_config=cfg)
    plan = None if plan is None else jax.tree.map(jnp.asarray, plan)
    state = loop.init_state("unipc", x, policy, model=dit, do_cfg=True, max_steps=100)
    guidance = jnp.float32(5.0)

    def step(m, state, i):
        return loop.denoise_step(m, state, i, schedule, cond, uncond, guidance, plan, solver="unipc", do_cfg=True,
                                 policy=policy)

    # The step donates its state: feed each call the previous call's output, as the pipeline does.
    holder = {"state": state}

    def call(m, i):
        holder["state"] = step(m, holder["state"], i)
        return holder["state"].latents

    # the step's optimized HLO (its fusions are what the profile names), from jit's cache once it has run
    call.as_text = lambda: loop.denoise_step.lower(dit, holder["state"], jnp.int32(step_index), schedule, cond,
                                                   uncond, guidance, plan, solver="unipc", do_cfg=True,
                                                   policy=policy).compile().as_text()
    computed = "" if plan is None else f", {'computed' if plan.forced[step_index] else 'skipped'} by the cache"
    return call, (dit, jnp.int32(step_index)), (f"denoising step {step_index} of 50 (CFG: DiT batch {2 * batch}, "
                                                f"UniPC; cache {cache}{computed}), latents B={batch}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="forward", choices=("forward", "step", "decode"))
    p.add_argument("--model", default="wan2.1-t2v-1.3b")
    p.add_argument("--res", default="480p", choices=sorted(RES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--backend", default="auto", help="attention backend")
    p.add_argument("--fold-text", type=int, metavar="TOKENS", help="a prompt of this many tokens, its zero padding "
                   "folded to the pipeline's rows (a key bias), as the pipeline runs it")
    p.add_argument("--key-bias-backend", help="A/B: the attention backend of calls with a key_bias (folded text)")
    p.add_argument("--fused-backend", default="auto", help="A/B: the element-wise-fusing kernels' backend")
    p.add_argument("--residual-dtype", choices=("float32", "bfloat16"),
                   help="where the residual stream is stored (SystemConfig.residual_dtype; default bf16)")
    p.add_argument("--cache", default="none:0", help="step target: the feature cache, policy:threshold")
    p.add_argument("--step-index", type=int, default=10, help="step target: which of the 50 steps")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    use_key_bias_backend(args.key_bias_backend)
    fn, fargs, what = build(args.target, args.model, args.res, args.batch, args.backend, args.fold_text,
                            args.fused_backend, args.residual_dtype, args.cache, args.step_index)
    wall_s = float(np.median(timed(fn, *fargs, warmup=2, iters=5)))

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.calls):
                jax.block_until_ready(fn(*fargs))
        kernels = device_kernels(Path(tmp))
    per_name = collections.defaultdict(lambda: [0.0, 0])
    for name, us, _ in kernels:
        per_name[name][0] += us / args.calls / 1e3
        per_name[name][1] += 1
    per_kind = collections.Counter()
    for name, (ms, _) in per_name.items():
        per_kind[kind_of(name)] += ms
    total = sum(per_kind.values())
    rows = [{"kind": k, "name": "(all)", "ms_per_call": ms, "share": ms / total} for k, ms in per_kind.most_common()]
    rows.append({"kind": "idle", "name": "host wall time per call minus kernel time", "ms_per_call":
                 wall_s * 1e3 - total})
    inside, by_next = idle_gaps(kernels, args.calls)
    rows.append({"kind": "idle", "name": "of which gaps between a call's kernels", "ms_per_call": inside})
    for name, ms in by_next.most_common(5):
        rows.append({"kind": "idle", "name": f"gaps before {name[:70]}", "ms_per_call": ms})
    for name, (ms, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
        rows.append({"kind": kind_of(name), "name": name[:90], "ms_per_call": ms, "share": ms / total,
                     "calls_per_call": n / args.calls})
    stem = (f"profile_{args.model}_{args.res}_b{args.batch}" + ("" if args.target == "forward" else f"_{args.target}")
            + ("" if args.backend == "auto" else f"_{args.backend}") + (f"_{args.tag}" if args.tag else ""))
    write_results(stem, rows, f"{what}: device time per call by kernel, {args.calls} calls traced; "
                              f"{total:.1f} ms of kernels, {wall_s * 1e3:.1f} ms a call on the host clock (median "
                              f"of 5; bf16, random weights).")
    out_dir = Path(os.environ.get("OUT") or RESULTS)
    card = card_name().split(" x")[0].replace(" ", "_")
    if hasattr(fn, "as_text"):  # the compiled forward, decode or step
        (out_dir / f"{stem}_{card}_hlo.txt.gz").write_bytes(gzip.compress(fn.as_text().encode()))


if __name__ == "__main__":
    main()
