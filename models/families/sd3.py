"""Stable Diffusion 3 text-to-image (`StableDiffusion3Pipeline`): two CLIPs + T5, an MM-DiT.
Decode yields one frame, written as PNG."""

from __future__ import annotations

from typing import Any

from kinoray.models import tiny
from kinoray.models.families.flux import FluxAdapter
from kinoray.models.request import SamplingParams
from kinoray.models.spec import ModelSpec


class SD3Adapter(FluxAdapter):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256
    caches = frozenset()  # SD3's transformer has no cache hooks in diffusers 0.42
    drops_rows = True  # its loop's per-row tensors are all callback inputs (Flux's guidance is not)
    # The SD3 medium model card's settings.
    defaults = {
        "height": 1024,
        "width": 1024,
        "num_frames": 1,
        "fps": 1,
        "num_inference_steps": 28,
        "guidance_scale": 7.0,
    }

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer").get("patch_size", 2))

    @classmethod
    def capacity(cls, spec: ModelSpec, spatial: int, temporal: int) -> dict[str, int]:
        # SD3's patch embedding crops a table of `pos_embed_max_size` positions per side.
        cfg = spec.read_config("config.json", "transformer")
        return {"max_size": int(cfg.get("pos_embed_max_size", 96)) * int(cfg.get("patch_size", 2)) * spatial}

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

    def _latents_out(self, latents: Any, sampling: SamplingParams) -> Any:
        return latents  # SD3's latents are not packed


@tiny.preset("tiny-sd3", tiny.IMAGE_DEFAULTS, tiny.IMAGE_LIMITS)
def tiny_sd3() -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_config = tiny.clip_config(32)
    torch.manual_seed(0)
    clip_l = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(1)
    clip_g = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(2)
    t5 = T5EncoderModel(tiny.t5_config("t5", 64, 2))  # as wide as both CLIPs side by side
    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(4)
    vae = tiny.image_vae()
    return StableDiffusion3Pipeline(
        tokenizer=tiny.byte_tokenizer(77),
        text_encoder=clip_l,
        tokenizer_2=tiny.byte_tokenizer(77),
        text_encoder_2=clip_g,
        tokenizer_3=tiny.byte_tokenizer(256),
        text_encoder_3=t5,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
