"""Harness: the service in a subprocess on 127.0.0.1 (real HTTP), a real redis-server, bounded waits."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
HOST = "127.0.0.1"
KEYS = {"alice": "key-alice", "bob": "key-bob"}
ADMIN_KEY = "key-admin"
ENGINE = "tests.serve.fake_engine:make"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Server:
    """`python -m sdjax.serve` with the fake engine, logging to a file."""

    def __init__(self, data_dir: Path, *args: str, step_seconds: float = 0.02, engine: str = ENGINE,
                 name: str = "server", ready_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = data_dir.parent / f"{name}-{self.port}.log"
        self.ready_timeout = ready_timeout
        self.cmd = [sys.executable, "-m", "sdjax.serve", "--host", HOST, "--port", str(self.port),
                    "--data-dir", str(data_dir), "--poll-seconds", "0.05", *args]
        if engine:  # "" = the real pipeline
            self.cmd += ["--engine", engine]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "SDJAX_FAKE_STEP_SECONDS": str(step_seconds),
                    "SDJAX_API_KEYS": ",".join(f"{n}:{k}" for n, k in KEYS.items()),
                    "SDJAX_ADMIN_KEYS": f"ops:{ADMIN_KEY}", "JAX_PLATFORMS": "cpu"}
        self.env.pop("SDJAX_ENGINE", None)  # the engine is chosen by the command line only
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> Server:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout or self.ready_timeout, f"{self.url}/readyz", interval=0.1)

    def client(self, key: str | None = KEYS["alice"], timeout: float = 10.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def spawn(tmp_path):
    """spawn(*args, data_dir=..., step_seconds=...) -> a started Server; all are killed at teardown."""
    servers = []

    def start(*args, data_dir: Path | None = None, wait_ready: bool = True, **kw) -> Server:
        server = Server(data_dir or tmp_path / "data", *args, **kw)
        servers.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port (tools/ci_services.sh installs it)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run `bash tools/ci_services.sh` (apt-get install "
                           "redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def up():
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(up, 10, "redis-server")
    yield f"redis://{HOST}:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


# ------------------------------------------------------------------------------------- job helpers


def create_video(client: httpx.Client, **body) -> dict:
    body.setdefault("prompt", "a red square")
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(client: httpx.Client, job_id: str, statuses=("completed", "failed", "cancelled"),
                timeout: float = 30.0) -> dict:
    def check():
        job = client.get(f"/v1/videos/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, f"{job_id} to reach {statuses}")


def wait_steps(client: httpx.Client, job_id: str, steps: int, timeout: float = 30.0) -> dict:
    def check():
        job = client.get(f"/v1/videos/{job_id}").json()
        return job if job["steps_done"] >= steps or job["status"] != "in_progress" and job["status"] != "queued" \
            else None

    return wait_until(check, timeout, f"{job_id} to reach step {steps}")
