"""Running sdjax on several devices: the mesh of a launch, sequence (Ulysses / Ring) and CFG parallelism
for the DiT, parallel VAE decode, and the multi-host start.

    system = sdjax.SystemConfig(cfg_parallel=2, ulysses=2, ring=1)     # 4 devices
    model = load_transformer(path, "bfloat16", system=system)          # placed on make_mesh(system)
    model(latents, t, context)                                         # ordinary inputs, one-device result
"""

from sdjax.sharding.attention import ring_attention, sequence_parallel_attention
from sdjax.sharding.dit import SequenceParallel, param_shardings, shard_transformer
from sdjax.sharding.mesh import AXES, SEQ, make_mesh, mesh_for, put_replicated

__all__ = ["AXES", "SEQ", "SequenceParallel", "make_mesh", "mesh_for", "param_shardings",
           "put_replicated", "ring_attention", "sequence_parallel_attention", "shard_transformer"]
