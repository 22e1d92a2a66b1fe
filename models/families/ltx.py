"""LTX-Video text-to-video (`LTXPipeline`) and image-to-video (`LTXImageToVideoPipeline`, on the
same checkpoints): T5 text encoder with attention masks, DiT on packed latents, a VAE that
decodes with timestep conditioning in later checkpoints."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from kinoray.models import tiny
from kinoray.models.families.base import FamilyAdapter
from kinoray.models.request import SamplingParams
from kinoray.models.spec import ModelSpec


class LTXAdapter(FamilyAdapter):
    name = "ltx"
    pipeline_class = "LTXPipeline"
    decode_memory_factor = 6.2  # measured on the tiny preset: kinoray bench --decode-memory
    default_max_sequence_length = 128
    conditioning = ("prompt_embeds", "prompt_attention_mask")
    # LTXPipeline's own defaults.
    defaults = {
        "height": 512,
        "width": 704,
        "num_frames": 161,
        "fps": 25,
        "num_inference_steps": 50,
        "guidance_scale": 3.0,
    }

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        scaling = sum(vae.get("spatio_temporal_scaling", (True, True, True, False)))
        spatial = vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * 2**scaling
        temporal = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * 2**scaling
        return int(spatial), int(temporal)

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer").get("patch_size", 1))

    @classmethod
    def size_multiple(cls, spec: ModelSpec, spatial: int) -> int:
        # LTXPipeline.check_inputs takes only multiples of 32, whatever the VAE would allow.
        return math.lcm(32, super().size_multiple(spec, spatial))

    @classmethod
    def pipeline_args(cls, sampling: SamplingParams) -> dict[str, Any]:
        # LTX scales its rotary position embedding by the frame rate.
        return {**super().pipeline_args(sampling), "frame_rate": sampling.fps}

    def _set_vae_factors(self, pipe: Any) -> None:
        super()._set_vae_factors(pipe)
        # LTXPipeline names its VAE factors differently from Wan's.
        info = self.spec.info
        pipe.vae_spatial_compression_ratio = info.vae_scale_factor_spatial
        pipe.vae_temporal_compression_ratio = info.vae_scale_factor_temporal

    # -- reference images: every LTX-Video checkpoint takes one, optionally, through
    # `LTXImageToVideoPipeline`. Its `prepare_latents` samples the image's VAE posterior and then
    # draws the noise from the same generator, mixing them by a first-frame mask: the encode stage
    # runs it with the row's seed and hands the denoiser the packed result, `initial_latents`
    # (tokens, channels), which the pipeline takes as `latents=` without touching the image.

    image_pipeline_class = "LTXImageToVideoPipeline"

    @classmethod
    def image_input(cls, spec: ModelSpec) -> Any:
        return "optional"

    @classmethod
    def image_components_of(cls, spec: ModelSpec) -> frozenset[str]:
        return frozenset({"vae"})

    @classmethod
    def image_conditioning_names(cls, spec: ModelSpec) -> tuple[str, ...]:
        return ("initial_latents",)

    def _make_image_pipe(self) -> Any:
        pipe = super()._make_image_pipe()
        # Without its transformer (the encode stage) the pipeline assumes patches of 1.
        config = self.spec.read_config("config.json", "transformer")
        pipe.transformer_spatial_patch_size = config.get("patch_size", 1)
        pipe.transformer_temporal_patch_size = config.get("patch_size_t", 1)
        return pipe

    def encode_image(self, image: Any, sampling: SamplingParams, seed: int, prompt: str) -> dict[str, Any]:
        import torch

        pipe, s = self.image_pipe, sampling
        device = pipe._execution_device
        channels = self.spec.read_config("config.json", "transformer")["in_channels"]
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.inference_mode():
            pixels = pipe.video_processor.preprocess(image, height=s.height, width=s.width)
            pixels = pixels.to(device, self.spec.torch_dtype())
            latents, _ = pipe.prepare_latents(
                pixels, 1, channels, s.height, s.width, s.num_frames, torch.float32, device, [generator]
            )
        return {"initial_latents": latents[0].float().cpu().numpy()}

    @contextlib.contextmanager
    def _image_call(
        self, image: dict[str, Any], sampling: SamplingParams, generators: list[Any]
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        if not image:
            yield self.pipe, {}
            return
        yield self.image_pipe, {"image": None, "latents": image["initial_latents"]}

    def _encode_prompt(self, texts: list[str]) -> tuple[Any, ...]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=self.pipe._execution_device,
        )
        return embeds, mask

    def _latents_out(self, latents: Any, sampling: SamplingParams) -> Any:
        # The latent output is packed into tokens: unpack it to (B, C, F, H, W) as __call__ does.
        pipe = self.pipe
        return pipe._unpack_latents(
            latents,
            (sampling.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1,
            sampling.height // pipe.vae_spatial_compression_ratio,
            sampling.width // pipe.vae_spatial_compression_ratio,
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


@tiny.preset("tiny-ltx", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS, image="optional")
def tiny_ltx() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(tiny.t5_config("t5", 32, 2))
    torch.manual_seed(1)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    torch.manual_seed(2)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    return LTXPipeline(
        tokenizer=tiny.byte_tokenizer(128),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
