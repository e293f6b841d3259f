"""Check and time every available attention backend at Wan shapes; write results and the auto table.

    python benchmarks/attention.py                       # all shapes, all available backends
    python benchmarks/attention.py --sweep --mgpu-config best   # + kernel-config variants (SWEEP) first;
                                                         # pallas_mgpu then runs the fastest per key length
    python benchmarks/attention.py --shapes wan1.3b_480p --backends cudnn,pallas_mgpu
    python benchmarks/attention.py --write-table benchmarks/results/attention_h100.json   # -> auto table
    python benchmarks/attention.py --backends pallas_mgpu,pallas_mgpu_lse   # + the kernel's log-sum-exp (ring)

Each shape runs in its own subprocess with a time limit, so a kernel that hangs or crashes costs one shape,
not the run; every measurement is appended to a JSON-lines log as soon as it exists.
Checks: every backend's output against cuDNN's (else XLA's) at full size (relative L2), and against a
float64 numpy reference on a sample of query rows (first and last 64 — the ragged tail — and 64 random)
for the first and last head; `pallas_mgpu_lse` (our kernel also returning each row's log-sum-exp, which ring
attention merges by) checks that too, as the largest absolute error against float64's.
FLOPs: 4·B·N·T·S_eff·H (S_eff = keys not masked by kv_len).
Writes to --out (default $OUT or benchmarks/results): attention_<card>.json, attention_<card>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LONG_KV_FROM = 4096  # = sdjax.kernels.flash_mgpu.LONG_KV_FROM: key lengths that share one kernel config
SHAPES = {  # name: (B, T, S, N, H, dtype, kv_len or None)
    "wan1.3b_480p": (1, 32760, 32760, 12, 128, "bfloat16", None),
    "wan1.3b_480p_fp16": (1, 32760, 32760, 12, 128, "float16", None),
    "wan1.3b_480p_cfg2": (2, 32760, 32760, 12, 128, "bfloat16", None),
    "wan14b_480p": (1, 32760, 32760, 40, 128, "bfloat16", None),
    "wan1.3b_720p": (1, 75600, 75600, 12, 128, "bfloat16", None),
    "wan14b_720p": (1, 75600, 75600, 40, 128, "bfloat16", None),
    # One ring block of the CFG batch at ring 2 (a device's half of the tokens against the other half's keys); with
    # kv_len the masked long-key path (ring blocks that end in padding).
    "wan1.3b_480p_cfg2_ring2": (2, 16380, 16380, 12, 128, "bfloat16", 16000),
    "wan1.3b_480p_cross": (1, 32760, 512, 12, 128, "bfloat16", None),
    "wan14b_720p_cross": (1, 75600, 512, 40, 128, "bfloat16", None),
    "wan1.3b_480p_cross_kvlen": (1, 32760, 512, 12, 128, "bfloat16", 226),
    # The CFG batch's cross-attention with Wan's zero text padding folded to 128 rows (a key_bias, FOLDED), and the
    # same shape without the bias: the cost the bias may at most add.
    "wan1.3b_480p_cross_fold": (2, 32760, 128, 12, 128, "bfloat16", None),
    "wan1.3b_480p_cross128": (2, 32760, 128, 12, 128, "bfloat16", None),
    "wan14b_480p_cross_fold": (2, 32760, 128, 40, 128, "bfloat16", None),
    # q scaled by Q_SCALE: logits spread wider than unit-normal q and k give (peaked rows).
    "wan1.3b_480p_q3": (1, 32760, 32760, 12, 128, "bfloat16", None),
    "wan1.3b_480p_q8": (1, 32760, 32760, 12, 128, "bfloat16", None),
    "wan1.3b_480p_q16": (1, 32760, 32760, 12, 128, "bfloat16", None),
    "small_d64_ragged": (2, 1000, 777, 3, 64, "bfloat16", 300),
    "small_odd_q_tiles": (2, 300, 1000, 3, 128, "bfloat16", 450),  # 3 CTAs of 128 rows: a cluster's 2nd CTA idles
    "small_d64_ragged_fp16": (2, 1000, 777, 3, 64, "float16", 300),
    "small_fold": (2, 300, 128, 3, 128, "bfloat16", None),
    "tiny_cpu": (2, 200, 150, 2, 64, "bfloat16", 100),  # a smoke test of this script on CPU
    "tiny_cpu_fold": (2, 200, 128, 2, 64, "bfloat16", None),
}
# Shapes whose keys are a folded text context: real text tokens of each batch row (a prompt, the empty negative
# prompt); the other rows stand for Wan's 512-row padding and carry log(padded / kept) as their key_bias.
FOLDED = {"wan1.3b_480p_cross_fold": (20, 1), "wan14b_480p_cross_fold": (20, 1), "small_fold": (7, 1),
          "tiny_cpu_fold": (5, 1)}
TEXT_ROWS = 512
# q's scale per shape (1 if absent), against unit-normal k: logits spread wider, rows peak. For the exact kernel's
# `frozen_max` (its held maximum m = max(first block's maximum, bound - margin)): x3 holds m with later logits up to
# ~2^6 above it (P > 1), x8 holds an m raised far above the first block's maximum (the rows' largest P ~2^-46), x16
# keeps the online maximum everywhere.
Q_SCALE = {"wan1.3b_480p_q3": 3.0, "wan1.3b_480p_q8": 8.0, "wan1.3b_480p_q16": 16.0}
DEFAULT_SHAPES = [s for s in SHAPES if not s.startswith("tiny_cpu")]
# Kernel-config variants timed by --sweep, per shape: mgpu[_int8]:block_q,block_kv,stages,overlap,pingpong[,cluster
# [,frozen_max[,chained[,tail_split]]]] and
# triton:block_q,block_k,num_warps,num_stages (cuDNN first as the same-process baseline).
SWEEP = {
    "wan1.3b_480p": ("cudnn", "mgpu:64,128,2,1,0,2,1,1,1", "mgpu:64,128,2,0,0,2,1,1,1", "mgpu:64,128,2,0,1,2,1,1,1",
                     "mgpu:64,128,2,0,1,2,1,1",
                     "mgpu:64,192,2,0,1,2,1,1",
                     "mgpu:64,128,2,0,1,1,1,1",
                     "mgpu:64,192,2,0,1", "mgpu:64,192,2,0,1,2", "mgpu:64,192,2,0,1,4",
                     "mgpu:64,128,2,1,0", "mgpu:64,192,2,1,0", "mgpu:64,192,2,1,1", "mgpu:64,192,2,0,0",
                     "mgpu:64,128,2,0,1", "mgpu_int8:64,192,2,0,1", "mgpu_int8:64,192,2,0,1,2",
                     "mgpu_int8:64,128,2,1,0", "mgpu_int8:64,192,2,1,0",
                     "mgpu_int8:64,128,2,0,1", "mgpu_int8:64,192,2,0,0", "mgpu_int8:64,128,3,0,1",
                     "mgpu_int8_fp8:64,128,2,0,1", "mgpu_int8_fp8:64,128,3,0,1", "mgpu_int8_fp8:64,128,4,0,1",
                     "mgpu_int8_fp8:64,128,2,0,0", "mgpu_int8_fp8:64,128,3,0,0"),
    "wan1.3b_480p_cross": ("cudnn", "mgpu:64,128,2,0,1", "mgpu:64,128,2,1,0", "mgpu:64,64,2,0,1",
                           "mgpu:64,64,3,0,1", "mgpu:64,192,2,0,1", "triton:128,64,4,3", "triton:64,64,4,2"),
    "wan1.3b_480p_cross_fold": ("cudnn", "mgpu:64,128,2,1,0", "mgpu:64,128,2,0,1", "mgpu:64,128,2,0,0",
                                "mgpu:64,64,2,0,1", "mgpu:64,64,2,1,0", "mgpu:64,64,3,1,0"),
}
# "pallas" is an alias of pallas_mgpu on Hopper, so it is not timed separately by default.
BACKENDS = ("cudnn", "xla", "pallas_mgpu", "pallas_mgpu_int8", "pallas_mgpu_int8_fp8", "pallas_triton", "splash",
            "pallas", "auto")
DEFAULT_BACKENDS = tuple(b for b in BACKENDS if b != "pallas")


def _import_kernels():
    """sdjax.kernels without the rest of the package (its __init__ pulls in models, serving, ...)."""
    sys.path.insert(0, str(ROOT))
    try:
        from sdjax.kernels import attention, flash_mgpu, flash_pallas
    except ImportError:
        import types

        for name in [m for m in sys.modules if m == "sdjax" or m.startswith("sdjax.")]:
            del sys.modules[name]
        pkg = types.ModuleType("sdjax")
        pkg.__path__ = [str(ROOT / "sdjax")]
        sys.modules["sdjax"] = pkg
        from sdjax.kernels import attention, flash_mgpu, flash_pallas
    return attention, flash_mgpu, flash_pallas


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import jax

    return jax.devices()[0].device_kind


def card_slug(name: str) -> str:
    m = re.search(r"(H100|H200|H800|GH200|A100|B200|L40S?|TPU[ \w]*|cpu)", name, re.I)
    return (m.group(1) if m else name).lower().replace(" ", "")


# ------------------------------------------------------------------------------------------ worker


def _mgpu_config(spec: str):
    _, flash_mgpu, _ = _import_kernels()
    bq, bkv, st, ov, pp, *rest = (int(x) for x in spec.split(":")[1].split(","))
    cluster, frozen_max, chained, tail_split = (rest + [1, 0, 0, 0][len(rest):])[:4]
    return flash_mgpu.MgpuConfig(block_q=bq, block_kv=bkv, stages=st, overlap=bool(ov), pingpong=bool(pp),
                                 cluster=cluster, frozen_max=bool(frozen_max), chained=bool(chained),
                                 tail_split=bool(tail_split))


def _best_swept(log: Path, long_kv: bool) -> str | None:
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    ok = [r for r in recs if r.get("backend", "").startswith("mgpu:") and "ms" in r and r.get("finite")
          and r.get("rel_err", 1.0) < 1e-2 and r.get("rel_err_f64", 1.0) < 1e-2
          and (r["S"] >= LONG_KV_FROM) == long_kv]
    return min(ok, key=lambda r: r["ms"])["backend"] if ok else None


def _make_fn(spec: str, kv_len_given: bool, key_bias=None):
    """A jitted fn(q, k, v[, kv_len]) running `spec`; `key_bias` (if any) is passed in as a constant."""
    import jax

    attention, flash_mgpu, flash_pallas = _import_kernels()
    if spec.startswith(("mgpu:", "mgpu_int8:", "mgpu_int8_fp8:")):  # a kernel variant, exact or lossy modes
        cfg, mode = _mgpu_config(spec), spec.split(":")[0]
        f = lambda q, k, v, l: flash_mgpu.flash_attention_mgpu(q, k, v, l, key_bias=key_bias, config=cfg,
                                                               int8_qk=mode != "mgpu", fp8_pv=mode == "mgpu_int8_fp8")
    elif spec == "pallas_mgpu_lse":  # -> (out, lse)
        f = lambda q, k, v, l: flash_mgpu.flash_attention_mgpu(q, k, v, l, key_bias=key_bias, return_lse=True)
    elif spec.startswith("triton:"):
        bq, bk, nw, ns = (int(x) for x in spec[7:].split(","))
        f = lambda q, k, v, l: flash_pallas.flash_attention_triton(q, k, v, l, block_q=bq, block_k=bk,
                                                                   num_warps=nw, num_stages=ns)
    else:
        f = lambda q, k, v, l: attention.attention(q, k, v, kv_len=l, key_bias=key_bias, backend=spec)
    if kv_len_given:
        return jax.jit(f)
    return jax.jit(lambda q, k, v: f(q, k, v, None))


def folded_key_bias(shape: str):
    """The key_bias of a FOLDED shape's batch rows: 0 on real text rows, log(padded / kept) on the kept padding."""
    import numpy as np

    S = SHAPES[shape][2]
    bias = np.zeros((len(FOLDED[shape]), S), np.float32)
    for b, real in enumerate(FOLDED[shape]):
        bias[b, real:] = math.log((TEXT_ROWS - real) / (S - real))
    return bias


