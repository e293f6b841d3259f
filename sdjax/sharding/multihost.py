"""Several hosts: one program on every host, process 0 takes requests, every process runs each one.

JAX is multi-controller: every process runs the same jitted programs over the global mesh (the devices of
all hosts), and a collective only completes when all processes reach it. So process 0 (the one with the
HTTP server or the command line) hands every request to the others before running it, and the others run a
follower loop:

    # on every host (same code, same weights path, same launch args):
    python -m sdjax.generate --model DIR --prompt "…" --coordinator-address host0:7777 --num-processes 2 \\
        --process-id $RANK --ulysses 8 --cfg-parallel 2     # 16 devices: 8 per host; process 0 writes the file

    from sdjax.sharding import launch, multihost
    launch.initialize_from_args(args)                       # before anything touches a device
    pipe = Pipeline.from_pretrained(path, system=system)    # the mesh spans all hosts
    if multihost.is_leader():
        ... serve; for each request: multihost.lead(request, run) ...; at exit multihost.lead(None, run)
    else:
        multihost.follow(run)                               # returns when the leader sends None

The flags come from `sdjax.sharding.launch.add_args`; `--coordinator-address` etc. can be left out where
`jax.distributed.initialize` detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). Keep the Ulysses
axis inside a host (NVLink) and let ring and CFG cross hosts: `make_mesh` takes the devices in `jax.devices()`
order, host by host, so the fastest-varying "ulysses" axis stays local when ulysses <= devices per host.
Not testable across hosts here; one process exercises the same code paths. The service drives this loop too:
`python -m sdjax.serve ... --coordinator-address …` serves HTTP on process 0 and mirrors every engine call on
the others (`sdjax/serve/multihost.py`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

import jax
import numpy as np

from sdjax.config import ConfigError


def check_args(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    if coordinator_address is not None:
        host, sep, port = coordinator_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"coordinator_address={coordinator_address!r} is not allowed: host:port")
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise ConfigError(f"num_processes={num_processes!r} is not allowed: an integer >= 1")
    if process_id is not None:
        if num_processes is None:
            raise ConfigError("process_id needs num_processes")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process_id={process_id!r} is not allowed: 0 .. num_processes-1 ({num_processes - 1})")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize`, validated; call once, before any JAX computation."""
    check_args(coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def is_leader() -> bool:
    return jax.process_index() == 0


def broadcast(obj=None):
    """Process 0's `obj` (any picklable value) on every process; other processes' arguments are ignored."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return pickle.loads(pickle.dumps(obj))  # same semantics (a copy) on one process
    data = np.frombuffer(pickle.dumps(obj), np.uint8) if is_leader() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = data if is_leader() else np.zeros(n, np.uint8)
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())


def lead(request, run: Callable):
    """On process 0: send `request` to every process, then run it here too (None ends the followers)."""
    request = broadcast(request)
    return None if request is None else run(request)


def follow(run: Callable) -> int:
    """On processes other than 0: run each request process 0 sends, until it sends None; returns the count."""
    n = 0
    while (request := broadcast()) is not None:
        run(request)
        n += 1
    return n
