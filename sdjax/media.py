"""Writing generated frames: MP4 (H.264, yuv420p) through imageio-ffmpeg, or PNG for a single frame.

The generation parameters travel in the file's metadata (an MP4 `comment` tag / PNG text chunks) as JSON.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _spawning_ffmpeg():
    # ffmpeg runs as a child process: fork is followed at once by exec, so JAX's fork warning does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] -> uint8, rounding to nearest."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected (F, H, W, 3), got {frames.shape}")
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save(frames: np.ndarray, path: str | Path, fps: int, metadata: dict | None = None) -> Path:
    """Write `frames` (F, H, W, 3) in [0, 1] to `path` (.mp4, or .png when there is one frame)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(frames)
    meta = json.dumps(metadata or {}, sort_keys=True, default=str)
    suffix = path.suffix.lower()
    if suffix == ".png":
        if len(pixels) != 1:
            raise ValueError(f"{path}: PNG holds one frame, got {len(pixels)}; use .mp4")
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", meta)
        Image.fromarray(pixels[0]).save(path, pnginfo=info)
        return path
    if suffix != ".mp4":
        raise ValueError(f"{path}: output must end in .mp4 or .png")
    import imageio_ffmpeg

    F, H, W, _ = pixels.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (W, H), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
        output_params=["-crf", "12", "-movflags", "+faststart", "-metadata", f"comment={meta}"], macro_block_size=1)
    with _spawning_ffmpeg():
        writer.send(None)  # starts ffmpeg
    for frame in pixels:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode an MP4 back to (F, H, W, 3) uint8 (for tests and tools)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    with _spawning_ffmpeg():
        meta = reader.__next__()  # starts ffmpeg
    W, H = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(H, W, 3) for f in reader])


def read_metadata(path: str | Path) -> dict:
    """The generation parameters stored by `save` (MP4 comment tag or PNG text chunk)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        return json.loads(Image.open(path).text.get("parameters", "{}"))
    import subprocess

    import imageio_ffmpeg

    with _spawning_ffmpeg():
        out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                              "-"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("comment="):
            return json.loads(line[len("comment="):].replace("\\=", "=").replace("\\;", ";").replace("\\#", "#"))
    return {}
