"""`python -m sdjax.bench.sharding`: the Wan DiT forward (and VAE decode) on parallel layouts of the devices.

    python -m sdjax.bench.sharding --model wan2.1-t2v-1.3b --height 480 --width 832 --frames 81 --layouts all
    python -m sdjax.bench.sharding --model tiny --fake-devices 8 --layouts c1u8r1,c2u2r2 --dtype float32

Runs on whatever devices exist (real GPUs, or N fake CPU devices with --fake-devices N). A layout
`c{cfg}u{ulysses}r{ring}` uses the first cfg·ulysses·ring devices; a suffix `g` or `p` fixes how the ring axis
shares K/V (all-gathered, or passed around the ring; none: as a launch picks, `sdjax.sharding.attention`);
`all` is every layout (cfg 1 or 2) on 1, 2, 4, ... devices. The one-device layout is always measured first,
in the same run, as the baseline. Per layout:

- `ms`: median wall time of one forward (random weights; batch 2 = the conditional and unconditional branch
  of one CFG step, by default); `speedup` and `efficiency` (speedup / devices) against one device;
- `comm_ms`: the same collectives (all-to-alls, ring transfers) alone, with the forward's shapes: the time
  the forward would spend communicating if none of it overlapped compute;
- `mem_GiB`: per-device memory of the compiled forward (weights + inputs + outputs + temporaries);
- `rel_l2`: ||out - out_1dev|| / ||out_1dev||.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass

TINY = dict(num_attention_heads=12, attention_head_dim=8, ffn_dim=64, num_layers=2, text_dim=32, in_channels=16,
            out_channels=16, rope_max_seq_len=1024)


@dataclass(frozen=True)
class Layout:
    cfg: int
    ulysses: int
    ring: int
    kv_exchange: str = "auto"  # ring's K/V: as the launch picks (no suffix), all-gathered (g) or permuted (p)

    @property
    def devices(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def name(self) -> str:
        return f"c{self.cfg}u{self.ulysses}r{self.ring}" + {"gather": "g", "permute": "p"}.get(self.kv_exchange, "")

    @classmethod
    def parse(cls, s: str) -> Layout:
        m = re.fullmatch(r"c(\d+)u(\d+)r(\d+)([gp]?)", s.strip())
        if not m:
            raise ValueError(f"layout {s!r}: expected c<cfg>u<ulysses>r<ring>[g|p], e.g. c2u2r1 or c1u1r2g "
                             "(ring's K/V all-gathered: g, or passed around: p; neither: as the launch picks)")
        return cls(*map(int, m.groups()[:3]), {"g": "gather", "p": "permute"}.get(m.group(4), "auto"))


def all_layouts(n_devices: int) -> list[Layout]:
    """Every layout with cfg in (1, 2) on 1, 2, 4, ... and n_devices devices."""
    counts = sorted({1, n_devices} | {2**k for k in range(1, 8) if 2**k <= n_devices})
    out = []
    for d in counts:
        for c in (1, 2):
            if d % c:
                continue
            for u in range(1, d // c + 1):
                if (d // c) % u == 0:
                    out.append(Layout(c, u, d // c // u))
    return out


def parse_layouts(spec: str, n_devices: int) -> list[Layout]:
    layouts = all_layouts(n_devices) if spec == "all" else [Layout.parse(s) for s in spec.split(",") if s]
    too_big = [lay.name for lay in layouts if lay.devices > n_devices]
    if too_big:
        raise ValueError(f"layouts {too_big} need more than the {n_devices} devices available")
    if Layout(1, 1, 1) not in layouts:
        layouts.insert(0, Layout(1, 1, 1))  # the baseline
    return sorted(set(layouts), key=lambda lay: (lay.devices, layouts.index(lay)))


# ------------------------------------------------------------------------------------------ building


def random_transformer(cfg, dtype: str, backend: str, mesh, *, shard_weights=False, kv_exchange="auto", seed=0):
    """A Wan DiT with random weights made directly on its devices (replicated on `mesh`, or device 0).

    The same seed gives the same weights on every layout, so outputs can be compared."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sdjax.models.wan.loading import abstract_transformer
    from sdjax.sharding import shard_transformer

    model = abstract_transformer(cfg, dtype, backend)
    if mesh is not None:
        # abstract leaves get their shardings
        shard_transformer(model, mesh, shard_weights=shard_weights, kv_exchange=kv_exchange)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    dev0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = [getattr(leaf, "sharding", None) or (dev0 if mesh is None else NamedSharding(mesh, P()))
                 for leaf in leaves]

    values = random_leaves(leaves, shardings, seed)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


