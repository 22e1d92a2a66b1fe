"""The three stages as Serve deployments, each batching concurrent requests with `@serve.batch`.

They wrap the same stage classes the bulk job runs, one row (a dict of plain values and numpy
arrays) per request; the denoiser reports step progress to the job store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray import serve

from kinoray.models import telemetry
from kinoray.models.latents import dump_latents
from kinoray.models.request import REQUEST_COLUMNS
from kinoray.models.stages import (
    Batch,
    Decoder,
    Denoiser,
    TextEncoder,
    batch_len,
    batch_to_rows,
    rows_to_batch,
    scalar,
)
from kinoray.models.video import encode_video, video_suffix

Row = dict[str, Any]
PROGRESS_INTERVAL_S = 0.25


class _BatchedStage:
    def __init__(self, batch_size: int, batch_wait_timeout_s: float):
        self.run.set_max_batch_size(batch_size)
        self.run.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def run(self, rows: list[Row]) -> list[Row]:
        self.batch_sizes.append(len(rows))
        # The model runs in a thread: the replica keeps accepting requests into the next batch.
        out = await asyncio.to_thread(self.process, rows_to_batch(rows))
        return batch_to_rows(out)

    async def __call__(self, row: Row) -> Row:
        return await self.run(row)

    def get_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)


class EncoderDeployment(_BatchedStage):
    def __init__(self, model: dict[str, Any], batch_size: int = 8, batch_wait_timeout_s: float = 0.05):
        super().__init__(batch_size, batch_wait_timeout_s)
        self.stage = TextEncoder(model)

    def process(self, batch: Batch) -> Batch:
        return self.stage(batch)


class DenoiserDeployment(_BatchedStage):
    def __init__(
        self, model: dict[str, Any], storage: str, batch_size: int = 4, batch_wait_timeout_s: float = 0.05
    ):
        from kinoray.deployments.store import JobStore

        super().__init__(batch_size, batch_wait_timeout_s)
        self.stage = Denoiser(model, max_batch_size=batch_size)
        self.store = JobStore(storage)
        self._last_progress: dict[str, float] = {}

    def _progress(self, ids: list[str], done: int, total: int) -> None:
        # Denoising is ~90% of a job: steps map to 5..90%, decoding and storing to the rest.
        # This runs between denoising steps: storage writes (a PUT each on object storage) are
        # limited to one per PROGRESS_INTERVAL_S per batch, plus the last step.
        now = time.monotonic()
        key = ids[0]
        if done < total and now - self._last_progress.get(key, 0.0) < PROGRESS_INTERVAL_S:
            return
        self._last_progress[key] = now
        if done == total:
            self._last_progress.pop(key, None)
        percent = 5 + int(85 * done / total)
        for job_id in ids:
            self.store.set_progress(job_id, percent)

    def process(self, batch: Batch) -> Batch:
        return self.stage(batch, on_step=self._progress)


class DecoderDeployment(_BatchedStage):
    """Decodes, then encodes the MP4 here, so megabytes rather than raw frames travel onwards.

    A row whose decode ran out of memory with every plan has its latents saved in the job
    store (deleted with the job), and its error says so."""

    def __init__(
        self,
        model: dict[str, Any],
        storage: str,
        decode_options: dict[str, Any],
        batch_size: int = 4,
        batch_wait_timeout_s: float = 0.05,
    ):
        from kinoray.deployments.store import JobStore

        super().__init__(batch_size, batch_wait_timeout_s)
        self.stage = Decoder(model, **decode_options)
        self.store = JobStore(storage)

    def process(self, batch: Batch) -> Batch:
        out = self.stage(batch)
        files, suffixes = [], []
        errors = list(out["error"])
        for i in range(batch_len(out)):
            if out["error_reason"][i] == "out_of_memory" and "latents" in out:
                row = {c: scalar(out[c][i]) for c in REQUEST_COLUMNS}
                self.store.put_latents(row["id"], dump_latents(np.asarray(out["latents"][i]), row, ""))
                errors[i] = f"{errors[i]} in the job store, until the video is deleted"
                telemetry.inc("kinoray_latents_saved_total", frontend="online")
            if out["error"][i]:
                files.append(b"")
                suffixes.append("")
                continue
            files.append(encode_video(out["frames"][i], int(out["fps"][i])))
            suffixes.append(video_suffix(int(out["num_frames"][i])))
        del out["frames"]
        out.pop("latents", None)
        out["error"] = np.array(errors, dtype=object)
        out["video"] = np.array(files, dtype=object)
        out["suffix"] = np.array(suffixes, dtype=object)
        return out
