"""CogVideoX text-to-video (`CogVideoXPipeline`): T5 text encoder, expert DiT, 3D causal VAE."""

from __future__ import annotations

from typing import Any

from kinoray.models import tiny
from kinoray.models.families.base import FamilyAdapter
from kinoray.models.request import SamplingParams
from kinoray.models.spec import ModelSpec


class CogVideoXAdapter(FamilyAdapter):
    name = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    decode_memory_factor = 24.4  # measured on the tiny preset: kinoray bench --decode-memory
    default_max_sequence_length = 226
    caches = frozenset({"faster"})
    decode_chunk_frames = 8  # its VAE decodes two latent frames at a time
    # The CogVideoX-5b model card's settings.
    defaults = {
        "height": 480,
        "width": 720,
        "num_frames": 49,
        "fps": 8,
        "num_inference_steps": 50,
        "guidance_scale": 6.0,
    }

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

    def _latents_out(self, latents: Any, sampling: SamplingParams) -> Any:
        # CogVideoX 1.5 pads latent frames to a multiple of patch_size_t; the pipeline drops the
        # padding only on its decode path, so the latent output must drop it here.
        p_t = self.pipe.transformer.config.patch_size_t
        latent_frames = (sampling.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        if p_t is not None and latent_frames % p_t:
            latents = latents[:, p_t - latent_frames % p_t :]
        return latents

    def latent_frames_hw(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        return latent_shape[0], latent_shape[2], latent_shape[3]  # (F, C, h, w): frames first

    def latent_shape(self, frames: int, h: int, w: int) -> tuple[int, ...]:
        channels = int(self.spec.read_config("config.json", "vae")["latent_channels"])
        return (frames, channels, h, w)

    def _vae_decode(self, latents: Any) -> Any:
        return self.pipe.decode_latents(latents)


@tiny.preset("tiny-cogvideox", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS)
def tiny_cogvideox() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(tiny.t5_config("t5", 32, 2))
    torch.manual_seed(1)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
    )
    torch.manual_seed(2)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8,) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=tiny.byte_tokenizer(226),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"),
    )
