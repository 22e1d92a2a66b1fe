"""The decode stage: latents -> uint8 frames."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from kinoray.models.stages.base import Batch, ModelStage


class Decoder(ModelStage):
    """`latents` -> `frames`, uint8 (T, H, W, 3) per row (T is 1 for image models)."""

    name = "decode"

    def input_columns(self) -> dict[str, str]:
        return {"latents": "denoised latents from the denoise stage"}

    def output_columns(self) -> dict[str, str]:
        return {"frames": "uint8 frames (T, H, W, 3)"}

    def consumed_columns(self) -> tuple[str, ...]:
        return ("latents",)

    def group_key(self, batch: Batch, i: int) -> Hashable:
        return np.asarray(batch["latents"][i]).shape

    def compute(self, batch: Batch, rows: list[int], key: Hashable, **kwargs: Any) -> dict[str, list[Any]]:
        frames = self.adapter.decode(np.stack([batch["latents"][i] for i in rows]))
        return {"frames": list(frames)}
