"""The host side of a generation's last stage: float frames -> uint8 pixels -> MP4 (what `sdjax.media.save` does).

    PYTHONPATH=$PWD python benchmarks/media.py [--frames 81] [--height 480] [--width 832]

Times `media.to_uint8` (frame by frame, in a cache-sized scratch buffer) against the same rounding as whole-array
numpy temporaries, and `media.save` to an MP4 of smooth synthetic frames (what the H.264 encoder costs). Host
only: runs anywhere; the result file is named after the host's device (its CPU here, the card on a GPU host).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_results
from sdjax import media


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    args = p.parse_args()
    F, H, W = args.frames, args.height, args.width
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    frames = np.stack([np.stack([np.sin(6 * x + 0.2 * f), np.cos(5 * y - 0.1 * f), x * y], -1) * 0.5 + 0.5
                       for f in range(F)]).astype(np.float32)
    whole_array = lambda: (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(media.to_uint8(frames), whole_array())
    rows = [{"what": "to_uint8, whole-array temporaries", "s": best_of(whole_array)},
            {"what": "media.to_uint8 (frame by frame)", "s": best_of(lambda: media.to_uint8(frames))}]
    with tempfile.TemporaryDirectory() as tmp:
        rows.append({"what": "media.save to MP4 (conversion + H.264 encode)",
                     "s": best_of(lambda: media.save(frames, Path(tmp) / "v.mp4", fps=16), repeats=1)})
    write_results("media", rows, header=f"{F} frames of {W}x{H} float32 (smooth synthetic content); best of 3 "
                                         f"(save: one run); seconds on the host ({os.cpu_count()} CPU cores).")


if __name__ == "__main__":
    main()
