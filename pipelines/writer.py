"""The last step of a bulk job: frames -> a video file per row, and the row's manifest entry."""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from typing import Any

import fsspec
import numpy as np

from kinoray.models import telemetry
from kinoray.models.stages import Batch, Stage
from kinoray.models.video import encode_video, video_suffix
from kinoray.pipelines.manifest import SCHEMA, VIDEOS_DIR, join


class VideoWriter(Stage):
    """`frames` -> a video file under `<output>/videos/<id>.mp4` (PNG for one frame) per row.

    A video is written under a temporary name and moved into place, so a file named by its id
    is always complete, whatever was killed when.
    """

    name = "write"

    def __init__(self, output: str):
        super().__init__(max_batch_size=1)
        self.output = output
        self.fs, self.root = fsspec.core.url_to_fs(join(output, VIDEOS_DIR))
        self.fs.makedirs(self.root, exist_ok=True)

    def input_columns(self) -> dict[str, str]:
        return {"id": "row id: names the file", "frames": "uint8 frames (T, H, W, 3)", "fps": "frame rate"}

    def output_columns(self) -> dict[str, str]:
        return {"output": "URL of the written video"}

    def consumed_columns(self) -> tuple[str, ...]:
        return ("frames",)

    def compute(self, batch: Batch, rows: list[int], key: Hashable, **kwargs: Any) -> dict[str, list[Any]]:
        (i,) = rows
        rid, frames = str(batch["id"][i]), np.asarray(batch["frames"][i])
        data = encode_video(frames, int(batch["fps"][i]))
        name = rid + video_suffix(frames.shape[0])
        tmp = join(self.root, f".tmp-{uuid.uuid4().hex}-{rid}")
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, join(self.root, name))
        telemetry.inc("kinoray_videos_total", frontend="bulk")
        telemetry.inc("kinoray_frames_total", frames.shape[0], frontend="bulk")
        return {"output": [join(self.output, VIDEOS_DIR, name)]}


def write_videos(batch: Batch, output: str, run: str) -> Batch:
    """Write each row's video; return the manifest columns only (frames are dropped)."""
    out = VideoWriter(output)(batch)
    out["status"] = np.array(["failed" if e else "ok" for e in out["error"]], dtype=object)
    out["run"] = np.array([run] * len(out["status"]), dtype=object)
    return {
        c: out[c] if c in out else np.array([None] * len(out["status"]), dtype=object) for c in SCHEMA.names
    }
