"""Bounded load test of the sdjax service: N video jobs, at most C outstanding; p50/p95 latency, throughput,
and whether every job completed (exit status 1 if any did not).

    python benchmarks/load.py --url http://127.0.0.1:8000 --api-key KEY --requests 20 --concurrency 4
    python benchmarks/load.py --launch "--engine tests.serve.fake_engine:make" --requests 20   # own server

`--launch ARGS` starts `python -m sdjax.serve ARGS` on a free 127.0.0.1 port for the run (and stops it).
Only loopback or your own hosts: this is a load generator.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

TERMINAL = ("completed", "failed", "cancelled")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


class Load:
    def __init__(self, args):
        self.args = args
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.Client(base_url=args.url, headers=headers, timeout=30)
        self.rejected = 0
        self.lock = threading.Lock()

    def body(self, i: int) -> dict:
        a = self.args
        body = {"prompt": f"{a.prompt} #{i}", "seed": a.seed + i}
        for name in ("size", "num_frames", "num_inference_steps"):
            if getattr(a, name) is not None:
                body[name] = getattr(a, name)
        return body

    def one(self, i: int) -> dict:
        """Submit (retrying 429 with its Retry-After, bounded by the job timeout), then poll to the end."""
        t0 = time.monotonic()
        deadline = t0 + self.args.timeout
        while True:
            r = self.client.post("/v1/videos", json=self.body(i))
            if r.status_code != 429:
                break
            with self.lock:
                self.rejected += 1
            if time.monotonic() > deadline:
                return {"i": i, "status": "rejected", "latency_s": None}
            time.sleep(min(float(r.headers.get("retry-after", 1)), 5.0))
        if r.status_code != 200:
            return {"i": i, "status": f"http_{r.status_code}", "latency_s": None, "error": r.text[:300]}
        job = r.json()
        while job["status"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(self.args.poll)
            job = self.client.get(f"/v1/videos/{job['id']}").json()
        latency = time.monotonic() - t0
        return {"i": i, "id": job["id"], "status": job["status"] if job["status"] in TERMINAL else "lost",
                "latency_s": latency, "server_s": (job["completed_at"] or 0) - job["created_at"],
                "timings": job.get("timings")}

    def run(self) -> dict:
        a = self.args
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=a.concurrency) as pool:
            results = list(pool.map(self.one, range(a.requests)))
        wall = time.monotonic() - t0
        done = [r["latency_s"] for r in results if r["status"] == "completed"]
        counts = {}
        for r in results:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return {
            "url": a.url, "requests": a.requests, "concurrency": a.concurrency, "wall_s": round(wall, 3),
            "completed": len(done), "statuses": counts, "rejected_429": self.rejected,
            "all_completed": len(done) == a.requests,
            "p50_s": _round(percentile(done, 0.5)), "p95_s": _round(percentile(done, 0.95)),
            "max_s": _round(max(done, default=None)), "mean_s": _round(statistics.fmean(done) if done else None),
            "throughput_jobs_per_s": round(len(done) / wall, 4) if wall > 0 else None,
            "jobs": results if a.verbose else None,
        }


def launch(extra: str, env_key: str | None) -> tuple[subprocess.Popen, str, str | None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tempfile.mkdtemp(prefix="sdjax-load-")
    key = env_key or "load-test-key"
    env = {**os.environ, "SDJAX_API_KEYS": f"load:{key}", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "sdjax.serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", data,
           "--log-level", "warning", *shlex.split(extra)]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a real model compiles every allowed shape before it is ready
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the launched server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the launched server did not become ready within 600 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("SDJAX_API_KEY"))
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prompt", default="a red ball bounces on a wooden floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None)
    p.add_argument("--num-frames", dest="num_frames", type=int, default=None)
    p.add_argument("--steps", dest="num_inference_steps", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1800.0, help="per job, seconds (submit retries included)")
    p.add_argument("--poll", type=float, default=0.25)
    p.add_argument("--launch", default=None, metavar="ARGS", help="start a local server with these launch args")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument("--verbose", action="store_true", help="include every job in the report")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    proc = None
    if args.launch is not None:
        proc, args.url, args.api_key = launch(args.launch, args.api_key)
    try:
        report = Load(args).run()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    text = json.dumps({k: v for k, v in report.items() if v is not None or k.endswith("_s")}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["all_completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
