"""The three stages one after another in this process: `kinoray generate`, and the reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kinoray.models.config import KinorayConfig
from kinoray.models.request import GenerationRequest, RequestBuilder
from kinoray.models.stages import Batch, Decoder, Denoiser, TextEncoder, requests_to_batch


class LocalPipeline:
    """encode -> denoise -> decode in one process, with the config's batch sizes.

    Loads all three stages' components of `config.model` at construction.
    """

    def __init__(self, config: KinorayConfig | None = None, builder: RequestBuilder | None = None):
        self.config = config or KinorayConfig()
        self.builder = builder or self.config.request_builder()
        spec = self.config.model
        self.encoder = TextEncoder(spec, **self.config.encode_options())
        self.denoiser = Denoiser(spec, **self.config.denoise_options())
        self.decoder = Decoder(spec, **self.config.decoder.decode_options())

    def request(self, **fields: Any) -> GenerationRequest:
        """A validated request from flat fields; raises `RequestError` naming a bad field."""
        return self.builder.build(fields)

    def run(self, requests: Sequence[GenerationRequest]) -> Batch:
        """Generate `requests`; the result has `frames` and `error` per row, in order."""
        return self.decoder(self.denoiser(self.encoder(requests_to_batch(requests))))
