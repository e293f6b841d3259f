"""Scaling of the Wan DiT forward over GPUs: CFG × Ulysses × Ring layouts against one GPU in the same run.

    python benchmarks/scaling.py                                  # all cases, every layout of the GPUs here
    python benchmarks/scaling.py --cases 1.3b-480p,14b-720p:c1u1r1+c2u2r1+c1u4r1 --vae

A case is `<1.3b|14b>-<480p|720p>`, optionally `:layout+layout+...` (default: `--layouts`). 81 frames, bf16,
random weights, batch 2 (the conditional and unconditional branch of one CFG step), 512 text tokens. Per
layout (see `sdjax.bench.sharding`): ms per forward, speedup and efficiency against one GPU, the collectives'
time alone (comm_ms), compiled memory per GPU, and the output's rel. L2 from the one-GPU output.

Writes scaling_<card>_<n>gpu.{json,md} under $OUT (device runs) or benchmarks/results/, after every case.
Targets (issue): 1.3B 480p ≥ 1.9× on 2 GPUs, ≥ 3.6× on 4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import jax

from sdjax.bench.sharding import bench_dit, bench_vae, latent_shape, parse_layouts, table, transformer_config
from sdjax.config import ModelConfig

RESULTS = Path(__file__).parent / "results"
RES = {"480p": (480, 832), "720p": (720, 1280)}
TARGETS = {("1.3b-480p", 2): 1.9, ("1.3b-480p", 4): 3.6}


def card_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        if names[0].strip():
            return names[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return jax.devices()[0].device_kind


def parse_case(case: str, default_layouts: str, n: int):
    name, _, lays = case.partition(":")
    size, res = name.split("-")
    layouts = parse_layouts(lays.replace("+", ",") if lays else default_layouts, n)
    return name, f"wan2.1-t2v-{size}", RES[res], layouts


def write(report: dict, stem: str) -> None:
    out_dir = Path(os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    lines = [f"# Scaling on {report['devices']} x {report['card']}", "", report["setup"], ""]
    for case, rows in report["cases"].items():
        lines += [f"## {case}", "", table(rows), ""]
    if report["vae"]:
        lines += ["## VAE decode (fp32, spatial split)", "", table(report["vae"]), ""]
    lines += [f"- {t}" for t in report["targets"]]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="1.3b-480p,1.3b-720p,14b-480p,14b-720p")
    p.add_argument("--layouts", default="all")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--vae", action="store_true", help="also time the VAE decode (480p, 81 frames)")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="A/B: override one of the model's compiler options, e.g. xla_gpu_use_memcpy_local_p2p=false")
    p.add_argument("--tag", default="", help="in the result files' names: scaling<tag>_<card>_<n>gpu")
    args = p.parse_args()
    options = {k: {"true": True, "false": False}.get(v.lower(), v)
               for k, v in (o.split("=", 1) for o in args.xla_option)}
    n = jax.device_count()
    card = card_name()
    stem = f"scaling{args.tag}_{card.replace(' ', '_').replace('/', '_')}_{n}gpu"
    report = {"card": card, "devices": n, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "setup": f"bf16, random weights, 81 frames, batch 2 (one CFG step), 512 text tokens; options {options}; "
                       f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
              "cases": {}, "vae": [], "targets": []}
    for case in args.cases.split(","):
        name, model, (h, w), layouts = parse_case(case, args.layouts, n)
        cfg = transformer_config(model)
        print(f"== {name}: {[lay.name for lay in layouts]}", flush=True)
        t0 = time.perf_counter()
        rows = bench_dit(cfg, layouts, latent_shape(h, w, 81), batch=2, text_len=512, dtype="bfloat16",
                         backend="auto", iters=args.iters, compiler_options=options)
        print(f"== {name} took {time.perf_counter() - t0:.0f} s", flush=True)
        report["cases"][name] = rows
        for (tcase, devs), target in TARGETS.items():
            best = max((r.get("speedup", 0) for r in rows if r["devices"] == devs), default=None)
            if tcase == name and best is not None:
                report["targets"].append(f"{name} on {devs} GPUs: best {best:.2f}x (target {target}x) "
                                         f"{'MET' if best >= target else 'MISSED'}")
        write(report, stem)
    if args.vae:
        counts = sorted({1, n} | {2**k for k in range(1, 4) if 2**k <= n})
        vae_cfg = ModelConfig.named("wan2.1-t2v-1.3b").vae
        report["vae"] = bench_vae(vae_cfg, counts, latent_shape(480, 832, 81), iters=2)
        write(report, stem)
    print("\n".join(report["targets"]))


if __name__ == "__main__":
    main()
