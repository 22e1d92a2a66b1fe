"""The denoise stage: embeddings + seeds -> latents, one diffusers call per group of equal sampling."""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping
from typing import Any, NamedTuple

import numpy as np

from kinoray.models import telemetry
from kinoray.models.loras import LoraCache, LoraError, check_catalog
from kinoray.models.request import SAMPLING_FIELDS, LoraRef, SamplingParams
from kinoray.models.stages.base import Batch, ModelStage, RowError, loras_of, reference_image

# (ids of the rows the step computed, steps done, total steps)
ProgressCallback = Callable[[list[str], int, int], None]
# -> ids of rows whose compute should stop (asked between steps)
CancelledIds = Callable[[], Collection[str]]


def sampling_of(batch: Batch, i: int) -> SamplingParams:
    """Row `i`'s sampling parameters (validated upstream), as the denoiser's grouping key."""
    return SamplingParams.from_row({name: batch[name][i] for name in SAMPLING_FIELDS})


class DenoiseGroup(NamedTuple):
    """What rows must share to be denoised in one call."""

    sampling: SamplingParams
    with_image: bool  # rows with a reference image apart from rows without
    lora: tuple[LoraRef, ...]  # one adapter set, at one set of scales


class Denoiser(ModelStage):
    """Conditioning + `seed` + sampling parameters (+ `lora`) -> `latents` (float32, what the
    VAE decodes).

    Rows of one `DenoiseGroup` are denoised together, up to `max_batch_size` per call; each
    row's noise comes from its own seed, so a row's result does not depend on its batch.
    `loras` is the deployment's adapter catalog (name -> `LoraSource` or its dict); the last
    `max_loras` adapters used stay loaded (`LoraCache`). A compiled transformer (`compile` in
    the model spec) takes adapters by hot swap, padded to `max_lora_rank`.
    """

    name = "denoise"

    def __init__(
        self,
        model: Any = None,
        *,
        adapter: Any = None,
        max_batch_size: int | None = None,
        loras: Mapping[str, Any] | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 64,
    ):
        super().__init__(model, adapter=adapter, max_batch_size=max_batch_size)
        self.batch_sizes: list[int] = []
        catalog = check_catalog(loras or {})
        hotswap = bool(catalog) and bool(getattr(getattr(self.adapter, "spec", None), "compile", False))
        if hotswap:
            self.adapter.enable_lora_hotswap(max_lora_rank)
        self.loras = LoraCache(self.adapter, catalog, max_loras, hotswap=hotswap)

    def conditioning_columns(self) -> list[str]:
        names = list(self.adapter.conditioning)
        return [*names, *(f"negative_{n}" for n in names), *self.adapter.image_conditioning]

    def input_columns(self) -> dict[str, str]:
        cols = {"id": "row id (progress reports)", "seed": "seed of the initial noise"}
        cols.update({f: "sampling parameter" for f in SAMPLING_FIELDS})
        cols.update({c: "conditioning from the encode stage" for c in self.conditioning_columns()})
        return cols

    def output_columns(self) -> dict[str, str]:
        return {"latents": "denoised latents of one row, float32, in the VAE's latent layout"}

    def consumed_columns(self) -> tuple[str, ...]:
        return tuple(self.conditioning_columns())

    def group_key(self, batch: Batch, i: int) -> Hashable:
        with_image = bool(self.adapter.image_conditioning) and reference_image(batch, i) is not None
        return DenoiseGroup(sampling_of(batch, i), with_image, loras_of(batch, i))

    def output_dtypes(self) -> dict[str, np.dtype]:
        return {"latents": np.dtype(np.float32)}

    def compute(
        self,
        batch: Batch,
        rows: list[int],
        key: Hashable,
        on_step: ProgressCallback | None = None,
        cancelled: CancelledIds | None = None,
        **kwargs: Any,
    ) -> dict[str, list[Any]]:
        """Denoise one group. Rows named by `cancelled` stop at the next step (see
        `FamilyAdapter.denoise`) and come out as `RowError("cancelled")`."""
        assert isinstance(key, DenoiseGroup)
        sampling, with_image, lora = key
        ids = [str(batch["id"][i]) for i in rows]
        stopped: set[str] = set()

        def cancelled_rows() -> list[int]:
            gone = set(cancelled()) if cancelled is not None else set()
            stopped.update(i for i in ids if i in gone)
            return [k for k, i in enumerate(ids) if i in stopped]

        def step(done: int, total: int, computed: int) -> None:
            # Counted as steps happen, so the counter shows where a cancelled row stopped.
            telemetry.inc("kinoray_denoise_steps_total", computed)
            if on_step is not None:
                # The rows this step computed: those not dropped at an earlier step.
                in_step = [i for i in ids if i not in stopped] if self.adapter.drops_rows else ids
                on_step(in_step, done, total)

        columns = [
            c for c in self.conditioning_columns() if with_image or c not in self.adapter.image_conditioning
        ]
        conditioning = {c: np.stack([batch[c][i] for i in rows]) for c in columns}
        seeds = [int(batch["seed"][i]) for i in rows]
        try:
            with self.loras.applied(lora):
                latents = self.adapter.denoise(
                    conditioning,
                    seeds,
                    sampling,
                    on_step=step,
                    cancelled=cancelled_rows if cancelled else None,
                )
        except LoraError as exc:
            raise RowError("lora_unavailable", str(exc)) from None
        self.batch_sizes.append(len(rows))
        return {
            "latents": [
                RowError("cancelled", f"row {i} was cancelled") if i in stopped else latent
                for i, latent in zip(ids, latents)
            ]
        }