def hash_uniform(shape, seed: int):
    """Uniform [-1, 1) numbers from a hash of the element index: random enough for timing, the same on every
    device and layout, and quick to compile (jax.random's generators take seconds per leaf on CPU)."""
    import jax
    import jax.numpy as jnp

    h = jnp.zeros(shape, jnp.uint32)  # the row-major element index, mod 2**32 (no 1-D iota of billions)
    for d, n in enumerate(shape):
        h = h * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
    h = h * jnp.uint32(0x9E3779B1)
    h = h + jnp.uint32((seed * 0x85EBCA6B) % 2**32)
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # lowbias32 mixing
        h = (h ^ (h >> shift)) * jnp.uint32(mult)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) * (2.0 / 2**24) - 1.0


def random_leaves(leaves, shardings, seed: int, std: float = 0.02):
    """Arrays shaped like the abstract `leaves`, made on the devices of `shardings` (no host copy)."""
    import jax

    def make():  # uniform on [-a, a) has std a / sqrt(3)
        return [(std * 3**0.5 * hash_uniform(leaf.shape, seed + i)).astype(leaf.dtype) for i, leaf in enumerate(leaves)]

    return jax.jit(make, out_shardings=shardings)()


def inputs(cfg, latent_shape, batch: int, text_len: int, seed=1):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, *latent_shape), dtype=np.float32)
    t = np.linspace(900.0, 100.0, batch).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, cfg.text_dim), dtype=np.float32)
    return x, t, ctx


