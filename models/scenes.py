"""Synthetic scenes: one coloured shape moving over a plain background, with its caption.

The training data of the `shapes-wan` preset and the ground truth of `kinoray eval`. Every clip is
a pure function of its `Scene`, and `sample_scene(rng)` draws scenes from a seeded
`numpy.random.Generator`, so a dataset is reproducible from its seed alone.

Captions read "a red circle moving left on a black background"; the words are `VOCABULARY`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# RGB in 0..255. Far apart in RGB (and in the VAE's latent space once trained), so that the colour
# of a blob can be read back from generated frames by its nearest palette entry.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (10, 10, 10), "gray": (110, 110, 110)}

# Colour-shape pairs never rendered for training: `kinoray eval` reports them apart, as a test of
# composition (the model knows "red" and "triangle", never saw a red triangle).
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square")}
)

VOCABULARY = ("a", "on", "background", "moving", "staying", *COLOURS, *SHAPES, *MOTIONS, *BACKGROUNDS)

# Pixel geometry at the training size (64 x 64, 9 frames); other sizes scale with the frame.
SIZE_RANGE = (0.14, 0.19)  # the shape's half-size, as a fraction of the frame's side
TRAVEL_RANGE = (0.30, 0.42)  # distance travelled over the clip, as a fraction of the side

_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class Scene:
    """One clip's content. Positions and sizes are fractions of the frame's side (0..1)."""

    colour: str
    shape: str
    motion: str
    background: str
    x: float  # centre at the first frame
    y: float
    half_size: float
    travel: float

    def caption(self, with_background: bool = True) -> str:
        """The clip in plain words, e.g. "a red circle moving left on a black background"."""
        verb = "staying still" if self.motion == "still" else f"moving {self.motion}"
        where = f" on a {self.background} background" if with_background else ""
        return f"a {self.colour} {self.shape} {verb}{where}"

    def centre(self, t: float) -> tuple[float, float]:
        """The shape's centre at clip time t in [0, 1]."""
        dx, dy = _DIRECTIONS[self.motion]
        return self.x + dx * self.travel * t, self.y + dy * self.travel * t

    def render(self, num_frames: int = 9, height: int = 64, width: int = 64) -> np.ndarray:
        """The clip as uint8 frames, shape (num_frames, height, width, 3)."""
        side = min(height, width)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        frames = np.empty((num_frames, height, width, 3), np.float32)
        bg = np.array(BACKGROUNDS[self.background], np.float32)
        fg = np.array(COLOURS[self.colour], np.float32)
        for i in range(num_frames):
            cx, cy = self.centre(i / max(num_frames - 1, 1))
            cover = _coverage(
                self.shape, (xs - cx * width) / side, (ys - cy * height) / side, self.half_size, side
            )
            frames[i] = bg + cover[..., None] * (fg - bg)
        return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, side: int) -> np.ndarray:
    """Fraction of each pixel inside the shape (a one-pixel linear edge, so edges are smooth)."""
    if shape == "circle":
        signed = np.hypot(dx, dy) - r
    elif shape == "square":
        signed = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.9
    else:  # an upward isosceles triangle: apex (0, -r), base corners (+-r, r)
        signed = np.maximum(dy - r, (2 * np.abs(dx) - dy - r) / np.sqrt(5.0))
    return np.clip(0.5 - signed * side, 0.0, 1.0)


def sample_scene(
    rng: np.random.Generator,
    *,
    pairs: list[tuple[str, str]] | None = None,
    motion: str | None = None,
    background: str | None = None,
) -> Scene:
    """A random scene whose shape stays inside the frame for the whole clip.

    `pairs` limits the colour-shape pairs drawn from (default: all but `HELD_OUT`).
    """
    pairs = pairs or training_pairs()
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    motion = motion or MOTIONS[int(rng.integers(len(MOTIONS)))]
    background = background or list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    half = float(rng.uniform(*SIZE_RANGE))
    travel = float(rng.uniform(*TRAVEL_RANGE)) if motion != "still" else 0.0
    dx, dy = _DIRECTIONS[motion]
    lo, hi = half + 0.02, 1 - half - 0.02

    def start(d: int) -> float:
        # The whole path lies within [lo, hi].
        a, b = (lo, hi - travel) if d > 0 else (lo + travel, hi) if d < 0 else (lo, hi)
        return float(rng.uniform(a, b))

    return Scene(colour, shape, motion, background, start(dx), start(dy), half, travel)


def parse_caption(text: str) -> Scene | None:
    """The scene a prompt asks for, read from its words (e.g. "A blue square moving up."), or
    None when it names no colour, shape or motion of the vocabulary. Position and size are the
    frame's centre and the middle of the training range; they do not count in `adherence`."""
    words = [w.strip(".,;:!?\"'") for w in text.lower().split()]

    def first(options: tuple[str, ...] | list[str]) -> str | None:
        return next((w for w in words if w in options), None)

    colour, shape, background = first(list(COLOURS)), first(SHAPES), first(list(BACKGROUNDS))
    motion = "still" if "still" in words else first(MOTIONS[:4])
    if colour is None or shape is None or motion is None:
        return None
    return Scene(colour, shape, motion, background or "black", 0.5, 0.5, 0.16, 0.36)


def training_pairs() -> list[tuple[str, str]]:
    return [p for p in itertools.product(COLOURS, SHAPES) if p not in HELD_OUT]


def prompt_set(held_out: bool) -> list[Scene]:
    """One scene per colour-shape pair (seen in training, or held out) and motion, on black and
    gray in turn: the prompts `kinoray eval` measures. Positions are the frame's centre."""
    pairs = sorted(HELD_OUT) if held_out else training_pairs()
    scenes = []
    for i, ((colour, shape), motion) in enumerate(itertools.product(pairs, MOTIONS)):
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        scenes.append(Scene(colour, shape, motion, background, 0.5, 0.5, 0.16, 0.36))
    return scenes
