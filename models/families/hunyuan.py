"""HunyuanVideo text-to-video (`HunyuanVideoPipeline`): a Llama text encoder with attention mask
plus CLIP's pooled embedding, a dual/single-stream DiT with distilled guidance, a 3D VAE; and
image-to-video (`HunyuanVideoImageToVideoPipeline`), whose text encoder is LLaVA: it reads the
image with the prompt."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from kinoray.models import tiny
from kinoray.models.families.base import FamilyAdapter
from kinoray.models.request import SamplingParams
from kinoray.models.spec import ModelError, ModelSpec


class HunyuanVideoAdapter(FamilyAdapter):
    name = "hunyuan"
    pipeline_class = "HunyuanVideoPipeline"
    decode_memory_factor = 14.4  # measured on the tiny preset: kinoray bench --decode-memory
    default_max_sequence_length = 256
    caches = frozenset({"first_block"})
    conditioning: ClassVar[tuple[str, ...]] = (
        "prompt_embeds",
        "pooled_prompt_embeds",
        "prompt_attention_mask",
    )
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


class HunyuanVideoI2VAdapter(HunyuanVideoAdapter):
    """HunyuanVideo-I2V (`image_condition_type` "token_replace"): LLaVA encodes the prompt
    together with the image, so every conditioning array is the image's: `prompt_embeds`,
    `pooled_prompt_embeds` and `prompt_attention_mask` for the (prompt, image) pair, and
    `image_latents`, the VAE latents of the image, which replace the first latent frame's
    tokens at every step.

    The 33-channel variant ("latent_concat") is refused: its pipeline decodes four frames fewer
    than the request asks for.
    """

    name = "hunyuan-i2v"
    pipeline_class = "HunyuanVideoImageToVideoPipeline"
    caches = frozenset()
    conditioning = ()  # no text alone: LLaVA reads it with the image (see `encode_image`)
    image_components = frozenset({"image_processor", "vae"})

    @classmethod
    def image_conditioning_names(cls, spec: ModelSpec) -> tuple[str, ...]:
        return ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask", "image_latents")

    @classmethod
    def image_input(cls, spec: ModelSpec) -> Any:
        kind = spec.read_config("config.json", "transformer").get("image_condition_type")
        if kind != "token_replace":
            raise ModelError(
                f"{spec.weights}: HunyuanVideo image-to-video with image_condition_type {kind!r} is not "
                "supported (its pipeline makes 4 frames fewer than asked); token_replace is"
            )
        return "required"

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return {}

    def _make_image_pipe(self) -> Any:
        pipe = super()._make_image_pipe()
        if self.stage == "denoise":
            # `__call__` reads the VAE's dtype outside `prepare_latents`.
            pipe.vae = self._config_stub("vae", dtype=self.spec.torch_dtype())
        return pipe

    def encode_image(self, image: Any, sampling: SamplingParams, seed: int, prompt: str) -> dict[str, Any]:
        import torch

        pipe, s = self.image_pipe, sampling
        device = pipe._execution_device
        with torch.inference_mode():
            # As `__call__` does for token_replace: every 4th image token is kept.
            embeds, pooled, mask = pipe.encode_prompt(
                image=image,
                prompt=prompt,
                device=device,
                max_sequence_length=self.max_sequence_length,
                image_embed_interleave=4,
            )
            pixels = pipe.video_processor.preprocess(image, s.height, s.width).to(device, pipe.vae.dtype)
            # Given latents, `prepare_latents` draws no noise: only its VAE half runs (argmax).
            _, first = pipe.prepare_latents(
                pixels, 1, 1, s.height, s.width, s.num_frames, torch.float32, device, None,
                torch.zeros(()), "token_replace",
            )  # fmt: skip
        out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "image_latents": first}
        arrays = {k: v[0].float().cpu().numpy() for k, v in out.items()}
        arrays["prompt_attention_mask"] = mask[0].cpu().numpy()
        return arrays

    @contextlib.contextmanager
    def _image_call(
        self, image: dict[str, Any], sampling: SamplingParams, generators: list[Any]
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        import PIL.Image
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        pipe, dtype = self.image_pipe, self.spec.torch_dtype()
        first = image["image_latents"]

        def prepare_latents(
            image: Any,
            batch_size: int,
            num_channels_latents: int = 32,
            height: int = 720,
            width: int = 1280,
            num_frames: int = 129,
            dtype: Any = None,
            device: Any = None,
            generator: Any = None,
            latents: Any = None,
            image_condition_type: str = "token_replace",
        ) -> tuple[Any, Any]:
            # HunyuanVideoImageToVideoPipeline.prepare_latents's noise, with the encode stage's
            # first-frame latents.
            frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
            unit = pipe.vae_scale_factor_spatial
            shape = (batch_size, num_channels_latents, frames, height // unit, width // unit)
            image_latents = first.to(device=device, dtype=dtype).repeat(1, 1, frames, 1, 1)
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            t = torch.tensor([0.999]).to(device=device)
            latents = latents.to(device=device, dtype=dtype) * t + image_latents * (1 - t)
            return latents, image_latents[:, :, :1]

        pipe.prepare_latents = prepare_latents
        text = {
            "prompt_embeds": image["prompt_embeds"].to(dtype),
            "pooled_prompt_embeds": image["pooled_prompt_embeds"].to(dtype),
            "prompt_attention_mask": image["prompt_attention_mask"],
        }
        try:
            yield pipe, {"image": PIL.Image.new("RGB", (sampling.width, sampling.height)), **text}
        finally:
            pipe.__dict__.pop("prepare_latents", None)


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


def llama3_like_tokenizer(max_length: int = 1024) -> Any:
    """A byte-level tokenizer that reads HunyuanVideo-I2V's prompt template as its Llama 3
    tokenizer does where the pipeline counts on it: `<|begin_of_text|>` first, `<image>` one
    token at position 5, exactly `crop_start` (103) tokens before the user's prompt, and the
    assistant header as 4 tokens. The system instruction is one added token plus 90 bytes."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    instruction = template.split("<image>")[1].split("<|eot_id|>")[0]
    specials = [
        "<pad>",
        "<|begin_of_text|>",
        "<unk>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<image>",
    ]
    vocab = {token: i for i, token in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    words = ("system", "user", "assistant", "\n\n", instruction[:-90])
    tok.add_tokens([AddedToken(t, normalized=False) for t in words])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<|begin_of_text|>",
        unk_token="<unk>",
        model_max_length=max_length,
    )
    prefix = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix) == DEFAULT_PROMPT_TEMPLATE["crop_start"], len(prefix)
    assert prefix[DEFAULT_PROMPT_TEMPLATE["image_emb_start"]] == tokenizer.convert_tokens_to_ids("<image>")
    return tokenizer


@tiny.preset("tiny-hunyuan-i2v", tiny.VIDEO_DEFAULTS, tiny.VIDEO_LIMITS, image="required")
def tiny_hunyuan_i2v() -> Any:
    """HunyuanVideo-I2V's layout (token_replace, distilled guidance): LLaVA (a Llama with a CLIP
    vision tower, 576 image tokens as at 336 pixels) reads the prompt and the image."""
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tokenizer = llama3_like_tokenizer()
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=48,
        patch_size=2,  # (48 / 2)^2 = 576 patches, as ViT-L/14 at 336 pixels
        projection_dim=8,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=3,  # the pipeline takes the third hidden state from the end
        bos_token_id=1,
        eos_token_id=5,
        pad_token_id=0,
        hidden_act="silu",
    )
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=576,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            pad_token_id=0,
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
        image_condition_type="token_replace",
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
    return HunyuanVideoImageToVideoPipeline(
        text_encoder=llava,
        tokenizer=tokenizer,
        text_encoder_2=clip,
        tokenizer_2=tiny.byte_tokenizer(77),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
