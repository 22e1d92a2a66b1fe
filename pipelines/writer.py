"""The last step of a bulk job: frames -> a video file per row, and the row's manifest entry."""

from __future__ import annotations

import time
import uuid
from typing import Any

import fsspec
import numpy as np

from models import telemetry
from models.video import encode_video, video_suffix
from pipelines.manifest import SCHEMA, VIDEOS_DIR, join

PASS_THROUGH = [f.name for f in SCHEMA if f.name not in ("output", "status", "error", "write_s", "run")]


def write_videos(batch: dict[str, np.ndarray], output: str, run: str) -> dict[str, np.ndarray]:
    """Encode and store each row's frames; return manifest columns only (frames are dropped).

    A video is written under a temporary name and moved into place, so a file named by its id
    is always complete, whatever was killed when.
    """
    fs, root = fsspec.core.url_to_fs(join(output, VIDEOS_DIR))
    fs.makedirs(root, exist_ok=True)
    n = len(batch["id"])
    out: dict[str, list[Any]] = {c: [] for c in SCHEMA.names}
    for i in range(n):
        for c in PASS_THROUGH:
            value = batch[c][i] if c in batch else None
            out[c].append(value.item() if isinstance(value, np.generic) else value)
        error = str(batch["error"][i] or "")
        path, seconds = None, 0.0
        if not error:
            start = time.perf_counter()
            try:
                rid = str(batch["id"][i])
                data = encode_video(np.asarray(batch["frames"][i]), int(batch["fps"][i]))
                path = join(output, VIDEOS_DIR, rid + video_suffix(int(batch["num_frames"][i])))
                tmp = join(root, f".tmp-{uuid.uuid4().hex}-{rid}")
                with fs.open(tmp, "wb") as f:
                    f.write(data)
                fs.mv(tmp, join(root, path.rsplit("/", 1)[-1]))
            except Exception as exc:
                error, path = f"write failed: {type(exc).__name__}: {exc}", None
            seconds = time.perf_counter() - start
            telemetry.record_stage("write", seconds, 1, [error] if error else [])
            if not error:
                telemetry.inc("kinoray_videos_total", frontend="bulk")
                telemetry.inc("kinoray_frames_total", int(batch["num_frames"][i]), frontend="bulk")
        out["output"].append(path)
        out["status"].append("failed" if error else "ok")
        out["error"].append(error or None)
        out["write_s"].append(seconds)
        out["run"].append(run)
    return {k: np.array(v, dtype=object) for k, v in out.items()}
