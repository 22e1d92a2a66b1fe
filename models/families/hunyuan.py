"""HunyuanVideo text-to-video (`HunyuanVideoPipeline`): a Llama text encoder with attention mask
plus CLIP's pooled embedding, a dual/single-stream DiT with distilled guidance, a 3D VAE."""

from __future__ import annotations

from typing import Any

from kinoray.models import tiny
from kinoray.models.families.base import FamilyAdapter
from kinoray.models.spec import ModelSpec


class HunyuanVideoAdapter(FamilyAdapter):
    name = "hunyuan"
    pipeline_class = "HunyuanVideoPipeline"
    decode_memory_factor = 14.4  # measured on the tiny preset: kinoray bench --decode-memory
    default_max_sequence_length = 256
    caches = frozenset({"first_block"})
    conditioning = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")
    # The HunyuanVideo model card's 720p settings; guidance is distilled into the transformer.
    defaults = {
        "height": 720,
        "width": 1280,
        "num_frames": 129,
        "fps": 24,
        "num_inference_steps": 50,
        "guidance_scale": 6.0,
    }

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


@tiny.preset("tiny-hunyuan", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS)
def tiny_hunyuan() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=3 + 256,
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            hidden_act="gelu",
        )
    )
    torch.manual_seed(1)
    clip = CLIPTextModel(tiny.clip_config(8))
    torch.manual_seed(2)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(3)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    return HunyuanVideoPipeline(
        tokenizer=tiny.byte_tokenizer(1024),
        text_encoder=llama,
        tokenizer_2=tiny.byte_tokenizer(77),
        text_encoder_2=clip,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