def token_count(cfg, latent_shape) -> int:
    return math.prod(n // p for n, p in zip(latent_shape, cfg.patch_size, strict=True))


# ------------------------------------------------------------------------------------------ measuring


def timed(fn, *args, iters: int) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def compiled_mem_gib(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        used = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return used / 2**30
    except Exception:  # not every backend reports it
        return None


def comm_only_seconds(cfg, layout: Layout, mesh, L: int, batch: int, dtype: str, iters: int) -> float:
    """Time of the collectives of one forward alone (all layers), on arrays of the forward's shapes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from sdjax.sharding.attention import resolve_kv_exchange
    from sdjax.sharding.mesh import SEQ

    U, R = layout.ulysses, layout.ring
    if U * R == 1:
        return 0.0
    sp = U * R
    Lp = -(-L // sp) * sp
    Np = -(-cfg.num_attention_heads // U) * U
    b = "cfg" if batch % layout.cfg == 0 else None
    x = jnp.zeros((batch, Lp, Np, cfg.attention_head_dim), jnp.dtype(dtype))
    perm = [(i, (i + 1) % R) for i in range(R)]

    gather = R > 1 and resolve_kv_exchange(layout.kv_exchange, R, mesh.devices.flat[0].platform) == "gather"

    def one_layer(_, x):  # q, k, v to heads; K/V around the ring (or gathered); the output back to tokens
        q, k, v = (jax.lax.all_to_all(x * s, "ulysses", 2, 1, tiled=True) if U > 1 else x * s for s in (1, 2, 3))
        if gather:
            # the gathered blocks summed back to one: every byte is used, so no part of the gather is dropped
            k, v = (jax.lax.all_gather(t, "ring", axis=1).sum(1) for t in (k, v))
        for _ in range(0 if gather else R - 1):
            k, v = jax.lax.ppermute(k, "ring", perm), jax.lax.ppermute(v, "ring", perm)
        o = q + k + v
        return jax.lax.all_to_all(o, "ulysses", 1, 2, tiled=True) if U > 1 else o

    f = jax.jit(jax.shard_map(lambda x: jax.lax.fori_loop(0, cfg.num_layers, one_layer, x), mesh=mesh,
                              in_specs=P(b, SEQ), out_specs=P(b, SEQ), check_vma=False))
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(b, SEQ)))
    return timed(f, x, iters=iters)


def bench_dit(cfg, layouts: list[Layout], latent_shape, *, batch: int, text_len: int, dtype: str, backend: str,
              iters: int, shard_weights: bool = False, comm: bool = True, compiler_options: dict | None = None,
              log=print) -> list[dict]:
    """One row per layout; the one-device layout (first) is the baseline of speedup and rel_l2.
    `compiler_options` override the model's (`GEMM_COMPILER_OPTIONS`) for A/B runs.

    A layout that fails (out of memory, say) gets a row with its error; the others still run."""
    import gc

    import numpy as np

    host_inputs = inputs(cfg, latent_shape, batch, text_len)
    L = token_count(cfg, latent_shape)
    rows, ref, base = [], None, None
    for lay in layouts:
        try:
            s, out, extra = _bench_dit_layout(cfg, lay, host_inputs, L, dtype=dtype, backend=backend, iters=iters,
                                              shard_weights=shard_weights, comm=comm,
                                              compiler_options=compiler_options or {})
        except Exception as e:
            if ref is None:
                raise
            row = {"layout": lay.name, "devices": lay.devices, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        else:
            if ref is None:
                ref, base = out, s
            row = {"layout": lay.name, "devices": lay.devices, "tokens": L, "ms": s * 1e3, "speedup": base / s,
                   "efficiency": base / s / lay.devices, **extra,
                   "rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))}
        rows.append(row)
        log(json.dumps(row, default=float), flush=True)
        gc.collect()
    return rows


def _bench_dit_layout(cfg, lay: Layout, host_inputs, L, *, dtype, backend, iters, shard_weights, comm,
                      compiler_options):
    import jax
    import numpy as np

    from sdjax.config import SystemConfig
    from sdjax.numerics import GEMM_COMPILER_OPTIONS
    from sdjax.sharding import make_mesh, put_replicated

    mesh = None if lay.devices == 1 else make_mesh(
        SystemConfig(cfg_parallel=lay.cfg, ulysses=lay.ulysses, ring=lay.ring), jax.devices()[: lay.devices])
    model = random_transformer(cfg, dtype, backend, mesh, shard_weights=shard_weights, kv_exchange=lay.kv_exchange)
    if mesh is not None and not comm:
        model.parallel = dataclasses.replace(model.parallel, comm=False)
    # Inputs on the devices first, so the timing holds no host transfer.
    args = [jax.device_put(a, jax.devices()[0]) if mesh is None else put_replicated(a, mesh) for a in host_inputs]
    t0 = time.perf_counter()
    forward = jax.jit(lambda m, x, t, c: m(x, t, c), compiler_options={**GEMM_COMPILER_OPTIONS, **compiler_options})
    compiled = forward.lower(model, *args).compile()
    compile_s = time.perf_counter() - t0
    s = timed(compiled, model, *args, iters=iters)
    out = np.asarray(compiled(model, *args), np.float64)
    comm_s = 0.0 if mesh is None else comm_only_seconds(cfg, lay, mesh, L, len(host_inputs[0]), dtype, iters)
    extra = {"comm_ms": comm_s * 1e3, "compile_s": compile_s, "mem_GiB": compiled_mem_gib(compiled)}
    return s, out, extra


def bench_vae(vae_cfg: dict, device_counts: list[int], latent_shape, *, iters: int, dtype: str = "float32",
              log=print) -> list[dict]:
    """VAE decode (random weights, in `dtype` as the pipeline runs it) on 1..n devices, split spatially; rel_l2
    against one device."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sdjax.config import SystemConfig
    from sdjax.models.wan.vae import COMPILER_OPTIONS, AutoencoderKLWan, WanVAEConfig
    from sdjax.sharding import make_mesh
    from sdjax.sharding import vae as pvae

    cfg = WanVAEConfig.from_dict(vae_cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKLWan(cfg, dtype=jnp.dtype(dtype))))
    leaves, treedef = jax.tree.flatten(state)
    z = np.random.default_rng(2).standard_normal((1, cfg.z_dim, *latent_shape), dtype=np.float32)
    rows, ref, base = [], None, None
    for n in device_counts:
        mesh = None if n == 1 else make_mesh(SystemConfig(ulysses=n), jax.devices()[:n])
        sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                    else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        values = random_leaves(leaves, [sharding] * len(leaves), seed=0, std=0.05)
        vae = nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
        dec = jax.jit(lambda v, z, mesh=mesh: pvae.decode(v, z, mesh), compiler_options=COMPILER_OPTIONS)
        t0 = time.perf_counter()
        compiled = dec.lower(vae, z).compile()
        compile_s = time.perf_counter() - t0
        s = timed(compiled, vae, z, iters=iters)
        out = np.asarray(compiled(vae, z), np.float64)
        if ref is None:
            ref, base = out, s
        row = {"vae_devices": n, "ms": s * 1e3, "speedup": base / s, "efficiency": base / s / n,
               "compile_s": compile_s, "mem_GiB": compiled_mem_gib(compiled),
               "rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))}
        rows.append(row)
        log(json.dumps(row, default=float), flush=True)
        del vae, compiled
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------------ command line


def latent_shape(height: int, width: int, frames: int) -> tuple[int, int, int]:
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"frames={frames} must be 4k+1 and height/width={height}/{width} multiples of 16")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def transformer_config(name: str):
    from sdjax.config import ModelConfig
    from sdjax.models.wan.transformer import WanTransformerConfig

    if name == "tiny":
        return WanTransformerConfig(**TINY)
    return WanTransformerConfig.from_dict(ModelConfig.named(name).transformer)


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdjax.bench.sharding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.1-t2v-1.3b", help="model yaml name or path, or 'tiny' (12 heads)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--layouts", default="all",
                   help="comma-separated c<cfg>u<ulysses>r<ring>[g|p] (ring K/V all-gathered / permuted), or 'all'")
    p.add_argument("--batch", type=int, default=2, help="2 = both CFG branches of one step")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--shard-weights", action="store_true", help="split block weights over the devices (FSDP)")
    p.add_argument("--no-comm", action="store_true",
                   help="replace collectives by local no-ops (wrong results: compute time alone)")
    p.add_argument("--vae", action="store_true",
                   help="also time the VAE decode (in --dtype, as the pipeline) on 1, 2, 4, ... devices")
    p.add_argument("--fake-devices", type=int, default=None, help="use N CPU devices (no GPU needed)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    if args.fake_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.fake_devices)
    n = jax.device_count()
    try:
        cfg = transformer_config(args.model)
        shape = latent_shape(args.height, args.width, args.frames)
        layouts = parse_layouts(args.layouts, n)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} x {jax.devices()[0].device_kind}; {args.model} {args.height}x{args.width}x{args.frames} "
          f"(latents {shape}, {token_count(cfg, shape)} tokens), batch {args.batch}, {args.dtype}", flush=True)
    rows = bench_dit(cfg, layouts, shape, batch=args.batch, text_len=args.text_len, dtype=args.dtype,
                     backend=args.attention_backend, iters=args.iters, shard_weights=args.shard_weights,
                     comm=not args.no_comm)
    print(table(rows))
    vae_rows = []
    if args.vae:
        from sdjax.config import ModelConfig

        vae_cfg = {} if args.model == "tiny" else ModelConfig.named(args.model).vae
        counts = sorted({lay.devices for lay in layouts})
        vae_rows = bench_vae(vae_cfg, counts, shape, iters=args.iters, dtype=args.dtype)
        print(table(vae_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "devices": n, "args": vars(args), "dit": rows,
                       "vae": vae_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
