"""Orbax checkpoints of the Wan DiT: converted once from safetensors, restored fast (and sharded).

Layout of a converted directory: `config.json` (diffusers names) + `orbax/` (the parameter state).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from sdjax.models.weights import WeightsError

# Our parameter layout differs from the checkpoint's (q/k columns in RoPE-halves order, `loading.to_our_layout`;
# v's bias folded into the output bias, `loading.fold_v_bias`); a converted directory records the layout it holds,
# and one written under another layout must be converted again.
PARAM_LAYOUT = "rope-halves+v-bias-folded"


def save_transformer(model, dst: str | Path) -> Path:
    dst = Path(dst).resolve()
    if (dst / "orbax").exists():
        raise WeightsError(f"{dst / 'orbax'}: already exists; choose an empty destination")
    dst.mkdir(parents=True, exist_ok=True)
    cfg = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config)}
    cfg["patch_size"] = list(cfg["patch_size"])
    header = {"_class_name": "WanTransformer3DModel", "_sdjax_param_layout": PARAM_LAYOUT}
    (dst / "config.json").write_text(json.dumps({**header, **cfg}, indent=1))
    state = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(dst / "orbax", nnx.to_pure_dict(state))
    return dst


def restore_into(model, directory: str | Path) -> None:
    """Restore params into `model` (abstract or not); each array lands with the target's sharding."""
    config = Path(directory).resolve().parent / "config.json"
    layout = json.loads(config.read_text()).get("_sdjax_param_layout") if config.is_file() else None
    if layout != PARAM_LAYOUT:
        raise WeightsError(f"{directory}: converted with parameter layout {layout!r}, this sdjax uses "
                           f"{PARAM_LAYOUT!r}; convert the safetensors again (python -m sdjax.convert)")
    state = nnx.state(model, nnx.Param)
    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None)),
        nnx.to_pure_dict(state))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(Path(directory).resolve(), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise WeightsError(f"{directory}: cannot restore the Orbax checkpoint ({e})") from None
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
