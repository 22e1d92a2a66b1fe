"""Prompt adherence read from frames alone: the colour, motion and shape of a video's one object.

The measure behind `kinoray eval`. The background is the median colour of the frame's border;
the object is every pixel far from it. Its colour is the palette entry nearest the object's mean
colour, its motion the path of its centroid from the first frame to the last, its shape the share
of its bounding box it fills (a square fills it, a circle pi/4 of it, a triangle half).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kinoray.models.scenes import COLOURS, Scene

# RGB distance from the background beyond which a pixel belongs to the object.
OBJECT_DISTANCE = 60.0
# Fewer object pixels than this in a frame: nothing was drawn.
MIN_PIXELS = 12
# Centroid travel (fraction of the frame's side) below which the object stays still.
STILL_TRAVEL = 0.08
# Fill ratios between the shapes' ideals: square 0.81..1, circle 0.785, triangle 0.5.
FILL_SQUARE, FILL_TRIANGLE = 0.87, 0.64


@dataclass(frozen=True)
class Reading:
    """What the frames show; None where nothing could be read (no object)."""

    colour: str | None
    motion: str | None
    shape: str | None


def read_frames(frames: np.ndarray) -> Reading:
    """Read a video's object. `frames`: uint8 or float in 0..255, shape (T, H, W, 3), T >= 1."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim == 3:
        frames = frames[None]
    masks = [_object_mask(f) for f in frames]
    if sum(int(m.sum()) >= MIN_PIXELS for m in masks) < max(1, len(masks) // 2):
        return Reading(None, None, None)
    pixels = np.concatenate([f[m] for f, m in zip(frames, masks)])
    mean = pixels.mean(axis=0)
    colour = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c], np.float32) - mean) ** 2)))
    return Reading(colour, _motion(masks, frames.shape[1:3]), _shape(masks[len(masks) // 2]))


def _object_mask(frame: np.ndarray) -> np.ndarray:
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    background = np.median(border, axis=0)
    mask: np.ndarray = np.linalg.norm(frame - background, axis=-1) > OBJECT_DISTANCE
    return mask


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    if mask.sum() < MIN_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _motion(masks: list[np.ndarray], hw: tuple[int, ...]) -> str | None:
    points = [c for c in map(_centroid, masks) if c is not None]
    if len(points) < 2:
        return "still" if points else None
    (x0, y0), (x1, y1) = points[0], points[-1]
    side = float(min(hw))
    dx, dy = (x1 - x0) / side, (y1 - y0) / side
    if max(abs(dx), abs(dy)) < STILL_TRAVEL:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _shape(mask: np.ndarray) -> str | None:
    if mask.sum() < MIN_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill >= FILL_SQUARE else "triangle" if fill < FILL_TRIANGLE else "circle"


@dataclass(frozen=True)
class Score:
    """Per-attribute hits for one video against the scene its prompt describes."""

    colour: bool
    motion: bool
    shape: bool


def score(frames: np.ndarray, scene: Scene) -> Score:
    """Whether the frames show the scene's colour, motion and shape."""
    r = read_frames(frames)
    return Score(r.colour == scene.colour, r.motion == scene.motion, r.shape == scene.shape)
