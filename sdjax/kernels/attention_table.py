"""Measured attention timings that `attention(..., backend="auto")` ranks backends by.

The rows between the GENERATED markers are written by `benchmarks/attention.py --write-table` from the
result files in benchmarks/results/ (never by hand). A row is one shape on one card: its median ms per
backend (None where the backend failed or was not available).

Lookup: rows measured with a key_bias for calls with one, without for the others (where such rows exist); of those,
rows of the same device kind, else of the same platform and GPU architecture; among those (dtype and head_dim must
match where such rows exist) the closest shape: log-distance in total work and in the T/S aspect, plus 1 when
kv_len masking differs (masking a self-attention's tail barely changes its cost, so a 32,760-token call with kv_len
is closer to the 32,760 row than to the masked 512-key cross row).
Backends come back fastest first; the dispatcher takes the first that supports the inputs.
"""

from __future__ import annotations

import math

# BEGIN GENERATED
MEASUREMENTS: list[dict] = [
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan1.3b_480p",
     "dtype": "bfloat16", "head_dim": 128, "B": 1, "T": 32760, "S": 32760, "N": 12, "kv_len": False,
     "ms": {"cudnn": 11.6112, "xla": 70.0098, "pallas_mgpu": 10.1855, "pallas_triton": 14.5733}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan1.3b_480p_cross",
     "dtype": "bfloat16", "head_dim": 128, "B": 1, "T": 32760, "S": 512, "N": 12, "kv_len": False,
     "ms": {"cudnn": 0.2145, "xla": 1.3242, "pallas_mgpu": 0.2221, "pallas_triton": 0.3813}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan1.3b_480p_fp16",
     "dtype": "float16", "head_dim": 128, "B": 1, "T": 32760, "S": 32760, "N": 12, "kv_len": False,
     "ms": {"cudnn": 12.054, "xla": 70.2189, "pallas_mgpu": 10.743, "pallas_triton": 15.0131}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan1.3b_480p_cfg2",
     "dtype": "bfloat16", "head_dim": 128, "B": 2, "T": 32760, "S": 32760, "N": 12, "kv_len": False,
     "ms": {"cudnn": 22.9677, "xla": 142.8859, "pallas_mgpu": 20.4009, "pallas_triton": 29.6428}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan14b_480p",
     "dtype": "bfloat16", "head_dim": 128, "B": 1, "T": 32760, "S": 32760, "N": 40, "kv_len": False,
     "ms": {"cudnn": 38.2948, "xla": 238.243, "pallas_mgpu": 33.6667, "pallas_triton": 50.0228}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan1.3b_720p",
     "dtype": "bfloat16", "head_dim": 128, "B": 1, "T": 75600, "S": 75600, "N": 12, "kv_len": False,
     "ms": {"cudnn": 61.1652, "xla": 361.9709, "pallas_mgpu": 53.9159, "pallas_triton": 75.3817}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan14b_720p",
     "dtype": "bfloat16", "head_dim": 128, "B": 1, "T": 75600, "S": 75600, "N": 40, "kv_len": False,
     "ms": {"cudnn": 204.2667, "xla": 1214.5434, "pallas_mgpu": 182.8694, "pallas_triton": 322.1675}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan14b_720p_cross",
     "dtype": "bfloat16", "head_dim": 128, "B": 1, "T": 75600, "S": 512, "N": 40, "kv_len": False,
     "ms": {"cudnn": 1.6937, "xla": 9.3191, "pallas_mgpu": 1.6726, "pallas_triton": 2.7679}},
    {"device_kind": "NVIDIA H200", "platform": "gpu", "arch": "9.0", "shape": "wan1.3b_480p_cross_kvlen",
     "dtype": "bfloat16", "head_dim": 128, "B": 1, "T": 32760, "S": 512, "N": 12, "kv_len": True,
     "ms": {"cudnn": 0.1557, "xla": 1.4015, "pallas_mgpu": 0.1774, "pallas_triton": 0.2866}},
    {"device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu", "arch": "9.0", "shape": "wan1.3b_480p_cross_fold",
     "dtype": "bfloat16", "head_dim": 128, "B": 2, "T": 32760, "S": 128, "N": 12, "kv_len": False, "key_bias": True,
     "ms": {"cudnn": 0.3936, "xla": 1.7783, "pallas_mgpu": 0.221}},
]
# END GENERATED


def _distance(row: dict, *, B: int, T: int, S: int, N: int, has_kv_len: bool) -> float:
    work = math.log(B * N * T * S) - math.log(row["B"] * row["N"] * row["T"] * row["S"])
    aspect = math.log(T / S) - math.log(row["T"] / row["S"])
    return abs(work) + abs(aspect) + float(row["kv_len"] != has_kv_len)


def ranking(*, device_kind: str, platform: str, arch: str, dtype: str, head_dim: int, B: int, T: int, S: int,
            N: int, has_kv_len: bool, has_key_bias: bool = False, rows: list[dict] | None = None) -> list[str]:
    """Backends fastest first for the closest measured shape on this kind of device ([] if none)."""
    rows = MEASUREMENTS if rows is None else rows
    # Biased calls rank by biased rows from any card of the architecture before unbiased rows of this card.
    rows = [r for r in rows if r.get("key_bias", False) == has_key_bias] or rows
    same = [r for r in rows if r["device_kind"] == device_kind]
    if not same:
        same = [r for r in rows if r["platform"] == platform and r.get("arch", "") == arch]
    for key, want in (("dtype", dtype), ("head_dim", head_dim)):
        if any(r[key] == want for r in same):
            same = [r for r in same if r[key] == want]
    if not same:
        return []
    best = min(same, key=lambda r: _distance(r, B=B, T=T, S=S, N=N, has_kv_len=has_kv_len))
    timed = [(ms, name) for name, ms in best["ms"].items() if ms is not None]
    return [name for _, name in sorted(timed)]
