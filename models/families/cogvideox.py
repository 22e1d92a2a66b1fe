"""CogVideoX text-to-video (`CogVideoXPipeline`): T5 text encoder, expert DiT, 3D causal VAE."""

from __future__ import annotations

from typing import Any

from models.families.base import FamilyAdapter
from models.request import RequestDefaults
from models.spec import ModelSpec


class CogVideoXAdapter(FamilyAdapter):
    name = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    default_max_sequence_length = 226
    caches = frozenset({"faster"})
    # The CogVideoX-5b model card's settings.
    defaults = RequestDefaults(
        height=480, width=720, num_frames=49, fps=8, num_inference_steps=50, guidance_scale=6.0
    )

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        return 2 ** (len(vae["block_out_channels"]) - 1), int(vae.get("temporal_compression_ratio", 4))

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer")["patch_size"])

    @classmethod
    def frame_step(cls, spec: ModelSpec, temporal: int) -> int:
        # The VAE decodes latent frames in pairs after the first (8N + 1 frames for CogVideoX 1.0),
        # and CogVideoX 1.5 pads latents to its temporal patch size (16N + 1).
        p_t = spec.read_config("config.json", "transformer").get("patch_size_t") or 1
        return temporal * 2 * p_t

    def _latents_out(self, latents: Any, height: int, width: int, num_frames: int) -> Any:
        # CogVideoX 1.5 pads latent frames to a multiple of patch_size_t; the pipeline drops the
        # padding only on its decode path, so the latent output must drop it here.
        p_t = self.pipe.transformer.config.patch_size_t
        latent_frames = (num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        if p_t is not None and latent_frames % p_t:
            latents = latents[:, p_t - latent_frames % p_t :]
        return latents

    def _vae_decode(self, latents: Any) -> Any:
        return self.pipe.decode_latents(latents)
