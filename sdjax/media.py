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
    """(F, H, W, 3) float in [0, 1] -> uint8, rounding to nearest (uint8 frames pass through)."""
    frames = _checked(frames)
    if frames.dtype == np.uint8:
        return frames
    out = np.empty(frames.shape, np.uint8)
    for i, pixels in enumerate(_uint8_frames(frames)):
        out[i] = pixels
    return out


def _checked(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected (F, H, W, 3), got {frames.shape}")
    return frames


def _uint8_frames(frames: np.ndarray):
    """Each frame as uint8, converted in one cache-sized scratch buffer (whole-video temporaries ran ~3.5x slower:
    0.19 vs 0.056 s for 81 frames at 480p on a 2-core host, benchmarks/media.py). The yielded array is reused.
    uint8 frames (the pipeline's output_type="uint8", rounded on the device) go as they are."""
    if frames.dtype == np.uint8:
        for frame in frames:
            yield np.ascontiguousarray(frame)  # ffmpeg's pipe takes whole buffers (a copy only for a strided view)
        return
    scratch = np.empty(frames.shape[1:], np.float32)
    pixels = np.empty(frames.shape[1:], np.uint8)
    for frame in frames:
        np.clip(frame, 0.0, 1.0, out=scratch)
        scratch *= 255.0
        scratch += 0.5
        np.copyto(pixels, scratch, casting="unsafe")  # truncates: x + 0.5 rounds to nearest
        yield pixels


def save(frames: np.ndarray, path: str | Path, fps: int, metadata: dict | None = None) -> Path:
    """Write `frames` (F, H, W, 3), float in [0, 1] or uint8, to `path` (.mp4, or .png when there is one frame)."""
    path = Path(path)
    frames = _checked(frames)
    meta = json.dumps(metadata or {}, sort_keys=True, default=str)
    suffix = path.suffix.lower()
    if suffix == ".png":
        if len(frames) != 1:
            raise ValueError(f"{path}: PNG holds one frame, got {len(frames)}; use .mp4")
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(frames)[0]).save(path, pnginfo=info)
        return path
    if suffix != ".mp4":
        raise ValueError(f"{path}: output must end in .mp4 or .png")
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    F, H, W, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (W, H), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
        output_params=["-crf", "12", "-movflags", "+faststart", "-metadata", f"comment={meta}"], macro_block_size=1)
    with _spawning_ffmpeg():
        writer.send(None)  # starts ffmpeg
    for pixels in _uint8_frames(frames):  # converted as they go to ffmpeg: no uint8 copy of the whole video
        writer.send(pixels)
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
