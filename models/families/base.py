"""What a family adapter does: load one stage's components of a diffusers pipeline and run it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from models.request import RequestDefaults, RequestLimits
from models.spec import ModelSpec
from models.tiny import DEFAULTS_FILE

Stage = Literal["encode", "denoise", "decode"]
StepCallback = Callable[[int, int], None]  # (steps done, total steps)

# Which pipeline components each stage loads; everything else is passed to from_pretrained as None.
STAGE_COMPONENTS: dict[str, frozenset[str]] = {
    "encode": frozenset(
        {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3"}
    ),
    "denoise": frozenset({"transformer", "transformer_2", "scheduler"}),
    "decode": frozenset({"vae"}),
}


class FamilyAdapter:
    """One diffusers pipeline family, split into encode / denoise / decode.

    Each method reuses the pipeline's own code: `encode_prompt`, `__call__` with `prompt_embeds=`
    and `output_type="latent"`, and the VAE's latent normalisation, so that the three stages give
    the frames the monolithic pipeline gives.
    """

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    # What the text encoder hands the denoiser, by the names the pipeline's `__call__` takes;
    # each also travels as `negative_<name>`.
    conditioning: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    is_image_model: ClassVar[bool] = False
    # diffusers' step caches that work with this family's transformer (checked with diffusers
    # 0.42): FasterCache needs CFG run as one batch or distilled guidance; First Block Cache needs
    # a block layout its hook recognises.
    caches: ClassVar[frozenset[str]] = frozenset()
    default_max_sequence_length: ClassVar[int]
    defaults: ClassVar[RequestDefaults]

    def __init__(self, spec: ModelSpec, stage: Stage | None = None):
        self.spec = spec
        self.stage = stage
        self.pipe: Any = self._load(stage) if stage else None

    # -- what requests this checkpoint takes, from its configs alone --------------------------

    @classmethod
    def request_defaults(cls, spec: ModelSpec) -> RequestDefaults:
        values = cls.defaults.model_dump()
        path = spec.path
        extra = os.path.join(path, DEFAULTS_FILE)
        if os.path.isdir(path) and os.path.exists(extra):
            with open(extra) as f:
                values.update(json.load(f).get("defaults", {}))
        return RequestDefaults(**values)

    @classmethod
    def request_limits(cls, spec: ModelSpec) -> RequestLimits:
        spatial, temporal = cls.vae_factors(spec)
        return RequestLimits(
            size_multiple=spatial * cls.patch_size(spec), frame_step=cls.frame_step(spec, temporal)
        )

    @classmethod
    def frame_step(cls, spec: ModelSpec, temporal: int) -> int:
        return temporal

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        raise NotImplementedError

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        raise NotImplementedError

    @property
    def max_sequence_length(self) -> int:
        return self.spec.max_sequence_length or self.default_max_sequence_length

    # -- loading ------------------------------------------------------------------------------

    def _load(self, stage: Stage) -> Any:
        import diffusers

        keep = STAGE_COMPONENTS[stage]
        # Components are the [library, class] entries; the rest (e.g. Wan 2.2's boundary_ratio) is config.
        components = [
            k for k, v in self.spec.model_index.items() if not k.startswith("_") and isinstance(v, list)
        ]
        skipped = {name: None for name in components if name not in keep}
        pipeline_cls = getattr(diffusers, self.pipeline_class)
        pipe = pipeline_cls.from_pretrained(
            self.spec.path,
            revision=self.spec.revision,
            dtype=self.spec.torch_dtype(),
            **skipped,
        )
        device = self.spec.torch_device()
        if self.spec.cpu_offload and device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        # Without its VAE the pipeline falls back to hard-coded scale factors: use the checkpoint's.
        if stage != "decode":
            spatial, temporal = self.vae_factors(self.spec)
            pipe.vae_scale_factor_spatial = spatial
            pipe.vae_scale_factor_temporal = temporal
        if stage == "decode":
            if self.spec.vae_tiling:
                pipe.vae.enable_tiling()
            if self.spec.vae_slicing:
                pipe.vae.enable_slicing()
        if stage == "denoise":
            self._speedups(pipe)
        return pipe

    def _speedups(self, pipe: Any) -> None:
        """Step caching and compilation of the denoiser's transformer(s), as the config asks."""
        from diffusers import FasterCacheConfig, FirstBlockCacheConfig

        if self.spec.cache != "none" and self.spec.cache not in self.caches:
            supported = ", ".join(sorted(self.caches)) or "none"
            raise ValueError(
                f"cache {self.spec.cache!r} is not supported by the {self.name} family; supported: {supported}"
            )
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is None:
                continue
            if self.spec.cache == "first_block":
                model.enable_cache(FirstBlockCacheConfig(threshold=self.spec.cache_threshold))
            elif self.spec.cache == "faster":
                model.enable_cache(
                    FasterCacheConfig(
                        current_timestep_callback=lambda: pipe.current_timestep,
                        is_guidance_distilled=self.is_image_model,
                    )
                )
            if self.spec.compile:
                model.compile()

    # -- the three stages ---------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Texts -> the family's conditioning arrays, named as diffusers names them, one row per text."""
        import torch

        with torch.inference_mode():
            tensors = self._encode_prompt(list(texts))
        return {
            name: (t.float() if t.is_floating_point() else t).cpu().numpy()
            for name, t in zip(self.conditioning, tensors)
        }

    def _encode_prompt(self, texts: list[str]) -> tuple[Any, ...]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=self.pipe._execution_device,
        )
        return (embeds,)

    def denoise(
        self,
        conditioning: dict[str, np.ndarray],
        seeds: Sequence[int],
        height: int,
        width: int,
        num_frames: int,
        fps: int,
        num_inference_steps: int,
        guidance_scale: float,
        on_step: StepCallback | None = None,
    ) -> np.ndarray:
        """One shape group -> float32 latents (N, ...), one generator per seed.

        `conditioning` holds each of `self.conditioning` and its `negative_` twin, stacked per row.
        """
        import torch

        device = self.pipe._execution_device
        dtype = self.spec.torch_dtype()
        # One CPU generator per row: each row's noise depends on its own seed only, on any device,
        # exactly as `pipe(generator=torch.Generator().manual_seed(seed))` draws it for one prompt.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        callback = None
        if on_step is not None:

            def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                on_step(i + 1, num_inference_steps)
                return {}

        tensors = {}
        for name, array in conditioning.items():
            t = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            tensors[name] = t.to(dtype) if t.is_floating_point() else t
        with torch.inference_mode():
            latents = self.pipe(
                **tensors,
                **self._shape_args(height, width, num_frames, fps),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                max_sequence_length=self.max_sequence_length,
                output_type="latent",
                callback_on_step_end=callback,
                return_dict=False,
            )[0]
        return self._latents_out(latents, height, width, num_frames).float().cpu().numpy()

    def _shape_args(self, height: int, width: int, num_frames: int, fps: int) -> dict[str, Any]:
        """The request's shape as this pipeline's `__call__` takes it."""
        return {"height": height, "width": width, "num_frames": num_frames}

    def _latents_out(self, latents: Any, height: int, width: int, num_frames: int) -> Any:
        """The pipeline's latent output -> what its VAE decode path starts from."""
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents of one shape -> uint8 frames (N, T, H, W, 3); T is 1 for image models."""
        import torch

        vae = self.pipe.vae
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(latents)).to(self.pipe._execution_device, vae.dtype)
            decoded = self._vae_decode(x)
            if self.is_image_model:
                frames = self.pipe.image_processor.postprocess(decoded, output_type="np")[:, None]
            else:
                frames = self.pipe.video_processor.postprocess_video(decoded, output_type="np")
        return to_uint8(frames)

    def _vae_decode(self, latents: Any) -> Any:
        raise NotImplementedError


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (as diffusers' `output_type="np"` gives them) -> uint8."""
    return np.clip(np.round(np.asarray(frames, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
