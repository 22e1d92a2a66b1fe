"""Wan 2.1 text-to-video (`WanPipeline`): UMT5 text encoder, flow-matching DiT, causal 3D VAE."""

from __future__ import annotations

from typing import Any

from models.families.base import FamilyAdapter
from models.request import RequestDefaults
from models.spec import ModelSpec


class WanAdapter(FamilyAdapter):
    name = "wan"
    pipeline_class = "WanPipeline"
    default_max_sequence_length = 512
    caches = frozenset({"first_block"})
    # The Wan 2.1 T2V model card's settings for 480p.
    defaults = RequestDefaults(
        height=480, width=832, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.0
    )

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        return int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4))

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer")["patch_size"][1])

    def _vae_decode(self, latents: Any) -> Any:
        # WanPipeline.__call__'s own un-normalisation of latents before `vae.decode`.
        import torch

        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        latents = latents / inv_std + mean
        return self.pipe.vae.decode(latents, return_dict=False)[0]