def _time(fn, args, budget_ms: float = 400.0) -> list[float]:
    """Median-able per-call ms: calls queued back to back (async dispatch), synced once per repeat."""
    import jax

    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = (time.perf_counter() - t0) * 1e3
    n = max(1, min(200, int(budget_ms / 5 / max(est, 1e-3))))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / n)
    return times


def reference_f64(q, k, v, kv_len=None, key_bias=None, return_lse: bool = False):
    """softmax(q kᵀ / sqrt(H) [+ key_bias]) v in float64 numpy, (B, T, N, H) layout: the oracle of the checks and
    the tests; with `return_lse` also the logits' log-sum-exp, (B, T, N)."""
    import numpy as np

    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    if key_bias is not None:
        s = s + np.asarray(key_bias, np.float64)[:, None, None, :]
    if kv_len is not None:
        keep = np.arange(k.shape[1])[None, :] < np.asarray(kv_len)[:, None]
        s = np.where(keep[:, None, None, :], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p / total, v)
    if return_lse:
        return out, (m + np.log(total))[..., 0].transpose(0, 2, 1)
    return out


def run_worker(shape: str, specs: list[str], log: Path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    attention, flash_mgpu, _ = _import_kernels()
    B, T, S, N, H, dtype, kvl = SHAPES[shape]
    kq, kk, kv = jax.random.split(jax.random.key(zlib.crc32(shape.encode())), 3)
    # Drawn in fp32 and rounded, like a GEMM's output: bf16 draws of jax.random.normal carry a rounding bias on
    # the e4m3 grid that inflated the fp8 P V error 7x (benchmarks/NOTES.md, session 4, runs 10-12).
    q, k, v = (jax.random.normal(key, (B, L, N, H), jnp.float32) for key, L in ((kq, T), (kk, S), (kv, S)))
    q, k, v = (q * Q_SCALE.get(shape, 1.0)).astype(dtype), k.astype(dtype), v.astype(dtype)
    kv_len = None if kvl is None else jnp.asarray([kvl] + [S] * (B - 1), jnp.int32)
    key_bias = jnp.asarray(folded_key_bias(shape)) if shape in FOLDED else None
    args = (q, k, v) if kv_len is None else (q, k, v, kv_len)
    s_eff = S if kvl is None else (kvl + S * (B - 1)) / B
    flops = 4 * B * N * T * s_eff * H
    rng = np.random.default_rng(0)
    rows = np.unique(np.concatenate([np.arange(64), np.arange(T - 64, T), rng.integers(0, T, 64)]))
    heads = sorted({0, N - 1})
    ref64, lse64 = reference_f64(q[:, rows][:, :, heads], k[:, :, heads], v[:, :, heads], kv_len, key_bias,
                                 return_lse=True)
    dev = jax.devices()[0]
    ref_out, ref_name = None, None
    for spec in specs:
        rec = {"shape": shape, "backend": spec, "B": B, "T": T, "S": S, "N": N, "H": H, "dtype": dtype,
               "kv_len": kvl, "key_bias": key_bias is not None, "device_kind": dev.device_kind,
               "platform": dev.platform, "arch": str(getattr(dev, "compute_capability", "")), "jax": jax.__version__}
        try:
            checked = "pallas_mgpu" if spec == "pallas_mgpu_lse" else spec
            if checked in BACKENDS and checked != "auto" and \
                    (why := attention._unsupported(checked, q, kv_len, k, key_bias)) is not None:
                rec["skipped"] = why
            else:
                if spec == "auto":
                    rec["auto_choice"] = attention.choose_backend(q, k, kv_len, key_bias)
                fn = _make_fn(spec, kv_len is not None, key_bias)
                out = fn(*args)
                if spec == "pallas_mgpu_lse":
                    out, lse = out
                    got_lse = np.asarray(lse[:, rows][:, :, heads], np.float64)
                    rec["lse_max_abs_err_f64"] = float(np.abs(got_lse - lse64).max())
                    del lse
                outf = out.astype(jnp.float32)
                rec["finite"] = bool(jnp.isfinite(outf).all())
                got = np.asarray(out[:, rows][:, :, heads], np.float64)
                rec["rel_err_f64"] = float(np.linalg.norm(got - ref64) / np.linalg.norm(ref64))
                if spec in attention.LOSSY_BACKENDS:  # the kernel against exact attention of its rounded inputs
                    fp8 = spec == "pallas_mgpu_int8_fp8"  # (P's e4m3 rounding happens inside: not in this reference)
                    q8, k8 = flash_mgpu.dequantized_qk_int8(
                        q, k, block_kv=flash_mgpu.FP8_PV_CONFIG.block_kv if fp8 else None)
                    v8 = flash_mgpu.dequantized_v_fp8(v) if fp8 else v.astype(jnp.float32)
                    q8, k8, v8 = q8[:, rows][:, :, heads], k8[:, :, heads], v8[:, :, heads]
                    ref8 = reference_f64(q8, k8, v8, kv_len)
                    rec["rel_err_f64_of_rounded_inputs"] = float(np.linalg.norm(got - ref8) / np.linalg.norm(ref8))
                if ref_out is None and spec in ("cudnn", "xla"):
                    ref_out, ref_name = outf, spec
                if ref_out is not None:
                    rec["rel_err_vs"] = ref_name
                    rec["rel_err"] = float(jnp.linalg.norm(outf - ref_out) / jnp.linalg.norm(ref_out))
                del out, outf
                times = _time(fn, args)
                rec["ms"] = statistics.median(times)
                rec["ms_all"] = times
                rec["tflops"] = flops / rec["ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - a failing backend is a result, not a crash
            rec["error"] = (type(e).__name__ + ": " + str(e))[:600]
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: rec.get(k) for k in ("shape", "backend", "ms", "tflops", "rel_err", "rel_err_f64",
                                                   "rel_err_f64_of_rounded_inputs", "lse_max_abs_err_f64",
                                                   "auto_choice", "skipped", "error")}), flush=True)


