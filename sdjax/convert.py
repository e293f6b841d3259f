"""`python -m sdjax.convert SRC DST`: convert a Wan DiT (diffusers or original layout) to an Orbax checkpoint.

`sdjax.models.wan.load_transformer(DST)` then restores it without re-reading safetensors.
"""

import argparse
import sys
import time

from sdjax.models.wan.convert import save_transformer
from sdjax.models.wan.loading import load_transformer
from sdjax.models.weights import WeightsError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdjax.convert", description=__doc__)
    p.add_argument("src", help="transformer directory (config.json + safetensors), diffusers or original layout")
    p.add_argument("dst", help="destination directory for config.json + orbax/")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model = load_transformer(args.src, dtype=args.dtype)
        out = save_transformer(model, args.dst)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
