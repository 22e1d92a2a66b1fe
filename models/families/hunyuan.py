"""HunyuanVideo text-to-video (`HunyuanVideoPipeline`): a Llama text encoder with attention mask
plus CLIP's pooled embedding, a dual/single-stream DiT with distilled guidance, a 3D VAE."""

from __future__ import annotations

from typing import Any

from models.families.base import FamilyAdapter
from models.request import RequestDefaults
from models.spec import ModelSpec


class HunyuanVideoAdapter(FamilyAdapter):
    name = "hunyuan"
    pipeline_class = "HunyuanVideoPipeline"
    default_max_sequence_length = 256
    caches = frozenset({"first_block"})
    conditioning = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")
    # The HunyuanVideo model card's 720p settings; guidance is distilled into the transformer.
    defaults = RequestDefaults(
        height=720, width=1280, num_frames=129, fps=24, num_inference_steps=50, guidance_scale=6.0
    )

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        return int(vae.get("spatial_compression_ratio", 8)), int(vae.get("temporal_compression_ratio", 4))

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer").get("patch_size", 2))

    def _encode_prompt(self, texts: list[str]) -> tuple[Any, ...]:
        embeds, pooled, mask = self.pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            num_videos_per_prompt=1,
            device=self.pipe._execution_device,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled, mask

    def _vae_decode(self, latents: Any) -> Any:
        # HunyuanVideoPipeline.__call__'s decode path.
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
