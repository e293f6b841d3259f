"""The FFN's two GEMMs and what XLA fuses into their cuBLASLt epilogues, per formulation and compiler options.

    python benchmarks/ffn.py [--parts fc1,fc2] [--cases 1.3b-65520,14b-32760] [--dump /tmp/dump]

fc1: XLA's GEMM rewriter matches `x · 0.5 · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))` on a cuBLASLt GEMM's output
and hands it to the BIAS_GELU epilogue (one pass, the GELU in fp32 before the one rounding) — if the HLO it sees
has that shape. fc2 and the block's gated residual add, x + gate · (u @ W2 + b): as the model writes it (fc2, then
an fp32 element-wise pass over the stream), and with the gate folded into W2's columns and b, so that
`(u @ W2' + b') + x` is a GEMM whose epilogue adds the bias and the stream (cuBLASLt's C input, beta = 1) —
valid where the gate is the same for every sample of the batch (one timestep).

Reports the epilogue XLA chose, device time, and the relative L2 error against an fp32 reference from the same
bf16 inputs. Session 13 also timed our own fused Mosaic GPU fc1 kernel here, since removed (benchmarks/NOTES.md).
`sdjax.numerics.GEMM_COMPILER_OPTIONS` is the "cublaslt_no_triton" row. With `--dump` (the folder of an XLA dump of
every pass, `XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_pass_re=.* --xla_dump_hlo_module_re=jit_fc.*`), writes each
formulation's HLO as the GEMM rewriter received it, to see why one does not match.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, write_results
from benchmarks.gemm import ms as device_ms

SHAPES = {"1.3b": (1536, 8960), "14b": (5120, 13824)}  # (model dim, ffn dim)
OPTIONS = {
    "default": None,
    "cublaslt": {"xla_gpu_enable_cublaslt": True},
    "cublaslt_no_triton": {"xla_gpu_enable_cublaslt": True, "xla_gpu_enable_triton_gemm": False},
}


def fc1_jax_gelu(x, w, b):  # the model's form
    y = jnp.einsum("...i,io->...o", x, w) + b.astype(x.dtype)
    return jax.nn.gelu(y, approximate=True)


def fc1_explicit(x, w, b):  # the rewriter's pattern written out, x³ as x · (x · x)
    y = jnp.einsum("...i,io->...o", x, w) + b.astype(x.dtype)
    return y * (0.5 * (1.0 + jnp.tanh(0.7978845608028654 * (y + 0.044715 * (y * (y * y))))))


def fc1_reference(x, w, b):
    y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest") + b.astype(jnp.float32)
    return jax.nn.gelu(y, approximate=True)


def fc2_then_add(u, w, b, x, gate):  # fc2, then the stream's gated add in fp32 (one rounding into the stream)
    y = jnp.einsum("...i,io->...o", u, w) + b.astype(u.dtype)
    return (x.astype(jnp.float32) + y.astype(jnp.float32) * gate).astype(x.dtype)


def fc2_gate_folded(u, w, b, x, gate):  # the gate in W2's columns and b: the stream add becomes GEMM epilogue work
    w = (w.astype(jnp.float32) * gate).astype(w.dtype)
    b = (b.astype(jnp.float32) * gate).astype(x.dtype)
    return (jnp.einsum("...i,io->...o", u, w) + b) + x


def fc2_reference(u, w, b, x, gate):
    y = jnp.dot(u.astype(jnp.float32), w.astype(jnp.float32), precision="highest") + b.astype(jnp.float32)
    return x.astype(jnp.float32) + y * gate


PARTS = {"fc1": ((fc1_jax_gelu, fc1_explicit), fc1_reference), "fc2": ((fc2_then_add, fc2_gate_folded), fc2_reference)}


def inputs(part: str, M: int, D: int, F: int):
    ks = jax.random.split(jax.random.key(0), 5)
    K, N = (D, F) if part == "fc1" else (F, D)
    x = jax.random.normal(ks[0], (M, K), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
    b = (0.1 * jax.random.normal(ks[2], (N,))).astype(jnp.bfloat16)
    if part == "fc1":
        return (x, w, b), 2 * M * K * N / 1e12
    stream = jax.random.normal(ks[3], (M, N), jnp.bfloat16)
    gate = 0.5 + 0.1 * jax.random.normal(ks[4], (N,), jnp.float32)
    return (x, w, b, stream, gate), 2 * M * K * N / 1e12


def epilogues(hlo: str) -> str:
    """The cuBLASLt epilogues of a compiled program, and whether a GEMM also adds a matrix (beta != 0)."""
    found = sorted(set(re.findall(r'"epilogue":"(\w+)"', hlo))) or ["-"]
    if re.search(r'"beta":(?!0[,}])', hlo):
        found.append("+C")
    return ",".join(found)


def rewriter_input(dump: Path, module: str) -> str:
    """From an XLA dump: `module`'s HLO as the (non-fp8) GEMM rewriter received it, and what it made of it."""
    groups: dict[str, list[Path]] = {}
    for p in sorted(dump.glob(f"module_*.{module}.*")):
        groups.setdefault(p.name.split(".")[0], []).append(p)
    for files in groups.values():
        files = [p for p in files if re.search(r"\.\d{4}\.", p.name)]
        for i, p in enumerate(files):
            if "gemm-rewriter" in p.name and "__cublas$lt$matmul" in p.read_text():
                return f"## {files[i - 1].name}\n{files[i - 1].read_text()}\n## {p.name}\n{p.read_text()}\n"
    return f"## {module}: no cuBLASLt GEMM-rewriter pass among {sum(map(len, groups.values()))} dump files\n"


def measure(case: str, what: str, fn, args, ref, tflop: float, epilogue: str = "") -> dict:
    out = np.asarray(fn(*args), np.float32)
    ref = np.asarray(ref, np.float32)
    t = device_ms(fn, *args)
    row = {"case": case, "what": what, "gemm_epilogue": epilogue, "ms": t, "TFLOP_per_s": tflop / t * 1e3,
           "rel_l2_vs_fp32": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))}
    print(row, flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="fc1,fc2")
    p.add_argument("--cases", default="1.3b-65520,1.3b-32760,14b-32760")
    p.add_argument("--dump", default=None, help="the --xla_dump_to folder of this process, to extract from")
    args = p.parse_args()
    rows = []
    parts = args.parts.split(",")
    for part in parts:
        forms, reference = PARTS[part]
        for case in args.cases.split(","):
            size, M = case.split("-")
            fn_args, tflop = inputs(part, int(M), *SHAPES[size])
            ref = jax.jit(reference)(*fn_args)
            for f in forms:
                for opt_name, opts in OPTIONS.items():
                    compiled = jax.jit(f).lower(*fn_args).compile(compiler_options=opts)
                    rows.append(measure(case, f"{f.__name__} / {opt_name}", compiled, fn_args, ref, tflop,
                                        epilogues(compiled.as_text())))
    if args.dump:
        text = "".join(rewriter_input(Path(args.dump), f"jit_{f.__name__}") for part in parts for f in PARTS[part][0])
        (Path(os.environ.get("OUT") or RESULTS) / "ffn_epilogue_hlo.txt").write_text(text)
    write_results("ffn", rows, "The FFN's GEMMs (bf16) per formulation and XLA options: the cuBLASLt epilogue XLA's "
                               "GEMM rewriter chose (+C: it also adds the stream, beta = 1), device time, relative L2 "
                               "against an fp32 reference from the same inputs.")


if __name__ == "__main__":
    main()
