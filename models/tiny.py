"""Tiny models of real architectures, built offline and deterministically.

Each preset is a complete diffusers pipeline folder (model_index.json, safetensors, a tokenizer)
written with `save_pretrained` and loaded back through the same `from_pretrained` path that real
weights use. Weights are random from a fixed seed: the frames are not pictures, but every code
path (tokenizer, text encoder, transformer, scheduler, VAE) is the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULTS_FILE = "kinoray.json"
# Bumped whenever a preset changes, so a cached build of an older preset is never reused.
BUILDER_VERSION = 3


def cache_dir() -> Path:
    return Path(os.environ.get("KINORAY_CACHE", Path.home() / ".cache" / "kinoray")) / "models"


def _byte_tokenizer(max_length: int) -> Any:
    """A byte-level tokenizer made on the spot: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _t5_config(cls_name: str, d_model: int, layers: int) -> Any:
    import transformers

    config_cls = transformers.UMT5Config if cls_name == "umt5" else transformers.T5Config
    return config_cls(
        vocab_size=3 + 256,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _clip_config(hidden: int) -> Any:
    from transformers import CLIPTextConfig

    # Token ids follow the byte tokenizer: pad 0, eos 1 (CLIP pools at the eos position).
    return CLIPTextConfig(
        vocab_size=3 + 256,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        hidden_act="gelu",
    )


def _image_vae() -> Any:
    """A 2D VAE with FLUX's / SD3's latent shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _wan(scale: int, experts: int = 1) -> Any:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    # Larger presets grow the text encoder faster: it must cost tens of ms like the other stages.
    text_dim, text_layers = (32, 2) if scale == 1 else (64 * scale, 2 * scale)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(_t5_config("umt5", text_dim, text_layers))
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
    pipe = WanPipeline(
        tokenizer=_byte_tokenizer(512),
        text_encoder=text_encoder,
        transformer=transformers[0],
        vae=vae,
        scheduler=scheduler,
        **two,
    )
    return pipe


def _ltx(scale: int) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(_t5_config("t5", 32, 2))
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
    pipe = LTXPipeline(
        tokenizer=_byte_tokenizer(128),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return pipe


def _cogvideox(scale: int) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(_t5_config("t5", 32 * scale, 2))
    torch.manual_seed(1)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8 * scale,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32 * scale,
        num_layers=1 * scale,
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
        block_out_channels=(8 * scale,) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing")
    pipe = CogVideoXPipeline(
        tokenizer=_byte_tokenizer(226),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    )
    return pipe


def _hunyuan(scale: int) -> Any:
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
    clip = CLIPTextModel(_clip_config(8))
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
    pipe = HunyuanVideoPipeline(
        tokenizer=_byte_tokenizer(1024),
        text_encoder=llama,
        tokenizer_2=_byte_tokenizer(77),
        text_encoder_2=clip,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    return pipe


def _flux(scale: int) -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(_clip_config(32))
    torch.manual_seed(1)
    t5 = T5EncoderModel(_t5_config("t5", 32, 2))
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
    vae = _image_vae()
    pipe = FluxPipeline(
        tokenizer=_byte_tokenizer(77),
        text_encoder=clip,
        tokenizer_2=_byte_tokenizer(512),
        text_encoder_2=t5,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return pipe


def _sd3(scale: int) -> Any:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_config = _clip_config(32)
    torch.manual_seed(0)
    clip_l = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(1)
    clip_g = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(2)
    t5 = T5EncoderModel(_t5_config("t5", 64, 2))  # as wide as both CLIPs side by side
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
    vae = _image_vae()
    pipe = StableDiffusion3Pipeline(
        tokenizer=_byte_tokenizer(77),
        text_encoder=clip_l,
        tokenizer_2=_byte_tokenizer(77),
        text_encoder_2=clip_g,
        tokenizer_3=_byte_tokenizer(256),
        text_encoder_3=t5,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return pipe


# name -> (builder, scale, request defaults written beside the weights; the rest are the family's)
PRESETS: dict[str, tuple[Callable[[int], Any], int, dict[str, Any]]] = {
    "tiny-wan": (_wan, 1, {"height": 64, "width": 64, "num_frames": 9, "fps": 8, "num_inference_steps": 4}),
    "tiny-wan22": (
        lambda scale: _wan(scale, experts=2),
        1,
        {"height": 64, "width": 64, "num_frames": 9, "fps": 8, "num_inference_steps": 4},
    ),
    "tiny-ltx": (_ltx, 1, {"height": 64, "width": 64, "num_frames": 9, "fps": 8, "num_inference_steps": 4}),
    "tiny-hunyuan": (
        _hunyuan,
        1,
        {"height": 64, "width": 64, "num_frames": 9, "fps": 8, "num_inference_steps": 4},
    ),
    "tiny-flux": (_flux, 1, {"height": 64, "width": 64, "num_frames": 1, "fps": 1, "num_inference_steps": 4}),
    "tiny-sd3": (_sd3, 1, {"height": 64, "width": 64, "num_frames": 1, "fps": 1, "num_inference_steps": 4}),
    "tiny-cogvideox": (
        _cogvideox,
        1,
        {"height": 64, "width": 64, "num_frames": 9, "fps": 8, "num_inference_steps": 4},
    ),
    # Heavy enough that every stage computes for tens of milliseconds on a CPU core,
    # so benchmarks measure the system rather than Ray's fixed per-call costs.
    "bench-wan": (_wan, 4, {"height": 96, "width": 96, "num_frames": 9, "fps": 8, "num_inference_steps": 4}),
}

DEFAULT_MODEL = "tiny-wan"


def is_preset(name: str) -> bool:
    return name in PRESETS


def build(name: str, dest: Path) -> Path:
    """Build preset `name` into `dest` (atomically: concurrent builders never see half a model)."""
    builder, scale, defaults = PRESETS[name]
    pipe = builder(scale)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / DEFAULTS_FILE).write_text(json.dumps({"defaults": defaults}, indent=2))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure(name: str) -> Path:
    """The local folder of preset `name`, built on first use."""
    dest = cache_dir() / f"{name}-v{BUILDER_VERSION}"
    if not (dest / "model_index.json").exists():
        build(name, dest)
    return dest
