"""The last step of a bulk job: frames -> a video file per row, and the row's manifest entry."""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from kinoray.models import telemetry
from kinoray.models.stages import Batch, Stage, scalar
from kinoray.models.video import encode_video
from kinoray.pipelines import manifest
from kinoray.pipelines.state import video_name


class VideoWriter(Stage):
    """`frames` -> `<output>/videos/<id>.mp4` (PNG for one frame) per row, tagged with the
    request's digest so that a rerun can trust a video whose manifest row was never written.

    A video is written under a temporary name and moved into place, so a file named by its id
    is always complete, whatever was killed when.
    """

    name = "write"

    def __init__(self, output: str):
        super().__init__(max_batch_size=1)
        self.output = output
        self.fs, self.root = fsspec.core.url_to_fs(manifest.join(output, manifest.VIDEOS_DIR))
        self.fs.makedirs(self.root, exist_ok=True)

    def input_columns(self) -> dict[str, str]:
        return {
            "id": "row id: names the file",
            "frames": "uint8 frames (T, H, W, 3)",
            "fps": "frame rate",
            "request_digest": "digest of the request, stored in the file's metadata",
        }

    def output_columns(self) -> dict[str, str]:
        return {"output": "URL of the written video"}

    def consumed_columns(self) -> tuple[str, ...]:
        return ("frames",)

    def compute(self, batch: Batch, rows: list[int], key: Hashable, **kwargs: Any) -> dict[str, list[Any]]:
        (i,) = rows
        rid, frames = str(batch["id"][i]), np.asarray(batch["frames"][i])
        data = encode_video(frames, int(batch["fps"][i]), tag=str(batch["request_digest"][i]))
        name = video_name(rid, frames.shape[0])
        tmp = manifest.join(self.root, f".tmp-{uuid.uuid4().hex}-{rid}")
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, manifest.join(self.root, name))
        telemetry.inc("kinoray_videos_total", frontend="bulk")
        telemetry.inc("kinoray_frames_total", frames.shape[0], frontend="bulk")
        return {"output": [manifest.join(self.output, manifest.VIDEOS_DIR, name)]}


def write_videos(batch: Batch, output: str, run: str, state: Any, passthrough: Sequence[str]) -> Batch:
    """Write each row's video and report its manifest row to the job's state; returns each
    row's status (frames and everything else stay here)."""
    import ray

    out = VideoWriter(output)(batch)
    n = len(out["id"])
    status = ["failed" if e else "ok" for e in out["error"]]
    schema = manifest.schema(passthrough)
    columns: dict[str, list[Any]] = {}
    for field in schema:
        if field.name == "status":
            columns["status"] = status
        elif field.name == "run":
            columns["run"] = [run] * n
        elif field.name in out:
            blank = field.name in manifest.OUTCOME_COLUMNS  # "" there means "none"
            columns[field.name] = [_plain(v, blank) for v in out[field.name]]
        else:
            columns[field.name] = [None] * n
    ray.get(state.record.remote(pa.Table.from_pydict(columns, schema=schema)))
    return {"status": np.array(status, dtype=object)}


def _plain(value: Any, blank_is_none: bool) -> Any:
    value = scalar(value)
    if isinstance(value, float) and value != value:  # Arrow's missing float came back as NaN
        return None
    return None if blank_is_none and value == "" else value
