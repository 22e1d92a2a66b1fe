"""The three stages as Serve deployments, each batching concurrent requests with `@serve.batch`.

They wrap the same stage classes the bulk job runs, one row (a dict of plain values and numpy
arrays) per request; the denoiser reports step progress to the job store.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import numpy as np
from ray import serve

from kinoray.deployments.store import PROGRESS_INTERVAL_S
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
from kinoray.models.video import encode_video, spritesheet, thumbnail, video_suffix

Row = dict[str, Any]


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
    def __init__(
        self,
        model: dict[str, Any],
        batch_size: int = 8,
        batch_wait_timeout_s: float = 0.05,
        encode_options: dict[str, Any] | None = None,
    ):
        super().__init__(batch_size, batch_wait_timeout_s)
        self.stage = TextEncoder(model, **(encode_options or {}))

    def process(self, batch: Batch) -> Batch:
        return self.stage(batch)


class DenoiserDeployment(_BatchedStage):
    """Denoises and reports step progress of video jobs to the job store.

    A job stops at the next step when its request is cancelled (Serve propagates the caller's
    cancellation here) or when its record leaves the job store (deleted through any ingress
    replica; checked once per PROGRESS_INTERVAL_S). Its batch-mates go on.

    Requests with LoRA adapters come with Serve's `multiplexed_model_id` set to their adapter
    set (`lora_key`): the replica reports the sets it holds, so Serve routes each request to a
    replica that already has its adapters, and `@serve.batch` batches one set at a time. The
    stage's `LoraCache` loads and evicts the adapters themselves. Each row's output names the
    replica that denoised it (`denoised_by`)."""

    def __init__(
        self,
        model: dict[str, Any],
        storage: str,
        batch_size: int = 4,
        batch_wait_timeout_s: float = 0.05,
        denoise_options: dict[str, Any] | None = None,
    ):
        from kinoray.deployments.store import JobStore, replica_id

        super().__init__(batch_size, batch_wait_timeout_s)
        options = {**(denoise_options or {}), "max_batch_size": batch_size}  # Serve's batch
        self.stage = Denoiser(model, **options)
        self.store = JobStore(storage)
        self.replica = replica_id()

        async def hold_adapter_set(model_id: str) -> str:
            return model_id  # the stage loads the set's adapters in the call that needs them

        # Serve keeps as many adapter sets per replica as the stage keeps adapters.
        self._adapter_sets = serve.multiplexed(max_num_models_per_replica=self.stage.loras.capacity)(
            hold_adapter_set
        )
        self._last_progress: dict[str, float] = {}
        self._last_check: dict[str, float] = {}
        self.steps_done: dict[str, int] = {}  # rows being denoised -> steps done
        # id -> (when its cancellation arrived, steps it had done, how: "request" or "storage");
        # kept an hour at most, for a request cancelled while still queued.
        self.cancelled: dict[str, tuple[float, int, str]] = {}
        self.stopped: deque[dict[str, Any]] = deque(maxlen=1000)

    async def __call__(self, row: Row) -> Row:
        adapter_set = serve.get_multiplexed_model_id()
        if adapter_set:
            await self._adapter_sets(adapter_set)
        try:
            return await self.run(row)
        except asyncio.CancelledError:
            self._cancel(str(row["id"]), "request")
            raise

    def _cancel(self, job_id: str, how: str) -> None:
        now = time.monotonic()
        self.cancelled = {k: v for k, v in self.cancelled.items() if now - v[0] < 3600}
        self.cancelled.setdefault(job_id, (now, self.steps_done.get(job_id, 0), how))

    def _cancelled(self, ids: list[str]) -> set[str]:
        now = time.monotonic()
        if now - self._last_check.get(ids[0], 0.0) >= PROGRESS_INTERVAL_S:
            self._last_check[ids[0]] = now
            for i in ids:
                if i.startswith("video_") and i not in self.cancelled and not self.store.exists(i):
                    self._cancel(i, "storage")
        return {i for i in ids if i in self.cancelled}

    def _progress(self, ids: list[str], done: int, total: int) -> None:
        # Denoising is ~90% of a job: steps map to 5..90%, decoding and storing to the rest.
        # This runs between denoising steps: storage writes (a PUT each on object storage) are
        # limited to one per PROGRESS_INTERVAL_S per batch, plus the last step. Image requests
        # are answered synchronously and report none.
        ids = [i for i in ids if i.startswith("video_")]
        now = time.monotonic()
        if not ids or done < total and now - self._last_progress.get(ids[0], 0.0) < PROGRESS_INTERVAL_S:
            return
        self._last_progress[ids[0]] = now
        percent = 5 + int(85 * done / total)
        for job_id in ids:
            self.store.set_progress(job_id, percent)

    def process(self, batch: Batch) -> Batch:
        ids = [str(i) for i in batch["id"]]
        dropped_at: dict[str, int] = {}

        def on_step(live: list[str], done: int, total: int) -> None:
            self.steps_done.update(dict.fromkeys(live, done))
            self._progress(live, done, total)

        def cancelled() -> set[str]:
            gone = self._cancelled(ids)
            for i in gone:
                dropped_at.setdefault(i, self.steps_done.get(i, 0))
            return gone

        try:
            out = self.stage(batch, on_step=on_step, cancelled=cancelled)
        finally:
            for table in (self._last_check, self._last_progress):
                table.pop(ids[0], None)
            for i in ids:
                self.steps_done.pop(i, None)
        for i, reason in zip(ids, out["error_reason"]):
            if reason == "cancelled":
                # After its last progress write, in the thread that writes them: nothing of a
                # cancelled job is written after this.
                self.store.delete_progress(i)
                _, cancelled_at, how = self.cancelled.pop(i, (0.0, 0, "request"))
                self.stopped.append(
                    {
                        "id": i,
                        "how": how,
                        "cancelled_at_step": cancelled_at,
                        "stopped_at_step": dropped_at.get(i, 0),
                    }
                )
        out["denoised_by"] = np.array([self.replica] * batch_len(out), dtype=object)
        return out

    def get_stopped(self) -> list[dict[str, Any]]:
        """The last 1000 cancelled rows: id, how the cancellation came (`request`: Serve's
        cancellation of the call; `storage`: the job's record was deleted), the steps it had
        done when it came, and the step after which the row left its batch."""
        return list(self.stopped)


class DecoderDeployment(_BatchedStage):
    """Decodes, then encodes the MP4 (and a video job's thumbnail and spritesheet) here, so
    megabytes rather than raw frames travel onwards.

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
        files, suffixes, thumbnails, sheets = [], [], [], []
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
                thumbnails.append(b"")
                sheets.append(b"")
                continue
            frames = out["frames"][i]
            files.append(encode_video(frames, int(out["fps"][i])))
            suffixes.append(video_suffix(int(out["num_frames"][i])))
            # The Videos API's preview images; an image request needs none.
            preview = str(out["id"][i]).startswith("video_")
            thumbnails.append(thumbnail(frames) if preview else b"")
            sheets.append(spritesheet(frames) if preview else b"")
        del out["frames"]
        out.pop("latents", None)
        out["error"] = np.array(errors, dtype=object)
        out["video"] = np.array(files, dtype=object)
        out["suffix"] = np.array(suffixes, dtype=object)
        out["thumbnail"] = np.array(thumbnails, dtype=object)
        out["spritesheet"] = np.array(sheets, dtype=object)
        return out
