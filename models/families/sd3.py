"""Stable Diffusion 3 text-to-image (`StableDiffusion3Pipeline`): two CLIPs + T5, an MM-DiT.
Decode yields one frame, written as PNG."""

from __future__ import annotations

from typing import Any

from models.families.flux import FluxAdapter
from models.request import RequestDefaults
from models.spec import ModelSpec


class SD3Adapter(FluxAdapter):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256
    caches = frozenset()  # SD3's transformer has no cache hooks in diffusers 0.42
    # The SD3 medium model card's settings.
    defaults = RequestDefaults(
        height=1024, width=1024, num_frames=1, fps=1, num_inference_steps=28, guidance_scale=7.0
    )

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer").get("patch_size", 2))

    def _encode_prompt(self, texts: list[str]) -> tuple[Any, ...]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def _latents_out(self, latents: Any, height: int, width: int, num_frames: int) -> Any:
        return latents  # SD3's latents are not packed
