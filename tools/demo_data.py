"""Synthetic text-to-video data for the embedded demo model, and a detector that reads clips back.

A scene is (shape, colour, motion, background); its prompt comes from one template:

    "a red circle moves left on a black background"

A clip is F = 17 frames of 64 × 64 RGB in [0, 1]: one flat-coloured shape (anti-aliased edges) moving in a
straight line at constant speed over a flat background, never leaving the frame. The per-clip size, speed
and start point are drawn from a seeded numpy generator, so every clip is reproducible from (scene, seed).

3 shapes × 5 colours × 4 motions × 2 backgrounds = 120 scenes. `HELD_OUT` (24 scenes) are never used in
training; the split is chosen so that every pair of attribute values (e.g. red + left, circle + gray) still
occurs in training — the held-out prompts test composition, not unseen words.

The renderer takes an array module (`xp=numpy` or `jax.numpy`), so the training script draws batches on
the accelerator with exactly the code the tests use. `detect` is the inverse used by the quality gate:
background from the border pixels, the object as the pixels that differ from it, colour = nearest palette
entry of the object's mean colour, motion = the dominant axis of the object's centroid displacement.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

HEIGHT = WIDTH = 64
NUM_FRAMES = 17
FPS = 8

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # RGB in [0, 1]
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
MOTIONS = {  # unit step (dx, dy) in image coordinates: x to the right, y downwards
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}
TEMPLATE = "a {colour} {shape} moves {motion} on a {background} background"

# Per-clip ranges (pixels, pixels per frame).
SIZE_RANGE = (6.0, 10.0)  # "radius": circle radius, square half-side, triangle half-width
SPEED_RANGE = (1.2, 2.0)  # total travel 19-32 px over the 16 frame steps
MARGIN = 1.0


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    motion: str
    background: str

    @property
    def prompt(self) -> str:
        return TEMPLATE.format(colour=self.colour, shape=self.shape, motion=self.motion,
                               background=self.background)

    @property
    def index(self) -> tuple[int, int, int, int]:
        return (SHAPES.index(self.shape), list(COLOURS).index(self.colour), list(MOTIONS).index(self.motion),
                list(BACKGROUNDS).index(self.background))


ALL_SCENES = tuple(Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, MOTIONS, BACKGROUNDS))
# One scene in five, by index sum: for any two fixed attributes at most 2 of their 4-8 scenes are held out,
# so every attribute pair stays in training.
HELD_OUT = tuple(s for s in ALL_SCENES if sum(s.index) % 5 == 0)
TRAIN_SCENES = tuple(s for s in ALL_SCENES if s not in HELD_OUT)
VOCAB_WORDS = sorted({w for s in ALL_SCENES for w in s.prompt.split()})


def parse_prompt(prompt: str) -> Scene:
    """The scene a template prompt describes (raises ValueError for anything else)."""
    for s in ALL_SCENES:
        if s.prompt == " ".join(prompt.lower().split()):
            return s
    raise ValueError(f"not a demo prompt: {prompt!r} (expected {TEMPLATE!r})")


# ----------------------------------------------------------------------------------------------- render


def sample_params(rng: np.random.Generator, scenes) -> dict[str, np.ndarray]:
    """Per-clip arrays (B,) for `render`: attribute ids, size, start point and velocity (pixels)."""
    idx = np.array([s.index for s in scenes], np.int32).reshape(-1, 4)
    B = len(idx)
    size = rng.uniform(*SIZE_RANGE, B)
    speed = rng.uniform(*SPEED_RANGE, B)
    step = np.array(list(MOTIONS.values()))[idx[:, 2]]  # (B, 2)
    vel = step * speed[:, None]
    travel = vel * (NUM_FRAMES - 1)
    lo = size[:, None] + MARGIN - np.minimum(travel, 0)  # the whole path stays inside the frame
    hi = np.array([WIDTH, HEIGHT]) - size[:, None] - MARGIN - np.maximum(travel, 0)
    start = lo + rng.uniform(0, 1, (B, 2)) * (hi - lo)
    return dict(shape=idx[:, 0], colour=idx[:, 1], motion=idx[:, 2], background=idx[:, 3],
                size=size.astype(np.float32), x0=start[:, 0].astype(np.float32), y0=start[:, 1].astype(np.float32),
                vx=vel[:, 0].astype(np.float32), vy=vel[:, 1].astype(np.float32))


def render(p: dict, xp=np):
    """Clips (B, F, H, W, 3) in [0, 1] from `sample_params` arrays; `xp` is numpy or jax.numpy."""
    t = xp.arange(NUM_FRAMES, dtype=xp.float32)[None, :, None, None]  # (1, F, 1, 1)
    ys = xp.arange(HEIGHT, dtype=xp.float32)[None, None, :, None] + 0.5
    xs = xp.arange(WIDTH, dtype=xp.float32)[None, None, None, :] + 0.5
    col = lambda a: xp.asarray(a)[:, None, None, None]  # (B,) -> (B, 1, 1, 1)
    dx = xs - (col(p["x0"]) + col(p["vx"]) * t)
    dy = ys - (col(p["y0"]) + col(p["vy"]) * t)
    r = col(p["size"])
    # Signed distances (negative inside): circle, square, and an upward triangle as 3 half-planes.
    d_circle = xp.sqrt(dx * dx + dy * dy) - r
    d_square = xp.maximum(xp.abs(dx), xp.abs(dy)) - 0.85 * r
    n = 1.0 / np.sqrt(1.0 + 0.5**2)  # normalises the slanted edges |dx| = (dy + r) / 2 (apex at dy = -r)
    d_triangle = xp.maximum(dy - 0.8 * r, (xp.abs(dx) - 0.5 * (dy + r)) * n)
    shape = col(p["shape"])
    d = xp.where(shape == 0, d_circle, xp.where(shape == 1, d_square, d_triangle))
    cover = xp.clip(0.5 - d, 0.0, 1.0)[..., None]  # 1-pixel anti-aliased edge
    colour = xp.asarray(np.array(list(COLOURS.values()), np.float32))[xp.asarray(p["colour"])]
    bg = xp.asarray(np.array(list(BACKGROUNDS.values()), np.float32))[xp.asarray(p["background"])]
    colour, bg = colour[:, None, None, None, :], bg[:, None, None, None, :]
    return bg + (colour - bg) * cover


def make_clips(scenes, seed: int) -> np.ndarray:
    """Deterministic clips (B, F, H, W, 3) float32 in [0, 1] for a list of scenes."""
    return render(sample_params(np.random.default_rng(seed), scenes)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- detect


def detect(frames: np.ndarray, threshold: float = 0.25, min_pixels: int = 8) -> tuple[str | None, str | None]:
    """(colour, motion) read from a clip (F, H, W, 3) in [0, 1]; None where nothing is found.

    Background = median of the border pixels over all frames (the object covers little of the border).
    Object = pixels whose largest channel difference to it exceeds `threshold`. Colour = the palette entry
    nearest the mean colour of the object's clearly-inside pixels. Motion = the sign of the larger component
    of the centroid displacement between the first and the last quarter of the frames.
    """
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"detect: expected (F, H, W, 3) frames, got {frames.shape}")
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    bg = np.median(border.reshape(-1, 3), axis=0)
    diff = np.abs(frames - bg).max(-1)  # (F, H, W)
    mask = diff > threshold
    counts = mask.sum((1, 2))
    valid = counts >= min_pixels
    if valid.sum() < 2:
        return None, None
    core = diff > max(threshold, 0.5 * diff.max())
    mean = frames[core].mean(0)
    palette = np.array(list(COLOURS.values()))
    colour = list(COLOURS)[int(np.argmin(((palette - mean) ** 2).sum(-1)))]

    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    w = mask.astype(np.float32)
    cx = (w * xs).sum((1, 2)) / np.maximum(counts, 1)
    cy = (w * ys).sum((1, 2)) / np.maximum(counts, 1)
    frames_ok = np.flatnonzero(valid)
    q = max(1, len(frames_ok) // 4)
    first, last = frames_ok[:q], frames_ok[-q:]
    dx = cx[last].mean() - cx[first].mean()
    dy = cy[last].mean() - cy[first].mean()
    if max(abs(dx), abs(dy)) < 2.0:  # barely moves: no direction
        return colour, None
    if abs(dx) >= abs(dy):
        return colour, "right" if dx > 0 else "left"
    return colour, "down" if dy > 0 else "up"


if __name__ == "__main__":  # quick self-check: the detector reads every rendered scene correctly
    clips = make_clips(ALL_SCENES, seed=0)
    ok = sum(detect(c) == (s.colour, s.motion) for c, s in zip(clips, ALL_SCENES, strict=True))
    print(f"{len(ALL_SCENES)} scenes, {len(HELD_OUT)} held out, vocab {len(VOCAB_WORDS)} words; "
          f"detector on ground truth: {ok}/{len(ALL_SCENES)}")
