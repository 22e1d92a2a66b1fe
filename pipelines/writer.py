"""The last step of a bulk job: frames -> a video file per row, and the row's manifest entry."""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from kinoray.models import telemetry
from kinoray.models.latents import SUFFIX as LATENTS_SUFFIX
from kinoray.models.latents import dump_latents, load_latents
from kinoray.models.request import REQUEST_COLUMNS
from kinoray.models.stages import Batch, Stage, column, scalar
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


# Where a row resumed from saved latents came from: deleted once its video is written.
LATENTS_PATH = "latents_path"


def load_saved_latents(batch: Batch) -> Batch:
    """Put the saved latents of rows resuming at the decode stage into their `latents`."""
    paths = batch.get(LATENTS_PATH)
    if paths is None or not any(isinstance(p, str) and p for p in paths):
        return batch
    values = list(batch["latents"])
    for i, path in enumerate(paths):
        if isinstance(path, str) and path:
            with fsspec.open(path, "rb") as f:
                values[i] = load_latents(f.read())[0]
            telemetry.inc("kinoray_latents_resumed_total")
    return {**batch, "latents": column(values)}


def _save_latents(output: str, batch: Batch, i: int) -> str:
    """Write row `i`'s latents under `<output>/latents/`; returns the file's URL."""
    row = {c: _plain(batch[c][i], False) for c in REQUEST_COLUMNS}
    data = dump_latents(np.asarray(batch["latents"][i]), row, str(batch["request_digest"][i]))
    path = manifest.join(output, manifest.LATENTS_DIR, f"{row['id']}{LATENTS_SUFFIX}")
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(root, "wb") as f:
        f.write(data)
    telemetry.inc("kinoray_latents_saved_total", frontend="bulk")
    return path


def write_videos(batch: Batch, output: str, run: str, state: Any, passthrough: Sequence[str]) -> Batch:
    """Write each row's video and report its manifest row to the job's state; returns each
    row's status (frames and everything else stay here). A row whose decode ran out of memory
    keeps its latents, saved under `<output>/latents/` (status `denoised`); a row decoded from
    saved latents has them deleted once its video is written."""
    import ray

    out = VideoWriter(output)(batch)
    n = len(out["id"])
    status = ["failed" if e else "ok" for e in out["error"]]
    outputs = list(out["output"])
    kept = out.get("latents")
    for i in range(n):
        if out["error_reason"][i] == "out_of_memory" and kept is not None and np.asarray(kept[i]).size:
            outputs[i], status[i] = _save_latents(output, out, i), "denoised"
        elif status[i] == "ok" and isinstance(out.get(LATENTS_PATH, [None] * n)[i], str):
            fs, path = fsspec.core.url_to_fs(out[LATENTS_PATH][i])
            fs.rm(path)
    out["output"] = column(outputs)
    schema = manifest.schema(passthrough)
    columns: dict[str, list[Any]] = {}
    for field in schema:
        if field.name == "status":
            columns["status"] = status
        elif field.name == "run":
            columns["run"] = [run] * n
        elif field.name == "image":
            columns["image"] = [manifest.image_label(_plain(v, True)) for v in out["image"]]
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
