"""The decode stage: latents -> uint8 frames, within a memory budget, never losing the latents."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from kinoray.models import telemetry
from kinoray.models.decode_plan import FaultInjection, order, plans
from kinoray.models.stages.base import Batch, ModelStage, RowError


class Decoder(ModelStage):
    """`latents` -> `frames`, uint8 (T, H, W, 3) per row (T is 1 for image models).

    A group of rows is decoded with the fastest plan whose estimated peak memory fits
    `memory_budget_gb` (or the device's free memory on CUDA): the whole group, smaller pieces,
    tiles, smaller tiles. An out-of-memory error moves on to the next plan; when every plan
    fails, the rows fail with reason `out_of_memory` and keep their `latents`, so that they can
    be saved and decoded later without denoising again. `plan` forces a kind of plan.
    """

    name = "decode"

    def __init__(
        self,
        model: Any = None,
        *,
        adapter: Any = None,
        max_batch_size: int | None = None,
        memory_budget_gb: float | None = None,
        plan: str = "auto",
        tile_size: int | None = None,
        testing_oom: str | None = None,
    ):
        super().__init__(model, adapter=adapter, max_batch_size=max_batch_size)
        self.budget = int(memory_budget_gb * 2**30) if memory_budget_gb else None
        self.plan = plan
        self.tile_size = tile_size
        self.faults = FaultInjection(testing_oom)
        self.plans_used: list[str] = []

    def input_columns(self) -> dict[str, str]:
        return {"id": "row id", "latents": "denoised latents from the denoise stage"}

    def output_columns(self) -> dict[str, str]:
        return {"frames": "uint8 frames (T, H, W, 3)"}

    def output_dtypes(self) -> dict[str, np.dtype]:
        return {"frames": np.dtype(np.uint8)}

    def consumed_columns(self) -> tuple[str, ...]:
        return ("latents",)

    def kept_on_failure(self) -> tuple[str, ...]:
        return ("latents",)

    def group_key(self, batch: Batch, i: int) -> Hashable:
        return np.asarray(batch["latents"][i]).shape

    def compute(self, batch: Batch, rows: list[int], key: Hashable, **kwargs: Any) -> dict[str, list[Any]]:
        latents = np.stack([batch["latents"][i] for i in rows])
        ids = [str(batch["id"][i]) for i in rows]
        prompts = [str(batch["prompt"][i]) for i in rows] if "prompt" in batch else []
        candidates = plans(len(rows), self.plan)
        estimates = {
            p: self.adapter.decode_peak_bytes(p, latents.shape[1:], self.tile_size) for p in candidates
        }
        frames: list[Any] = [None] * len(rows)
        failure: BaseException | None = None
        for plan in order(candidates, estimates, self._budget()):
            pending = [k for k, f in enumerate(frames) if f is None]
            if not pending:
                break
            # Pieces that run out of memory stay pending for the next, leaner plan.
            for start in range(0, len(pending), plan.rows):
                piece = pending[start : start + plan.rows]
                try:
                    self.faults.check([ids[k] for k in piece], [prompts[k] for k in piece if prompts])
                    out = self.adapter.decode(latents[piece], plan.tile_scale, self.tile_size)
                except Exception as exc:
                    if not self.adapter.is_out_of_memory(exc):
                        raise
                    failure = exc
                    telemetry.inc("kinoray_decode_oom_retries_total")
                    self.adapter.free_memory()
                    continue
                for k, f in zip(piece, out):
                    frames[k] = f
                self.plans_used.append(plan.name)
                telemetry.inc("kinoray_decode_plans_total", plan=plan.name)
        message = f"decode ran out of memory with every plan ({failure}); the denoised latents are kept"
        return {"frames": [RowError("out_of_memory", message) if f is None else f for f in frames]}

    def _budget(self) -> int | None:
        free = self.adapter.available_bytes()
        if free is None or self.budget is None:
            return self.budget if free is None else free
        return min(free, self.budget)
