"""`kinoray eval`: prompt adherence of a shapes model, and of the settings that change its outputs.

For each variant (the plain run, First Block Cache, tiled decoding, half the steps, bfloat16), the
prompts of `scenes.prompt_set` are generated through `LocalPipeline` (the three stages, as in
production) and read back with `adherence.read_frames`: the share of videos whose object has the
prompt's colour, motion and shape, for colour-shape pairs seen in training and for held-out ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinoray.models import adherence, scenes

if TYPE_CHECKING:
    from kinoray.models.config import KinorayConfig

# Each variant: overrides of the config's sections (`model`, `decoder`) and of the request.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "first_block_cache": {"model": {"cache": "first_block"}},
    "tiled_decode": {"decoder": {"plan": "tiled", "tile_size": 32}},
    "half_steps": {"request": {"num_inference_steps": 0.5}},  # a fraction of the model's default
    "bfloat16": {"model": {"dtype": "bfloat16"}},
}


@dataclass(frozen=True)
class Result:
    """Adherence of one variant on one prompt set: accuracies in 0..1 over `prompts` videos."""

    variant: str
    prompts_set: str  # "seen", "held_out", or a prompt table's path
    prompts: int
    colour: float
    motion: float
    shape: float
    seconds: float


PromptSet = list[tuple[dict[str, Any], scenes.Scene]]  # (request fields, the scene they ask for)
# Videos per built-in prompt: one video per held-out prompt would make each a 7-point step.
SEEDS = 3


def builtin_sets(seeds: int = SEEDS) -> dict[str, PromptSet]:
    """The colour-shape pairs seen in training (45 prompts) and the held-out pairs (15), one
    prompt per pair and motion, each generated with `seeds` seeds: rows are the whole set with
    seeds 0, 1, ..., then again with the next seeds, so the first rows cover every prompt."""
    out = {}
    for which in ("seen", "held_out"):
        prompts = scenes.prompt_set(which == "held_out")
        out[which] = [
            ({"prompt": s.caption(), "seed": k * len(prompts) + i}, s)
            for k in range(seeds)
            for i, s in enumerate(prompts)
        ]
    return out


class PromptTableError(ValueError):
    """A prompt table `kinoray eval` cannot score: the message names the file (and line)."""


def table_set(path: str) -> PromptSet:
    """The rows of a JSONL prompt table whose prompt names a colour, a shape and a motion
    (`scenes.parse_caption`); the row's other request fields are kept, its `id` dropped.

    Raises PromptTableError for a file that cannot be read, a line that is not a JSON object,
    or a table with no such row.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptTableError(f"--prompts {path}: cannot read it ({exc})") from None
    rows, skipped = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise PromptTableError(f"--prompts {path}: line {number} is not a JSON object (a JSONL table)")
        scene = scenes.parse_caption(str(row.get("prompt", "")))
        if scene is None:
            skipped += 1
        else:
            rows.append(({k: v for k, v in row.items() if k != "id"}, scene))
    if not rows:
        raise PromptTableError(
            f"--prompts {path}: no row's prompt names a colour, a shape and a motion "
            f"({', '.join(scenes.COLOURS)}; {', '.join(scenes.SHAPES)}; moving {'/'.join(scenes.MOTIONS[:4])} "
            "or staying still)"
        )
    if skipped:
        print(
            f"kinoray: {path}: {skipped} of {skipped + len(rows)} rows name no colour, shape and motion: not scored"
        )
    return rows


def evaluate(
    prompt_sets: dict[str, PromptSet],
    config: KinorayConfig | None = None,
    variants: Sequence[str] = ("default",),
    limit: int | None = None,
    strips: list[tuple[str, Any]] | None = None,
) -> list[Result]:
    """Generate and score each prompt set under each variant of `config` (default: the default
    config, whose model is shapes-wan unless $KINORAY_MODEL says otherwise).

    `limit` takes the first N prompts of each set (None: all). `strips`, when given, receives
    (prompt, frames) of every video of the first variant. Raises KeyError for an unknown
    variant, `RequestError` for a row the model refuses.
    """
    from kinoray.models.config import KinorayConfig
    from kinoray.models.local import LocalPipeline

    base = config or KinorayConfig()
    results = []
    for name in variants:
        change = VARIANTS[name]
        variant = base.model_copy(
            update={
                "model": base.model.model_copy(update=change.get("model", {})),
                "decoder": base.decoder.model_copy(update=change.get("decoder", {})),
            }
        )
        pipeline = LocalPipeline(variant)
        defaults = variant.request_builder().defaults
        request_change = {
            k: max(1, round(float(v) * defaults[k])) for k, v in change.get("request", {}).items()
        }
        for which, rows in prompt_sets.items():
            rows = rows[:limit]
            requests = [pipeline.request(**{**fields, **request_change}) for fields, _ in rows]
            start = time.perf_counter()
            out = pipeline.run(requests)
            seconds = time.perf_counter() - start
            scores = [adherence.score(f, scene) for f, (_, scene) in zip(out["frames"], rows)]
            if strips is not None and name == variants[0]:
                strips.extend((fields["prompt"], f) for (fields, _), f in zip(rows, out["frames"]))
            n = max(len(scores), 1)
            results.append(
                Result(
                    name,
                    which,
                    len(scores),
                    sum(s.colour for s in scores) / n,
                    sum(s.motion for s in scores) / n,
                    sum(s.shape for s in scores) / n,
                    round(seconds, 2),
                )
            )
    return results


def frame_strip(videos: Sequence[tuple[str, Any]], path: str) -> None:
    """A PNG with one row per video: its prompt above its frames, left to right."""
    from PIL import Image, ImageDraw

    label = 14
    width = max(f.shape[0] * (f.shape[2] + 2) for _, f in videos)
    heights = [f.shape[1] + label + 4 for _, f in videos]
    sheet = Image.new("RGB", (max(width, 8), sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (prompt, frames), height in zip(videos, heights):
        draw.text((2, top + 1), prompt, fill="black")
        for i, frame in enumerate(frames):
            sheet.paste(Image.fromarray(frame), (i * (frame.shape[1] + 2), top + label))
        top += height
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def table(results: Sequence[Result]) -> str:
    """The results as a fixed-width table, accuracies in percent."""
    w = max([len("prompts"), *(len(r.prompts_set) for r in results)])
    lines = [
        f"{'variant':<18} {'prompts':<{w}} {'n':>3} {'colour':>7} {'motion':>7} {'shape':>6} {'seconds':>8}"
    ]
    for r in results:
        lines.append(
            f"{r.variant:<18} {r.prompts_set:<{w}} {r.prompts:>3} {r.colour:>7.0%} {r.motion:>7.0%} "
            f"{r.shape:>6.0%} {r.seconds:>8.1f}"
        )
    return "\n".join(lines)


def main(args: Any, config: KinorayConfig, sets: dict[str, PromptSet], variants: list[str]) -> int:
    """`kinoray eval` with its parsed flags, config, prompt sets and known `variants`: print the
    table, write the files asked for."""
    strips: list[tuple[str, Any]] | None = [] if args.strip else None
    results = evaluate(sets, config, variants, limit=args.limit, strips=strips)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    if args.strip and strips:
        frame_strip(strips, args.strip)
    return 0
