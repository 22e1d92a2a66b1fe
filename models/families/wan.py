"""Wan 2.1 / 2.2 text-to-video (`WanPipeline`) and image-to-video (`WanImageToVideoPipeline`):
UMT5 text encoder, flow-matching DiT (two experts in Wan 2.2 A14B), causal 3D VAE; Wan 2.1 I2V
adds a CLIP image encoder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kinoray.models import tiny
from kinoray.models.families.base import FamilyAdapter
from kinoray.models.request import SamplingParams
from kinoray.models.spec import ModelSpec


class WanAdapter(FamilyAdapter):
    name = "wan"
    pipeline_class = "WanPipeline"
    decode_memory_factor = 46.7  # measured on the tiny preset: kinoray bench --decode-memory
    default_max_sequence_length = 512
    caches = frozenset({"first_block"})
    decode_chunk_frames = 4  # its causal VAE decodes one latent frame at a time
    drops_rows = True  # its loop's per-row tensors: latents and the two prompt embeddings
    image_pipeline_class = "WanImageToVideoPipeline"
    # The Wan 2.1 T2V model card's settings for 480p.
    defaults = {
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "fps": 16,
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
    }

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        vae = spec.read_config("config.json", "vae")
        return int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4))

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        return int(spec.read_config("config.json", "transformer")["patch_size"][1])

    @classmethod
    def capacity(cls, spec: ModelSpec, spatial: int, temporal: int) -> dict[str, int]:
        # WanRotaryPosEmbed holds `rope_max_seq_len` positions per axis (frames, height, width in
        # tokens): a longer axis fails inside the transformer, so it is a limit of the request.
        cfg = spec.read_config("config.json", "transformer")
        positions = int(cfg.get("rope_max_seq_len", 1024))
        p_t, p_h, _ = cfg["patch_size"]
        return {"max_size": positions * p_h * spatial, "max_frames": 1 + (positions * p_t - 1) * temporal}

    @classmethod
    def optional_params(cls, spec: ModelSpec) -> frozenset[str]:
        # Wan 2.2's two experts (a boundary between them) take a guidance scale each.
        two_experts = spec.model_index.get("boundary_ratio") is not None
        return frozenset({"guidance_scale_2"}) if two_experts else frozenset()

    @classmethod
    def pipeline_args(cls, sampling: SamplingParams) -> dict[str, Any]:
        args = super().pipeline_args(sampling)
        if sampling.guidance_scale_2 is not None:
            args["guidance_scale_2"] = sampling.guidance_scale_2
        return args

    # -- reference images: Wan 2.2 TI2V-5B (a `WanPipeline` with `expand_timesteps`) takes one
    # optionally; the image-to-video checkpoints (WanI2VAdapter) always. The encode stage turns it
    # into `condition`: for Wan 2.1 / 2.2 A14B a mask of the first latent frame and the VAE
    # latents of the image followed by blank frames, (4 + z, T, h, w); for TI2V the first frame's
    # latents (z, 1, h, w), which the denoiser keeps as they are. Wan 2.1 adds `image_embeds`:
    # CLIP's penultimate hidden states (tokens, width).

    @classmethod
    def image_input(cls, spec: ModelSpec) -> Any:
        return "optional" if spec.model_index.get("expand_timesteps") else "none"

    @classmethod
    def image_components_of(cls, spec: ModelSpec) -> frozenset[str]:
        return frozenset({"vae"}) if spec.model_index.get("expand_timesteps") else frozenset()

    @classmethod
    def image_conditioning_names(cls, spec: ModelSpec) -> tuple[str, ...]:
        return ("condition",) if spec.model_index.get("expand_timesteps") else ()

    def _make_image_pipe(self) -> Any:
        pipe = super()._make_image_pipe()
        if self.stage == "denoise":
            # `__call__` reads the VAE's config (z_dim) outside `prepare_latents`.
            pipe.vae = self._config_stub("vae", dtype=self.spec.torch_dtype())
        return pipe

    def encode_image(self, image: Any, sampling: SamplingParams, seed: int, prompt: str) -> dict[str, Any]:
        import torch

        pipe, s = self.image_pipe, sampling
        device = pipe._execution_device
        out = {}
        with torch.inference_mode():
            if "image_embeds" in self.image_conditioning:
                out["image_embeds"] = pipe.encode_image(image, device)[0]
            pixels = pipe.video_processor.preprocess(image, height=s.height, width=s.width)
            pixels = pixels.to(device, torch.float32)
            z = pipe.vae.config.z_dim
            frames = (s.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
            unit = pipe.vae_scale_factor_spatial
            # Given latents, `prepare_latents` draws no noise: only its VAE half runs (argmax of
            # the posterior: no generator is used).
            placeholder = torch.zeros(1, z, frames, s.height // unit, s.width // unit, device=device)
            condition = pipe.prepare_latents(
                pixels, 1, z, s.height, s.width, s.num_frames, torch.float32, device, None, placeholder
            )[1]
            out["condition"] = condition[0]
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    @contextlib.contextmanager
    def _image_call(
        self, image: dict[str, Any], sampling: SamplingParams, generators: list[Any]
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        import PIL.Image
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        if not image:
            yield self.pipe, {}
            return
        pipe = self.image_pipe
        condition, embeds = image["condition"], image.get("image_embeds")

        def prepare_latents(
            image: Any,
            batch_size: int,
            num_channels_latents: int = 16,
            height: int = 480,
            width: int = 832,
            num_frames: int = 81,
            dtype: Any = None,
            device: Any = None,
            generator: Any = None,
            latents: Any = None,
            last_image: Any = None,
        ) -> tuple[Any, ...]:
            # WanImageToVideoPipeline.prepare_latents's noise, with the encode stage's condition.
            frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
            unit = pipe.vae_scale_factor_spatial
            shape = (batch_size, num_channels_latents, frames, height // unit, width // unit)
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = latents.to(device=device, dtype=dtype)
            if not pipe.config.expand_timesteps:
                return latents, condition.to(device=device, dtype=dtype)
            # Wan 2.2 TI2V: `condition` is the first frame's latents, kept where the mask is 0.
            first_frame_mask = torch.ones(1, 1, *shape[2:], dtype=dtype, device=device)
            first_frame_mask[:, :, 0] = 0
            return latents, condition.to(device=device, dtype=dtype), first_frame_mask

        hooks = []
        pipe.prepare_latents = prepare_latents
        if embeds is not None:
            # `__call__` encodes one image per call and repeats it over the batch; each row has
            # its own, so they are handed to the transformer directly.
            pipe.encode_image = lambda image, device=None: embeds[:1].to(device)

            def per_row(module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
                rows = embeds.to(kwargs["hidden_states"].device, module.dtype)
                return args, {**kwargs, "encoder_hidden_states_image": rows}

            hooks.append(pipe.transformer.register_forward_pre_hook(per_row, with_kwargs=True))
        try:
            yield pipe, {"image": PIL.Image.new("RGB", (sampling.width, sampling.height))}
        finally:
            for hook in hooks:
                hook.remove()
            pipe.__dict__.pop("prepare_latents", None)
            pipe.__dict__.pop("encode_image", None)

    def _vae_decode(self, latents: Any) -> Any:
        # WanPipeline.__call__'s own un-normalisation of latents before `vae.decode`.
        import torch

        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        return self.pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0]


class WanI2VAdapter(WanAdapter):
    """Wan 2.1 I2V (CLIP image embeddings + VAE condition) and Wan 2.2 I2V-A14B (VAE condition,
    two experts): checkpoints saved as `WanImageToVideoPipeline`, which take an image always."""

    name = "wan-i2v"
    pipeline_class = "WanImageToVideoPipeline"
    image_components = frozenset({"image_encoder", "image_processor", "vae"})
    drops_rows = False  # the loop's `condition` is not a callback input: a row cannot leave

    @classmethod
    def image_input(cls, spec: ModelSpec) -> Any:
        return "required"

    @classmethod
    def image_components_of(cls, spec: ModelSpec) -> frozenset[str]:
        return cls.image_components

    @classmethod
    def image_conditioning_names(cls, spec: ModelSpec) -> tuple[str, ...]:
        clip = (spec.model_index.get("image_encoder") or [None])[0] is not None
        return ("condition", "image_embeds") if clip else ("condition",)


# -- tiny presets ----------------------------------------------------------------------------------


def tiny_wan(scale: int = 1, experts: int = 1, image: str | None = None) -> Any:
    """Wan's architecture at toy size; `image` "clip" lays it out as Wan 2.1 I2V (a CLIP image
    encoder, 36 input channels: noise, first-frame mask, image latents), "vae" as Wan 2.2
    I2V-A14B (36 input channels, no image encoder)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5EncoderModel

    # Larger presets grow the text encoder faster: it must cost tens of ms like the other stages.
    text_dim, text_layers = (32, 2) if scale == 1 else (64 * scale, 2 * scale)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(tiny.t5_config("umt5", text_dim, text_layers))
    transformers = []
    for expert in range(experts):
        torch.manual_seed(1 + 10 * expert)
        transformers.append(
            WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2 * scale,
                attention_head_dim=12 * scale,
                in_channels=16 if image is None else 36,
                out_channels=16,
                text_dim=text_dim,
                freq_dim=256,
                ffn_dim=32 * scale * scale,
                num_layers=2 * scale,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32,
                # Wan 2.1 I2V: CLIP tokens (width 8) reach every block's extra key/value projections.
                image_dim=8 if image == "clip" else None,
                added_kv_proj_dim=24 * scale if image == "clip" else None,
            )
        )
    torch.manual_seed(2)
    vae = AutoencoderKLWan(
        base_dim=3 * scale,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    # Wan 2.1's own scheduler setting (flow matching, shift 3.0 for 480p).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    # Wan 2.2 A14B: a high-noise expert until the boundary timestep, a low-noise one after it.
    two = {"transformer_2": transformers[1], "boundary_ratio": 0.875} if experts == 2 else {}
    if image is not None:
        return WanImageToVideoPipeline(
            tokenizer=tiny.byte_tokenizer(512),
            text_encoder=text_encoder,
            transformer=transformers[0],
            vae=vae,
            scheduler=scheduler,
            **(_tiny_clip() if image == "clip" else {}),
            **two,
        )
    return WanPipeline(
        tokenizer=tiny.byte_tokenizer(512),
        text_encoder=text_encoder,
        transformer=transformers[0],
        vae=vae,
        scheduler=scheduler,
        **two,
    )


def tiny_wan_ti2v() -> Any:
    """Wan 2.2 TI2V-5B's layout at toy size: saved as a `WanPipeline` with `expand_timesteps` (as
    its hub folder is), the 48-channel residual VAE that patchifies by 2 (16 pixels per latent
    cell), one transformer of 48 channels in and out."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(tiny.t5_config("umt5", 32, 2))
    torch.manual_seed(1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=48,
        out_channels=48,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(2)
    vae = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    )
    return WanPipeline(
        tokenizer=tiny.byte_tokenizer(512),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        # TI2V-5B's scheduler setting (flow matching, shift 5.0).
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
        ),
        expand_timesteps=True,
    )


def _tiny_clip() -> dict[str, Any]:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    config = CLIPVisionConfig(
        hidden_size=8,
        projection_dim=8,
        intermediate_size=16,
        num_hidden_layers=2,  # the pipeline takes the penultimate hidden states
        num_attention_heads=2,
        image_size=32,
        patch_size=8,  # 17 tokens (Wan 2.1's ViT-H/14 gives 257)
        hidden_act="gelu",
    )
    return {
        "image_encoder": CLIPVisionModelWithProjection(config),
        # Wan 2.1's: shortest edge 224, center crop, CLIP's mean and std; here 32 pixels.
        "image_processor": CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
    }


tiny.preset("tiny-wan", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS)(tiny_wan)
tiny.preset("tiny-wan-i2v", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS, image="required")(
    lambda: tiny_wan(image="clip")
)
# Tested with and without images in tests/test_image_to_video.py, not in the text-to-video matrix.
tiny.preset("tiny-wan22-ti2v", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS, tested=False, image="optional")(
    tiny_wan_ti2v
)
tiny.preset("tiny-wan22-i2v", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS, image="required")(
    lambda: tiny_wan(experts=2, image="vae")
)
tiny.preset("tiny-wan22", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS)(lambda: tiny_wan(experts=2))
# Heavy enough that every stage computes for tens of milliseconds on a CPU core, so benchmarks
# measure the system rather than Ray's fixed per-call costs.
tiny.preset(
    "bench-wan",
    {**tiny.VIDEO_DEFAULTS, "height": 96, "width": 96},
    {"max_size": 256, "max_frames": 33},
    tested=False,
)(lambda: tiny_wan(scale=4))

# Trained by the project (`kinoray train-shapes`): draws the scenes of kinoray.models.scenes.
tiny.shipped("shapes-wan", Path(__file__).resolve().parent.parent / "weights" / "shapes-wan")
# The same weights as Wan 2.2 TI2V-5B runs them: a reference image becomes the first frame.
tiny.variant("shapes-wan-ti2v", of="shapes-wan", image="optional", expand_timesteps=True)
