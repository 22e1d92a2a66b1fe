"""LTX-Video text-to-video (`LTXPipeline`): T5 text encoder with attention masks, DiT on packed
latents, a VAE that decodes with timestep conditioning in later checkpoints."""

from __future__ import annotations

import math
from typing import Any

from models.families.base import FamilyAdapter
from models.request import RequestDefaults, RequestLimits
from models.spec import ModelSpec


class LTXAdapter(FamilyAdapter):
    name = "ltx"
    pipeline_class = "LTXPipeline"
    default_max_sequence_length = 128
    conditioning = ("prompt_embeds", "prompt_attention_mask")
    # LTXPipeline's own defaults.
    defaults = RequestDefaults(
        height=512, width=704, num_frames=161, fps=25, num_inference_steps=50, guidance_scale=3.0
    )

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        scaling = sum(vae.get("spatio_temporal_scaling", (True, True, True, False)))
        spatial = vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * 2**scaling
        temporal = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * 2**scaling
        return int(spatial), int(temporal)

    @classmethod
    def request_limits(cls, spec: ModelSpec) -> RequestLimits:
        # LTXPipeline.check_inputs takes only multiples of 32, whatever the VAE would allow.
        limits = super().request_limits(spec)
        return limits.model_copy(update={"size_multiple": math.lcm(32, limits.size_multiple)})

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer").get("patch_size", 1))

    def _load(self, stage: Any) -> Any:
        pipe = super()._load(stage)
        if stage != "decode":  # LTXPipeline names its VAE factors differently from Wan's
            spatial, temporal = self.vae_factors(self.spec)
            pipe.vae_spatial_compression_ratio = spatial
            pipe.vae_temporal_compression_ratio = temporal
        return pipe

    def _encode_prompt(self, texts: list[str]) -> tuple[Any, ...]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=self.pipe._execution_device,
        )
        return embeds, mask

    def _shape_args(self, height: int, width: int, num_frames: int, fps: int) -> dict[str, Any]:
        # LTX scales its rotary position embedding by the frame rate.
        return {**super()._shape_args(height, width, num_frames, fps), "frame_rate": fps}

    def _latents_out(self, latents: Any, height: int, width: int, num_frames: int) -> Any:
        # The latent output is packed into tokens: unpack it to (B, C, F, H, W) as __call__ does.
        pipe = self.pipe
        return pipe._unpack_latents(
            latents,
            (num_frames - 1) // pipe.vae_temporal_compression_ratio + 1,
            height // pipe.vae_spatial_compression_ratio,
            width // pipe.vae_spatial_compression_ratio,
            pipe.transformer_spatial_patch_size,
            pipe.transformer_temporal_patch_size,
        )

    def _vae_decode(self, latents: Any) -> Any:
        import torch

        vae = self.pipe.vae
        latents = self.pipe._denormalize_latents(
            latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        )
        # The pipeline's default decode_timestep (0.0) with noise scale 0: the noise term vanishes.
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
        return vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
