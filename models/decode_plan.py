"""How to decode a batch of latents within a memory budget: plans, their memory, the order to try.

The VAE decode is where long video jobs run out of memory: its activations grow with the
decoded volume (frames x height x width) times the decoder's widest channel count. A plan is a
way to decode: the whole batch at once, the batch in smaller pieces, one row at a time in tiles
(diffusers' `enable_tiling`), or in half-size tiles. `plans()` lists them from the fastest to
the leanest; the decoder starts from the first whose estimated peak fits the budget and, on an
out-of-memory error, goes on to the next.

The estimate (`peak_bytes`) is `factor * rows * frames * height * width * channels * itemsize`
for an untiled decode of output frames of height x width pixels, with `channels` the VAE
decoder's widest block; a tiled decode holds one tile's volume at a time plus the output. The
`factor` of each family was measured on its tiny preset (peak resident memory of a decode in a
fresh process, minus the same before it, over the formula's volume): see
`FamilyAdapter.decode_memory_factor`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

PlanName = Literal["whole", "split", "tiled", "tiled_small"]
# The setting that makes decoding fail on purpose, for testing what happens after: `every=N` (every
# N-th VAE call, counted per decoder process), `ids=a,b` (every call for those rows), `prompt=text`
# (every call for rows whose prompt contains the text); several are joined with `;`.
FAULT_ENV = "KINORAY_TESTING_DECODE_OOM"


@dataclass(frozen=True)
class DecodePlan:
    """`rows` per VAE call; `tile_scale` 0 for no tiling, 1 for the VAE's tiles, 0.5 for half-size."""

    name: PlanName
    rows: int
    tile_scale: float = 0.0


def plans(n: int, forced: str = "auto") -> list[DecodePlan]:
    """The plans for a batch of `n` rows, fastest first; `forced` keeps only plans of that kind."""
    out = [DecodePlan("whole", n)]
    rows = n // 2
    while rows >= 1:
        out.append(DecodePlan("split", rows))
        rows //= 2
    out += [DecodePlan("tiled", 1, 1.0), DecodePlan("tiled_small", 1, 0.5)]
    if forced != "auto":
        # "whole" means whole frames (untiled), in smaller batches too: a row that does not fit
        # never takes its neighbours down with it.
        kinds = {"whole": ("whole", "split"), "split": ("split",), "tiled": ("tiled", "tiled_small")}[forced]
        out = [p for p in out if p.name in kinds] or [DecodePlan("split", 1)]
    return out


def peak_bytes(
    plan: DecodePlan,
    frames: int,
    height: int,
    width: int,
    channels: int,
    itemsize: int,
    factor: float,
    tile: tuple[int, int, int],
) -> int:
    """Estimated peak memory of decoding with `plan`: output of `frames` x `height` x `width`
    pixels per row; `tile` is the VAE's (frames, height, width) tile at scale 1."""
    output = plan.rows * frames * height * width * 3 * 4  # the decoded frames, float32
    if plan.tile_scale:
        t, h, w = tile
        volume = (
            min(frames, t or frames)
            * min(height, int(h * plan.tile_scale))
            * min(width, int(w * plan.tile_scale))
        )
    else:
        volume = plan.rows * frames * height * width
    return int(factor * volume * channels * itemsize) + output


def order(
    candidates: list[DecodePlan], estimate: dict[DecodePlan, int], budget: int | None
) -> list[DecodePlan]:
    """Plans to try in turn: from the first whose estimate fits `budget` (None: no budget) on."""
    if budget is None:
        return candidates
    fitting = next((i for i, p in enumerate(candidates) if estimate[p] <= budget), len(candidates) - 1)
    return candidates[fitting:]


class FaultInjection:
    """Out-of-memory errors on purpose, as `KINORAY_TESTING_DECODE_OOM` asks (off when unset)."""

    def __init__(self, setting: str | None = None):
        setting = os.environ.get(FAULT_ENV, "") if setting is None else setting
        self.every = 0
        self.ids: frozenset[str] = frozenset()
        self.prompt = ""
        self.calls = 0
        for part in filter(None, (p.strip() for p in setting.split(";"))):
            key, _, value = part.partition("=")
            if key == "every":
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(
                        f"{FAULT_ENV}: every must be a whole number of calls, 1 or more (got {value!r})"
                    )
                self.every = int(value)
            elif key == "ids":
                self.ids = frozenset(v for v in value.split(",") if v)
            elif key == "prompt":
                self.prompt = value
            else:
                raise ValueError(f"{FAULT_ENV}: unknown setting {key!r}; use every=N, ids=a,b or prompt=text")

    def check(self, ids: list[str], prompts: list[str] | None = None) -> None:
        """Raise MemoryError if this VAE call (for rows `ids` with `prompts`) is one to fail."""
        self.calls += 1
        if self.every and self.calls % self.every == 0:
            raise MemoryError(f"out of memory injected by {FAULT_ENV} (call {self.calls})")
        hit = self.ids.intersection(ids)
        if self.prompt and any(self.prompt in p for p in prompts or ()):
            hit = hit | {f"prompt {self.prompt!r}"}
        if hit:
            raise MemoryError(f"out of memory injected by {FAULT_ENV} for {', '.join(sorted(hit))}")
