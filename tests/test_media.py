"""Frames to pixels and files: `to_uint8` rounds like the whole-array formula, `save` writes what it is given."""

import numpy as np
import pytest

from sdjax import media


def test_to_uint8_rounds_to_nearest_and_clips():
    rng = np.random.default_rng(0)
    frames = rng.uniform(-0.2, 1.2, (3, 5, 7, 3)).astype(np.float32)  # out-of-range values clip
    frames[0, 0, 0] = [0.5 / 255, 1.5 / 255, 254.5 / 255]  # halfway values round up
    expected = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    pixels = media.to_uint8(frames)
    assert pixels.dtype == np.uint8 and pixels.shape == frames.shape
    np.testing.assert_array_equal(pixels, expected)
    assert list(pixels[0, 0, 0]) == [1, 2, 255]
    with pytest.raises(ValueError, match=r"frames: expected \(F, H, W, 3\)"):
        media.to_uint8(frames[..., :2])


def test_mp4_and_png_hold_the_frames(tmp_path):
    frames = np.zeros((5, 32, 48, 3), np.float32)
    frames[:, :, :24] = [1.0, 0.0, 0.0]  # left half red, a different frame each step down
    for i in range(5):
        frames[i, 6 * i : 6 * i + 6, 24:] = 1.0
    video = media.read_video(media.save(frames, tmp_path / "v.mp4", fps=8, metadata={"seed": 3}))
    assert video.shape == (5, 32, 48, 3)
    assert np.abs(video.astype(np.float32) - media.to_uint8(frames)).mean() < 4  # H.264 at crf 12, yuv420p
    assert media.read_metadata(tmp_path / "v.mp4") == {"seed": 3}
    png = media.save(frames[:1], tmp_path / "one.png", fps=8, metadata={"seed": 4})
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(png)), media.to_uint8(frames[:1])[0])
    assert media.read_metadata(png) == {"seed": 4}
    # uint8 frames (the pipeline's output_type="uint8") are written as they are
    pixels = media.to_uint8(frames)
    assert media.to_uint8(pixels) is pixels
    np.testing.assert_array_equal(np.asarray(Image.open(media.save(pixels[:1], tmp_path / "u8.png", fps=8))),
                                  pixels[0])
    np.testing.assert_array_equal(media.read_video(media.save(pixels, tmp_path / "u8.mp4", fps=8)), video)
    strided = np.repeat(pixels, 2, axis=2)[:, :, ::2]  # a strided view, as a caller's slice may be
    np.testing.assert_array_equal(media.read_video(media.save(strided, tmp_path / "s.mp4", fps=8)), video)
    with pytest.raises(ValueError, match="PNG holds one frame"):
        media.save(frames, tmp_path / "many.png", fps=8)
