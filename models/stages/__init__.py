"""The stage skeleton and the model graph's three stages: encode -> denoise -> decode."""

from __future__ import annotations

from collections.abc import Sequence

from kinoray.models.request import GenerationRequest
from kinoray.models.stages.base import (
    ERROR_COLUMNS,
    RESUME_COLUMN,
    STAGE_ORDER,
    Batch,
    ModelStage,
    RowError,
    Stage,
    batch_len,
    batch_to_rows,
    column,
    rows_to_batch,
    scalar,
)
from kinoray.models.stages.decoder import Decoder
from kinoray.models.stages.denoiser import Denoiser, ProgressCallback, sampling_of
from kinoray.models.stages.text_encoder import TextEncoder


def requests_to_batch(requests: Sequence[GenerationRequest]) -> Batch:
    """Requests -> a batch of their flat columns (`REQUEST_COLUMNS`), no row failed yet."""
    return rows_to_batch([r.row() for r in requests])


__all__ = [
    "ERROR_COLUMNS",
    "RESUME_COLUMN",
    "STAGE_ORDER",
    "Batch",
    "Decoder",
    "Denoiser",
    "ModelStage",
    "ProgressCallback",
    "RowError",
    "Stage",
    "TextEncoder",
    "batch_len",
    "batch_to_rows",
    "column",
    "requests_to_batch",
    "rows_to_batch",
    "sampling_of",
    "scalar",
]
