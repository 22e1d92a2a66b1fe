"""The three stages one after another in this process: `kinoray generate`, and the reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.config import KinorayConfig
from models.request import GenerationRequest, build_request
from models.stages import Batch, Decoder, Denoiser, TextEncoder, requests_to_batch


class LocalPipeline:
    def __init__(self, config: KinorayConfig | None = None):
        self.config = config or KinorayConfig()
        self.defaults = self.config.request_defaults()
        self.limits = self.config.request_limits()
        spec = self.config.model
        self.encoder = TextEncoder(spec)
        self.denoiser = Denoiser(spec, max_batch_size=self.config.denoiser.batch_size)
        self.decoder = Decoder(spec, max_batch_size=self.config.decoder.batch_size)

    def request(self, **fields: Any) -> GenerationRequest:
        return build_request(fields, self.defaults, self.limits)

    def run(self, requests: Sequence[GenerationRequest]) -> Batch:
        """Generate `requests`; the result has `frames` and `error` per row, in order."""
        return self.decoder(self.denoiser(self.encoder(requests_to_batch(requests))))
