"""Wan 2.1 / 2.2 text-to-video (`WanPipeline`): UMT5 text encoder, flow-matching DiT (two experts
in Wan 2.2 A14B), causal 3D VAE."""

from __future__ import annotations

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

    def _vae_decode(self, latents: Any) -> Any:
        # WanPipeline.__call__'s own un-normalisation of latents before `vae.decode`.
        import torch

        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        return self.pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0]


# -- tiny presets ----------------------------------------------------------------------------------


def tiny_wan(scale: int = 1, experts: int = 1) -> Any:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
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
                in_channels=16,
                out_channels=16,
                text_dim=text_dim,
                freq_dim=256,
                ffn_dim=32 * scale * scale,
                num_layers=2 * scale,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32,
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
    return WanPipeline(
        tokenizer=tiny.byte_tokenizer(512),
        text_encoder=text_encoder,
        transformer=transformers[0],
        vae=vae,
        scheduler=scheduler,
        **two,
    )


tiny.preset("tiny-wan", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS)(tiny_wan)
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
