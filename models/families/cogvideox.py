"""CogVideoX text-to-video (`CogVideoXPipeline`) and image-to-video
(`CogVideoXImageToVideoPipeline`): T5 text encoder, expert DiT, 3D causal VAE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
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


class CogVideoXI2VAdapter(CogVideoXAdapter):
    """CogVideoX I2V: the reference image's VAE latents are concatenated to the noise on the
    channel axis (the transformer takes twice the latent channels).

    Its VAE samples the posterior with the row's generator before the noise is drawn from the
    same generator, so the encode stage hands the denoiser `image_latents` (F, C, h, w) and the
    generator's state after sampling (`generator_state`, torch's uint8 state): the denoiser draws
    its noise from where the pipeline would.
    """

    name = "cogvideox-i2v"
    pipeline_class = "CogVideoXImageToVideoPipeline"
    image_components = frozenset({"vae"})
    image_dtypes = {"generator_state": "uint8"}

    @classmethod
    def image_conditioning_names(cls, spec: ModelSpec) -> tuple[str, ...]:
        return ("image_latents", "generator_state")

    def _load(self, stage: Any) -> Any:
        pipe = super()._load(stage)
        if stage == "encode":
            # `prepare_latents` reads the transformer's config and the scheduler's initial sigma.
            pipe.transformer = self._config_stub("transformer")
            pipe.scheduler = SimpleNamespace(init_noise_sigma=1.0)
        return pipe

    def encode_image(self, image: Any, sampling: SamplingParams, seed: int, prompt: str) -> dict[str, Any]:
        import torch

        pipe, s = self.pipe, sampling
        device, dtype = pipe._execution_device, self.spec.torch_dtype()
        config = pipe.transformer.config
        generator = torch.Generator("cpu").manual_seed(seed)
        # As `__call__` does: CogVideoX 1.5 pads latent frames to its temporal patch size.
        num_frames, p_t = s.num_frames, config.patch_size_t
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        if p_t is not None and latent_frames % p_t:
            num_frames += (p_t - latent_frames % p_t) * pipe.vae_scale_factor_temporal
        with torch.inference_mode():
            pixels = pipe.video_processor.preprocess(image, height=s.height, width=s.width).to(device, dtype)
            # Given latents, `prepare_latents` draws no noise: only its VAE half runs.
            _, image_latents = pipe.prepare_latents(
                pixels, 1, config.in_channels // 2, num_frames, s.height, s.width, dtype, device,
                [generator], torch.zeros(()),
            )  # fmt: skip
        return {
            "image_latents": image_latents[0].float().cpu().numpy(),
            "generator_state": generator.get_state().numpy(),
        }

    @contextlib.contextmanager
    def _image_call(
        self, image: dict[str, Any], sampling: SamplingParams, generators: list[Any]
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        import PIL.Image
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        image_latents, states = image["image_latents"], image["generator_state"].cpu()

        def prepare_latents(
            image: Any,
            batch_size: int = 1,
            num_channels_latents: int = 16,
            num_frames: int = 13,
            height: int = 60,
            width: int = 90,
            dtype: Any = None,
            device: Any = None,
            generator: Any = None,
            latents: Any = None,
        ) -> tuple[Any, Any]:
            # CogVideoXImageToVideoPipeline.prepare_latents's noise, drawn after the sampling.
            for g, state in zip(generator, states):
                g.set_state(state.clone())  # a row view of the batch would not do: a copy of its own
            if latents is None:
                latents = randn_tensor(
                    tuple(image_latents.shape), generator=generator, device=device, dtype=dtype
                )
            latents = latents.to(device) * pipe.scheduler.init_noise_sigma
            return latents, image_latents.to(device=device, dtype=dtype)

        pipe.prepare_latents = prepare_latents
        try:
            yield pipe, {"image": PIL.Image.new("RGB", (sampling.width, sampling.height))}
        finally:
            pipe.__dict__.pop("prepare_latents", None)


@tiny.preset("tiny-cogvideox-i2v", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS, image="required")
def tiny_cogvideox_i2v() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(tiny.t5_config("t5", 32, 2))
    torch.manual_seed(1)
    # CogVideoX-5b-I2V's layout: rotary positions, noise and image latents on the channel axis.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # rotary splits it into time, height and width parts: each even
        in_channels=8,
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
        use_rotary_positional_embeddings=True,
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
    # The 5b checkpoints' scheduler; it draws noise from the generators at every step.
    return CogVideoXImageToVideoPipeline(
        tokenizer=tiny.byte_tokenizer(226),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=CogVideoXDPMScheduler(timestep_spacing="trailing"),
    )


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
