"""FLUX.1 text-to-image (`FluxPipeline`): CLIP + T5 text encoders, an MM-DiT on packed latents.
Decode yields one frame, written as PNG."""

from __future__ import annotations

from typing import Any

from models.families.base import FamilyAdapter
from models.request import RequestDefaults, RequestLimits
from models.spec import ModelSpec


class FluxAdapter(FamilyAdapter):
    name = "flux"
    pipeline_class = "FluxPipeline"
    default_max_sequence_length = 512
    caches = frozenset({"first_block", "faster"})
    conditioning = ("prompt_embeds", "pooled_prompt_embeds")
    is_image_model = True
    # FLUX.1-dev's model card: guidance is distilled into the model (no negative pass).
    defaults = RequestDefaults(
        height=1024, width=1024, num_frames=1, fps=1, num_inference_steps=50, guidance_scale=3.5
    )

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        return 2 ** (len(vae["block_out_channels"]) - 1), 1

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return 2  # latents are packed in 2x2 patches

    @classmethod
    def request_limits(cls, spec: ModelSpec) -> RequestLimits:
        return super().request_limits(spec).model_copy(update={"max_frames": 1, "frame_step": 1})

    def _load(self, stage: Any) -> Any:
        pipe = super()._load(stage)
        if stage != "decode":
            pipe.vae_scale_factor = self.vae_factors(self.spec)[0]
        return pipe

    def _encode_prompt(self, texts: list[str]) -> tuple[Any, ...]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def _shape_args(self, height: int, width: int, num_frames: int, fps: int) -> dict[str, Any]:
        return {"height": height, "width": width}

    def _latents_out(self, latents: Any, height: int, width: int, num_frames: int) -> Any:
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    def _vae_decode(self, latents: Any) -> Any:
        cfg = self.pipe.vae.config
        return self.pipe.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