# ------------------------------------------------------------------------------------------ driver


def summarize(records: list[dict], card: str) -> str:
    lines = [f"# Attention backends on {card}", "",
             f"jax {records[0].get('jax', '?')}; median ms per call (5 repeats of back-to-back calls); "
             "TFLOP/s = 4·B·N·T·S_eff·H / time; rel_err = relative L2 vs cuDNN (else XLA) at full size; "
             "f64 = relative L2 vs a float64 reference on sampled rows.", "",
             "| shape | B×T×S×N×H dtype kv_len | backend | ms | TFLOP/s | rel_err | f64 | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        dims = f"{r['B']}×{r['T']}×{r['S']}×{r['N']}×{r['H']} {r['dtype']} {r['kv_len'] or ''}" + \
            (" key_bias" if r.get("key_bias") else "")
        ms = f"{r['ms']:.3f}" if "ms" in r else ""
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        e64 = f"{r['rel_err_f64']:.1e}" if "rel_err_f64" in r else ""
        note = r.get("error") or r.get("skipped") or (f"→ {r['auto_choice']}" if "auto_choice" in r else "")
        if "lse_max_abs_err_f64" in r:
            note = f"lse max abs err vs f64 {r['lse_max_abs_err_f64']:.1e} " + note
        if r.get("finite") is False:
            note = "NON-FINITE " + note
        lines.append(f"| {r['shape']} | {dims} | {r['backend']} | {ms} | {tf} | {err} | {e64} | "
                     f"{note.replace('|', '/')[:160]} |")
    return "\n".join(lines) + "\n"


def write_table(paths: list[str]):
    """Regenerates the MEASUREMENTS rows of sdjax/kernels/attention_table.py from result JSONs."""
    lossy = _import_kernels()[0].LOSSY_BACKENDS
    rows = {}
    for p in paths:
        for r in json.loads(Path(p).read_text())["records"]:
            if r["backend"] in ("auto", "pallas", *lossy) or r["backend"] not in BACKENDS:  # auto: exact only
                continue
            if r["shape"].startswith(("small", "tiny")):
                continue
            key = (r["device_kind"], r["shape"])
            row = rows.setdefault(key, {
                "device_kind": r["device_kind"], "platform": r["platform"], "arch": r.get("arch", ""),
                "shape": r["shape"], "dtype": r["dtype"], "head_dim": r["H"], "B": r["B"], "T": r["T"],
                "S": r["S"], "N": r["N"], "kv_len": r["kv_len"] is not None, "key_bias": r.get("key_bias", False),
                "ms": {}})
            if "ms" in r and r.get("finite", True) and r.get("rel_err", 0.0) < 2e-2:
                row["ms"][r["backend"]] = round(r["ms"], 4)
    def py(x):  # JSON literal -> Python literal
        return json.dumps(x).replace("true", "True").replace("false", "False").replace("null", "None")

    body = "MEASUREMENTS: list[dict] = [\n"
    for row in rows.values():
        where = ", ".join(f'"{k}": {py(row[k])}' for k in ("device_kind", "platform", "arch", "shape"))
        keys = ("dtype", "head_dim", "B", "T", "S", "N", "kv_len") + (("key_bias",) if row["key_bias"] else ())
        dims = ", ".join(f'"{k}": {py(row[k])}' for k in keys)
        body += f'    {{{where},\n     {dims},\n     "ms": {py(row["ms"])}}},\n'
    body += "]\n"
    table = ROOT / "sdjax" / "kernels" / "attention_table.py"
    text = table.read_text()
    head, rest = text.split("# BEGIN GENERATED\n")
    _, tail = rest.split("# END GENERATED\n")
    table.write_text(head + "# BEGIN GENERATED\n" + body + "# END GENERATED\n" + tail)
    print(f"wrote {len(rows)} rows to {table}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                    help="comma list, or ';' list with kernel variants (mgpu:64,192,2,0,1,2;cudnn)")
    ap.add_argument("--sweep", action="store_true", help="first time the kernel-config variants of SWEEP")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per shape subprocess")
    ap.add_argument("--write-table", nargs="+", metavar="RESULT_JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--mgpu-config", help="run pallas_mgpu (and what calls it) with this variant "
                    "(mgpu:bq,bkv,stages,overlap,pingpong[,cluster[,frozen_max[,chained[,tail_split]]]]) instead of "
                    "flash_mgpu.default_config; 'best': the fastest swept variant for the shape's key-length class "
                    "(needs --sweep)")
    a = ap.parse_args()
    if a.write_table:
        return write_table(a.write_table)
    if a.worker:
        if a.mgpu_config:  # replaces the library default in this worker process only
            _, flash_mgpu, _ = _import_kernels()
            cfg = _mgpu_config(a.mgpu_config)
            flash_mgpu.default_config = lambda S, int8_qk=False: cfg
        return run_worker(a.worker, json.loads(a.backends), Path(a.log))

    card = card_name()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"attention_{card_slug(card)}.jsonl"
    log.unlink(missing_ok=True)
    jobs = [(shape, list(specs)) for shape, specs in SWEEP.items()] if a.sweep else []
    backends = a.backends.split(";" if ";" in a.backends else ",")  # ';' separates specs that hold commas
    jobs += [(s, backends) for s in a.shapes.split(",") if s]
    used = {}
    for shape, specs in jobs:
        mgpu_config = a.mgpu_config
        if mgpu_config == "best":  # the fastest correct swept variant for this shape's key-length class
            mgpu_config = _best_swept(log, long_kv=SHAPES[shape][2] >= LONG_KV_FROM)
        if specs != list(SWEEP.get(shape, ())):
            used[shape] = mgpu_config or "default_config"
        t0 = time.time()
        cmd = [sys.executable, __file__, "--worker", shape, "--backends", json.dumps(specs), "--log", str(log)]
        if mgpu_config:
            cmd += ["--mgpu-config", mgpu_config]
        try:
            subprocess.run(cmd, timeout=a.timeout, check=False)
        except subprocess.TimeoutExpired:
            with log.open("a") as f:
                f.write(json.dumps({"shape": shape, "backend": "(rest)", "error": f"timeout {a.timeout}s"}) + "\n")
        print(f"== {shape}: {time.time() - t0:.0f}s", flush=True)

    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    records = [r for r in records if "B" in r] + [r for r in records if "B" not in r]
    full = [r for r in records if "B" in r]
    result = {"card": card, "mgpu_config": used, "records": records}
    (out / f"attention_{card_slug(card)}.json").write_text(json.dumps(result, indent=1))
    if full:
        md = summarize(full, card)
        (out / f"attention_{card_slug(card)}.md").write_text(md)
        print(md)
    for r in records:
        if "B" not in r:
            print("TIMEOUT", r)


if __name__ == "__main__":
    main()
