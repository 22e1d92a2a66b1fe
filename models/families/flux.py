"""FLUX.1 text-to-image (`FluxPipeline`): CLIP + T5 text encoders, an MM-DiT on packed latents.
Decode yields one frame, written as PNG."""

from __future__ import annotations

from typing import Any

from kinoray.models import tiny
from kinoray.models.families.base import FamilyAdapter, StageName
from kinoray.models.request import SamplingParams
from kinoray.models.spec import ModelSpec


class FluxAdapter(FamilyAdapter):
    name = "flux"
    pipeline_class = "FluxPipeline"
    decode_memory_factor = 7.7  # measured on the tiny preset: kinoray bench --decode-memory
    default_max_sequence_length = 512
    caches = frozenset({"first_block", "faster"})
    conditioning = ("prompt_embeds", "pooled_prompt_embeds")
    is_image_model = True
    # FLUX.1-dev's model card: guidance is distilled into the model (no negative pass).
    defaults = {
        "height": 1024,
        "width": 1024,
        "num_frames": 1,
        "fps": 1,
        "num_inference_steps": 50,
        "guidance_scale": 3.5,
    }

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        return 2 ** (len(vae["block_out_channels"]) - 1), 1

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return 2  # latents are packed in 2x2 patches

    def _load(self, stage: StageName) -> Any:
        pipe = super()._load(stage)
        if stage != "decode":
            pipe.vae_scale_factor = self.spec.info.vae_scale_factor_spatial
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

    def _latents_out(self, latents: Any, sampling: SamplingParams) -> Any:
        return self.pipe._unpack_latents(latents, sampling.height, sampling.width, self.pipe.vae_scale_factor)

    def _vae_decode(self, latents: Any) -> Any:
        cfg = self.pipe.vae.config
        return self.pipe.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]


@tiny.preset("tiny-flux", tiny.IMAGE_DEFAULTS, tiny.IMAGE_LIMITS)
def tiny_flux() -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(tiny.clip_config(32))
    torch.manual_seed(1)
    t5 = T5EncoderModel(tiny.t5_config("t5", 32, 2))
    torch.manual_seed(2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    torch.manual_seed(3)
    vae = tiny.image_vae()
    return FluxPipeline(
        tokenizer=tiny.byte_tokenizer(77),
        text_encoder=clip,
        tokenizer_2=tiny.byte_tokenizer(512),
        text_encoder_2=t5,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
