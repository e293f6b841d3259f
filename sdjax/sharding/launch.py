"""Launch args of the parallel layout and the multi-host start, for every entry point (CLI, server):

    parser = argparse.ArgumentParser(...)
    launch.add_args(parser)
    args = parser.parse_args()
    launch.initialize_from_args(args)                  # jax.distributed, when asked; before any JAX op
    system = SystemConfig(..., **launch.layout_kwargs(args))
"""

from __future__ import annotations

import argparse

from sdjax.config import ConfigError
from sdjax.sharding import multihost


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallel layout (cfg-parallel × ulysses × ring = number of devices)")
    g.add_argument("--cfg-parallel", type=int, default=1, choices=[1, 2],
                   help="2: the conditional and unconditional branches on separate device groups")
    g.add_argument("--ulysses", type=int, default=1, help="sequence parallel degree, all-to-all over heads")
    g.add_argument("--ring", type=int, default=1, help="sequence parallel degree, K/V passed around a ring")
    g.add_argument("--shard-weights", action="store_true",
                   help="split the DiT block weights over the devices, gathered a layer at a time (for 14B)")
    g = parser.add_argument_group("multi-host (jax.distributed; one program on every host, process 0 leads)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize (cluster auto-detection; implied by --coordinator-address)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes (hosts)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 = leader")


def layout_kwargs(args: argparse.Namespace) -> dict:
    """The `SystemConfig` fields of the layout flags."""
    return {"cfg_parallel": args.cfg_parallel, "ulysses": args.ulysses, "ring": args.ring,
            "shard_weights": args.shard_weights}


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`multihost.initialize(...)` when the args ask for it; returns whether it did."""
    if not (args.distributed or args.coordinator_address):
        if args.num_processes is not None or args.process_id is not None:
            raise ConfigError("--num-processes/--process-id need --coordinator-address (or --distributed)")
        return False
    multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return True
