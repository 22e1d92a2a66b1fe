"""What a family adapter does: know what a checkpoint accepts, load one stage's components of a
diffusers pipeline, and run that stage."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from kinoray.models.request import (
    GenerationRequest,
    LimitOverrides,
    RequestDefaults,
    RequestLimits,
    SamplingParams,
)
from kinoray.models.spec import ModelInfo, ModelSpec
from kinoray.models.tiny import DEFAULTS_FILE

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from kinoray.models.decode_plan import DecodePlan
    from kinoray.models.loras import LoraSource

StageName = Literal["encode", "denoise", "decode"]
StepCallback = Callable[[int, int, int], None]  # (steps done, total steps, rows in the step)
# -> the positions (in the call's rows) of rows whose compute should stop
CancelledRows = Callable[[], Collection[int]]

# Which pipeline components each stage loads; everything else is passed to from_pretrained as None.
STAGE_COMPONENTS: dict[str, frozenset[str]] = {
    "encode": frozenset(
        {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3"}
    ),
    "denoise": frozenset({"transformer", "transformer_2", "scheduler"}),
    "decode": frozenset({"vae"}),
}

# pipeline class name (model_index.json's `_class_name`) -> adapter; filled by subclassing.
FAMILIES: dict[str, type[FamilyAdapter]] = {}


class FamilyAdapter:
    """One diffusers pipeline family, split into encode / denoise / decode.

    Each method reuses the pipeline's own code: `encode_prompt`, `__call__` with `prompt_embeds=`
    and `output_type="latent"`, and the VAE's latent normalisation, so that the three stages give
    the frames the monolithic pipeline gives. A subclass that sets `pipeline_class` registers
    itself: adding a family is one module.
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
    # The family's request defaults (its model card's settings); a checkpoint may override them.
    defaults: ClassVar[dict[str, Any]]
    # The VAE decode's memory (see kinoray.models.decode_plan): frames its decoder holds at once
    # (None: the whole clip; causal VAEs decode a latent frame or two at a time) and the factor
    # measured on the tiny preset by `kinoray bench --decode-memory`.
    decode_chunk_frames: ClassVar[int | None] = None
    decode_memory_factor: ClassVar[float] = 8.0
    # Whether a cancelled row can leave a running batch between two steps (see `_drop_rows`):
    # true where every per-row tensor of the pipeline's loop is a callback input or scheduler
    # state. Elsewhere a cancelled row is computed to the end with its batch and then discarded,
    # and a batch whose rows are all cancelled stops at once.
    drops_rows: ClassVar[bool] = False
    # Image-to-video: the components the encode stage loads besides the text ones to turn a
    # reference image into conditioning (`encode_image`). Empty: the family takes no image.
    image_components: ClassVar[frozenset[str]] = frozenset()
    # The family's image-to-video pipeline, for checkpoints saved under the text-to-video class
    # that also take an image (Wan 2.2 TI2V-5B, LTX-Video): it runs on the same components.
    image_pipeline_class: ClassVar[str | None] = None
    # dtypes of the image conditioning arrays other than float32
    image_dtypes: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "pipeline_class" in cls.__dict__:
            FAMILIES[cls.pipeline_class] = cls

    def __init__(self, spec: ModelSpec, stage: StageName | None = None):
        self.spec = spec
        self.stage = stage
        self.pipe: Any = self._load(stage) if stage else None

    # -- what a checkpoint accepts, from its config files alone -----------------------------------

    @classmethod
    def model_info(cls, spec: ModelSpec) -> ModelInfo:
        """Defaults, limits and VAE factors of `spec`'s checkpoint; raises on unreadable configs."""
        spatial, temporal = cls.vae_factors(spec)
        limits = RequestLimits(
            size_multiple=cls.size_multiple(spec, spatial),
            frame_step=1 if cls.is_image_model else cls.frame_step(spec, temporal),
            optional_params=cls.optional_params(spec),
            image_input=cls.image_input(spec),
            **({"max_frames": 1} if cls.is_image_model else {}),
        ).tightened(LimitOverrides(**cls.capacity(spec, spatial, temporal)))
        declared = cls._declared(spec)
        limits = limits.tightened(LimitOverrides(**declared.get("limits", {})))
        overrides = RequestDefaults(**declared.get("defaults", {})).model_dump(exclude_none=True)
        return ModelInfo(
            family=cls.name,
            pipeline_class=cls.pipeline_class,
            defaults={"negative_prompt": "", **cls.defaults, **overrides},
            limits=limits,
            vae_scale_factor_spatial=spatial,
            vae_scale_factor_temporal=temporal,
            is_image_model=cls.is_image_model,
        )

    @classmethod
    def _declared(cls, spec: ModelSpec) -> dict[str, Any]:
        path = os.path.join(spec.path, DEFAULTS_FILE)
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    @classmethod
    def vae_factors(cls, spec: ModelSpec) -> tuple[int, int]:
        """(pixels per latent cell, frames per latent frame) of the checkpoint's VAE."""
        raise NotImplementedError

    @classmethod
    def patch_size(cls, spec: ModelSpec) -> int:
        """Latent cells per transformer token, along height and width."""
        raise NotImplementedError

    @classmethod
    def size_multiple(cls, spec: ModelSpec, spatial: int) -> int:
        """Valid heights and widths are multiples of this: one transformer token in pixels."""
        return spatial * cls.patch_size(spec)

    @classmethod
    def frame_step(cls, spec: ModelSpec, temporal: int) -> int:
        """Valid frame counts are 1 + k * frame_step."""
        return temporal

    @classmethod
    def capacity(cls, spec: ModelSpec, spatial: int, temporal: int) -> dict[str, int]:
        """Bounds from the transformer's positional capacity (`max_size`, `max_frames`), if any."""
        return {}

    @classmethod
    def image_input(cls, spec: ModelSpec) -> Literal["none", "optional", "required"]:
        """Whether this checkpoint's requests give a reference image (see `RequestLimits`)."""
        return "required" if cls.image_components else "none"

    @classmethod
    def image_components_of(cls, spec: ModelSpec) -> frozenset[str]:
        """The components `spec`'s encode stage loads for reference images (see `image_components`)."""
        return cls.image_components

    @classmethod
    def image_conditioning_names(cls, spec: ModelSpec) -> tuple[str, ...]:
        """What `encode_image` hands the denoiser for one reference image, by name."""
        return ()

    @functools.cached_property
    def image_conditioning(self) -> tuple[str, ...]:
        return self.image_conditioning_names(self.spec)

    @classmethod
    def optional_params(cls, spec: ModelSpec) -> frozenset[str]:
        """Family-specific sampling parameters this checkpoint takes (see `SamplingParams`)."""
        return frozenset()

    @classmethod
    def pipeline_args(cls, sampling: SamplingParams) -> dict[str, Any]:
        """The sampling parameters as this pipeline's `__call__` takes them."""
        args: dict[str, Any] = {
            "height": sampling.height,
            "width": sampling.width,
            "num_inference_steps": sampling.num_inference_steps,
            "guidance_scale": sampling.guidance_scale,
        }
        if not cls.is_image_model:
            args["num_frames"] = sampling.num_frames
        return args

    @classmethod
    def generate(cls, spec: ModelSpec, pipe: Any, requests: Sequence[GenerationRequest]) -> np.ndarray:
        """The monolithic pipeline's frames for requests of equal sampling: uint8 (N, T, H, W, 3).

        The reference the three stages must reproduce, and the baselines of `kinoray bench`.
        `pipe` is `spec`'s pipeline, called as its model card shows.
        """
        import torch

        if any(r.image for r in requests):
            # The image-to-video pipelines take one image per call (Wan refuses a list).
            return np.concatenate([cls._generate_from_image(spec, pipe, r) for r in requests])
        out = pipe(
            prompt=[r.prompt for r in requests],
            negative_prompt=[r.negative_prompt for r in requests],
            generator=[torch.Generator().manual_seed(r.seed) for r in requests],
            output_type="np",
            max_sequence_length=cls.text_tokens(spec),
            **cls.pipeline_args(requests[0].sampling),
        )
        frames = out.images[:, None] if cls.is_image_model else out.frames
        return to_uint8(frames)

    @classmethod
    def _generate_from_image(cls, spec: ModelSpec, pipe: Any, request: GenerationRequest) -> np.ndarray:
        import torch

        from kinoray.models.images import ImagePolicy, fit_image, load_image

        s = request.sampling
        image, _ = load_image(request.image or "", ImagePolicy(allow_private_networks=True))
        if cls.image_pipeline_class is not None and type(pipe).__name__ != cls.image_pipeline_class:
            import diffusers

            pipe = getattr(diffusers, cls.image_pipeline_class).from_pipe(pipe)
            pipe.set_progress_bar_config(disable=True)
        out = pipe(
            image=fit_image(image, s.width, s.height),
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            generator=torch.Generator().manual_seed(request.seed),
            output_type="np",
            max_sequence_length=cls.text_tokens(spec),
            **cls.pipeline_args(s),
        )
        return to_uint8(out.frames)

    @classmethod
    def text_tokens(cls, spec: ModelSpec) -> int:
        """Text tokens, padding included: the config's, else the checkpoint's own (a model trained
        at another length than its family's declares it in kinoray.json), else the family's."""
        declared = cls._declared(spec).get("max_sequence_length")
        return int(spec.max_sequence_length or declared or cls.default_max_sequence_length)

    @functools.cached_property
    def max_sequence_length(self) -> int:
        return self.text_tokens(self.spec)

    # -- loading ----------------------------------------------------------------------------------

    def _load(self, stage: StageName) -> Any:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        keep = STAGE_COMPONENTS[stage] | (
            self.image_components_of(self.spec) if stage == "encode" else frozenset()
        )
        # Components are the [library, class] entries; the rest (e.g. Wan 2.2's boundary_ratio) is config.
        components = [
            k for k, v in self.spec.model_index.items() if not k.startswith("_") and isinstance(v, list)
        ]
        skipped = {name: None for name in components if name not in keep}
        pipeline_cls = getattr(diffusers, self.pipeline_class)
        pipe = pipeline_cls.from_pretrained(
            self.spec.path, revision=self.spec.revision, dtype=self.spec.torch_dtype(), **skipped
        )
        device = self.spec.torch_device()
        if self.spec.cpu_offload and device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if stage != "decode":
            self._set_vae_factors(pipe)
        if stage == "denoise":
            self._speedups(pipe)
        return pipe

    @functools.cached_property
    def image_pipe(self) -> Any:
        """The pipeline that takes a reference image: the loaded one, or the family's
        image-to-video class on the same components (`image_pipeline_class`)."""
        return self._make_image_pipe()

    def _make_image_pipe(self) -> Any:
        if self.image_pipeline_class is None or type(self.pipe).__name__ == self.image_pipeline_class:
            return self.pipe
        import diffusers

        pipe = getattr(diffusers, self.image_pipeline_class).from_pipe(self.pipe)
        pipe.set_progress_bar_config(disable=True)
        self._set_vae_factors(pipe)
        return pipe

    def _config_stub(self, component: str, **attributes: Any) -> Any:
        """A plain object standing in for a component this stage does not load, answering the
        reads of its config (and `attributes`) that a pipeline makes outside the code the stage
        replaces. Not a module, so `pipe.to`, `_execution_device` and offloading ignore it."""
        from types import SimpleNamespace

        config = self.spec.read_config("config.json", component)
        return SimpleNamespace(config=SimpleNamespace(**config), **attributes)

    def _set_vae_factors(self, pipe: Any) -> None:
        # Without its VAE the pipeline falls back to hard-coded scale factors: use the checkpoint's.
        info = self.spec.info
        pipe.vae_scale_factor_spatial = info.vae_scale_factor_spatial
        pipe.vae_scale_factor_temporal = info.vae_scale_factor_temporal

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

    # -- LoRA adapters (see kinoray.models.loras) ---------------------------------------------

    @functools.cached_property
    def text_encoder_loras(self) -> tuple[str, ...]:
        """The text encoders diffusers' LoRA loader of this family adapts (FLUX.1: `text_encoder`;
        SD3: both CLIPs); none for families whose adapters touch the transformer only."""
        import diffusers

        modules = getattr(getattr(diffusers, self.pipeline_class), "_lora_loadable_modules", [])
        return tuple(m for m in modules if m.startswith("text_encoder"))

    def load_lora(
        self, name: str, source: LoraSource, adapter_name: str | None = None, hotswap: bool = False
    ) -> bool:
        """Load catalog adapter `name`'s weights for this stage's components under `adapter_name`
        (default: `name`), inactive until `set_loras` names it; with `hotswap`, in place of the
        weights that `adapter_name` holds (see `enable_lora_hotswap`). The denoiser loads the
        transformer's (both experts' with `weights_2`), the encoder the text encoders'
        (`text_encoder_loras`). Returns whether the adapter has weights for this stage.
        diffusers reads the file, in any format it knows."""
        import diffusers

        slot = adapter_name or name
        verbosity = diffusers.utils.logging.get_verbosity()
        # diffusers logs a failed load at length before raising; the error names the adapter.
        diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
        try:
            return self._load_lora(name, source, slot, hotswap)
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)

    def _load_lora(self, name: str, source: LoraSource, slot: str, hotswap: bool) -> bool:
        from kinoray.models.loras import lora_location

        with warnings.catch_warnings():
            # peft warns of a second adapter in one model: holding several is what the LRU is for.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            where, kwargs = lora_location(source, self.spec)
            if hotswap:
                kwargs["hotswap"] = True
            if not self.text_encoder_loras:  # transformer-only adapters: as diffusers loads them
                if self.stage == "encode":
                    return False
                self.pipe.load_lora_weights(where, adapter_name=slot, **kwargs)
                if source.weights_2 is not None:
                    where, kwargs = lora_location(source, self.spec, second=True)
                    self.pipe.load_lora_weights(
                        where, adapter_name=slot, load_into_transformer_2=True, hotswap=hotswap, **kwargs
                    )
                return True
            return self._load_lora_parts(slot, where, kwargs)

    def enable_lora_hotswap(self, target_rank: int) -> None:
        """Prepare the transformer(s) for adapters swapped in place (diffusers'
        `enable_lora_hotswap`): LoRA weights padded to `target_rank` and scales held as tensors,
        so a compiled transformer is not recompiled when an adapter or a scale changes. Called
        before the first adapter is loaded and before the first call."""
        self.pipe.enable_lora_hotswap(target_rank=target_rank, check_compiled="ignore")

    def _load_lora_parts(self, name: str, where: str, kwargs: dict[str, Any]) -> bool:
        # The family's `load_lora_weights` loads every component at once, and this stage holds
        # only some: each part goes through the loader's own per-component functions instead.
        import inspect

        pipe = self.pipe
        hotswap = kwargs.pop("hotswap", False)
        wants_alphas = "return_alphas" in inspect.signature(pipe.lora_state_dict).parameters
        out = pipe.lora_state_dict(
            where, return_lora_metadata=True, **({"return_alphas": True} if wants_alphas else {}), **kwargs
        )
        state_dict, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
        if self.stage == "encode":
            loaded = False
            for component in self.text_encoder_loras:
                module = getattr(pipe, component, None)
                if module is not None and any(k.startswith(f"{component}.") for k in state_dict):
                    pipe.load_lora_into_text_encoder(
                        state_dict,
                        network_alphas=alphas,
                        text_encoder=module,
                        prefix=component,
                        adapter_name=name,
                        metadata=metadata,
                        _pipeline=pipe,
                        hotswap=hotswap,
                    )
                    loaded = True
            return loaded
        if not any(k.startswith(f"{c}.") for k in state_dict for c in self.text_encoder_loras):
            pipe.load_lora_weights(where, adapter_name=name, hotswap=hotswap, **kwargs)  # as diffusers does
            return True
        part = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
        if not part:
            return False
        load = pipe.load_lora_into_transformer
        extra = {"network_alphas": alphas} if "network_alphas" in inspect.signature(load).parameters else {}
        load(
            part,
            transformer=pipe.transformer,
            adapter_name=name,
            metadata=metadata,
            _pipeline=pipe,
            hotswap=hotswap,
            **extra,
        )
        return True

    def delete_lora(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name` from the model (nothing when it is not there)."""
        held = {n for names in self.pipe.get_list_adapters().values() for n in names}
        if adapter_name in held:
            self.pipe.delete_adapters([adapter_name])

    def set_loras(self, weights: Mapping[str, float]) -> None:
        """Make the adapters named in `weights` the active ones, each at its scale
        (`set_adapters`); an empty mapping runs the base model."""
        if not self.pipe.get_list_adapters():
            return
        if not weights:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))

    # -- the three stages -------------------------------------------------------------------------

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
        sampling: SamplingParams,
        on_step: StepCallback | None = None,
        cancelled: CancelledRows | None = None,
    ) -> np.ndarray:
        """One group of equal `sampling` -> float32 latents (N, ...), one generator per seed.

        `conditioning` holds each of `self.conditioning` and its `negative_` twin, stacked per row.
        `cancelled`, asked after every step, names rows to stop: they leave the batch at the next
        step (`drops_rows`), or the whole call stops once every row is cancelled; a stopped row's
        latents are zeros. The other rows' results are those of an undisturbed call.
        """
        import torch

        device = self.pipe._execution_device
        dtype = self.spec.torch_dtype()
        # One CPU generator per row: each row's noise depends on its own seed only, on any device,
        # exactly as `pipe(generator=torch.Generator().manual_seed(seed))` draws it for one prompt.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        live = list(range(len(seeds)))  # the rows still in the pipeline's batch, in its order
        total = sampling.num_inference_steps

        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, total, len(live))
            gone = set(cancelled()) & set(live) if cancelled is not None else set()
            if not gone:
                return {}
            if len(gone) == len(live):
                pipe._interrupt = True  # the pipeline skips its remaining steps
                live.clear()
                return {}
            if not self.drops_rows or image:  # an image's conditioning is no callback input
                return {}
            keep = [k for k, row in enumerate(live) if row not in gone]
            live[:] = [live[k] for k in keep]
            return self._drop_rows(pipe, keep, len(gone) + len(keep), kwargs)

        tensors, image = {}, {}
        for name, array in conditioning.items():
            t = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            if name in self.image_conditioning:
                image[name] = t  # as the pipeline makes them (float32 VAE latents, generator states)
            else:
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
        with torch.inference_mode(), self._image_call(image, sampling, generators) as (pipe, image_args):
            latents = pipe(
                **tensors,
                **image_args,
                **self.pipeline_args(sampling),
                generator=generators,
                max_sequence_length=self.max_sequence_length,
                output_type="latent",
                callback_on_step_end=callback if on_step or cancelled else None,
                callback_on_step_end_tensor_inputs=list(pipe._callback_tensor_inputs),
                return_dict=False,
            )[0]
            out = self._latents_out(latents, sampling).float().cpu()
        if len(live) == len(seeds):
            return out.numpy()
        full = torch.zeros((len(seeds), *out.shape[1:]), dtype=out.dtype)
        if live:
            full[live] = out
        return full.numpy()

    def encode_image(
        self, image: PIL.Image.Image, sampling: SamplingParams, seed: int, prompt: str
    ) -> dict[str, np.ndarray]:
        """One reference image, already `sampling.width` x `sampling.height` pixels (see
        `kinoray.models.images.fit_image`) -> what the denoiser takes for it, named as in
        `image_conditioning`, one row's arrays (no batch axis). `seed` is the row's: families
        whose VAE samples its posterior draw from the row's generator here, as the pipeline does.
        `prompt` is the row's, for families whose text encoder also sees the image."""
        raise NotImplementedError(f"the {self.name} family takes no reference image")

    @contextlib.contextmanager
    def _image_call(
        self, image: dict[str, torch.Tensor], sampling: SamplingParams, generators: list[torch.Generator]
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The pipeline the denoiser calls and its extra arguments: for rows with a reference
        image, `image_pipe` made to use the encode stage's conditioning (`image`, stacked per
        row) instead of encoding the image itself; for text-to-video rows (`image` empty) the
        loaded pipeline as it is."""
        yield self.pipe, {}

    @staticmethod
    def _drop_rows(pipe: Any, keep: list[int], n: int, tensors: dict[str, Any]) -> dict[str, Any]:
        """The callback's answer that shrinks a running batch of `n` rows to rows `keep`.

        Per-row tensors have the batch first: `n` rows, or `2n` where the pipeline concatenated
        the negative and positive halves for classifier-free guidance. The scheduler's per-row
        history (a multistep solver's previous outputs) is sliced in place; its schedule arrays
        are 1-D and stay.
        """
        import torch

        def take(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or t.ndim < 2:
                return t
            if t.shape[0] == n:
                return t[keep]
            if t.shape[0] == 2 * n:
                return torch.cat([t[:n][keep], t[n:][keep]])
            return t

        state = pipe.scheduler.__dict__
        for name, value in list(state.items()):
            if isinstance(value, list):
                state[name] = [take(v) for v in value]
            else:
                state[name] = take(value)
        return {name: take(t) for name, t in tensors.items()}

    def _latents_out(self, latents: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
        """The pipeline's latent output -> what its VAE decode path starts from."""
        return latents

    def decode(
        self, latents: np.ndarray, tile_scale: float = 0.0, tile_size: int | None = None
    ) -> np.ndarray:
        """Latents of one shape -> uint8 frames (N, T, H, W, 3); T is 1 for image models.

        `tile_scale` 0 decodes whole frames; otherwise diffusers' tiled decoding with tiles of
        `tile_scale` times `tile_size` pixels (default: the VAE's own tile size), blended at the
        seams. Raises the device's out-of-memory error (see `is_out_of_memory`).
        """
        import torch

        vae = self.pipe.vae
        self._set_tiling(tile_scale, tile_size)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(latents)).to(self.pipe._execution_device, vae.dtype)
            decoded = self._vae_decode(x)
            if self.is_image_model:
                frames = self.pipe.image_processor.postprocess(decoded, output_type="np")[:, None]
            else:
                frames = self.pipe.video_processor.postprocess_video(decoded, output_type="np")
        return to_uint8(frames)

    def _set_tiling(self, scale: float, tile_size: int | None) -> None:
        vae = self.pipe.vae
        if not scale:
            vae.use_tiling = False
            return
        # The VAE's own tile sizes (pixels), remembered before any change; every VAE class names
        # them tile_sample_min_* (and stride_*), with tile_latent_min_* derived from them.
        if not hasattr(self, "_tile_defaults"):
            self._tile_defaults = {
                k: v
                for k, v in vars(vae).items()
                if k.startswith(("tile_sample_min_", "tile_sample_stride_"))
                and not k.endswith("num_frames")
                and isinstance(v, int)
            }
        unit = self.spec.info.vae_scale_factor_spatial
        for name, value in self._tile_defaults.items():
            if tile_size is not None:  # a configured tile size; strides overlap a quarter of it
                value = tile_size * 3 // 4 if "stride" in name else tile_size
            latent = max(2, round(value * scale / unit))
            overlap = getattr(
                vae,
                name.replace("sample_min_size", "overlap_factor").replace("sample_min", "overlap_factor"),
                None,
            )
            if isinstance(overlap, float) and "stride" not in name:
                latent = _seamless_tile(latent, overlap, unit)
            setattr(vae, name, latent * unit)
        for name in list(vars(vae)):
            if name.startswith("tile_latent_min_"):
                setattr(vae, name, getattr(vae, name.replace("latent", "sample")) // unit)
        vae.use_tiling = True

    @staticmethod
    def is_out_of_memory(exc: BaseException) -> bool:
        """Whether `exc` is the device running out of memory (CUDA's or the host's)."""
        return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"

    def free_memory(self) -> None:
        """Release cached device memory after an out-of-memory error."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def available_bytes(self) -> int | None:
        """Free memory of the device this stage runs on; None where it cannot be known (CPU)."""
        import torch

        device = torch.device(self.pipe._execution_device)
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)

    @classmethod
    def vae_channels(cls, spec: ModelSpec) -> int:
        """The widest block of the VAE's decoder: its activations dominate the decode's memory."""
        cfg = spec.read_config("config.json", "vae")
        widths = cfg.get("decoder_block_out_channels") or cfg.get("block_out_channels")
        if widths:
            return int(max(widths))
        return int(cfg.get("base_dim", 96) * max(cfg.get("dim_mult", [1])))

    def output_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(frames, height, width) in pixels that one row of `latent_shape` decodes to."""
        frames, h, w = self.latent_frames_hw(latent_shape)
        info = self.spec.info
        out_frames = 1 if self.is_image_model else (frames - 1) * info.vae_scale_factor_temporal + 1
        return out_frames, h * info.vae_scale_factor_spatial, w * info.vae_scale_factor_spatial

    def latent_frames_hw(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width) of one row's latents, (C, F, h, w) here."""
        if self.is_image_model:
            return 1, latent_shape[-2], latent_shape[-1]
        return latent_shape[1], latent_shape[2], latent_shape[3]

    def latent_shape(self, frames: int, h: int, w: int) -> tuple[int, ...]:
        """The inverse of `latent_frames_hw`: one row's latents for `frames` latent frames."""
        cfg = self.spec.read_config("config.json", "vae")
        channels = int(cfg.get("z_dim") or cfg["latent_channels"])
        return (channels, h, w) if self.is_image_model else (channels, frames, h, w)

    def decode_peak_bytes(
        self, plan: DecodePlan, latent_shape: tuple[int, ...], tile_size: int | None = None
    ) -> int:
        """Estimated peak memory of decoding rows of `latent_shape` with `plan` (a DecodePlan)."""
        from kinoray.models.decode_plan import peak_bytes

        frames, height, width = self.output_shape(latent_shape)
        chunk = min(frames, self.decode_chunk_frames or frames)
        vae = self.pipe.vae
        # The VAE's own tile sizes, as they were before any tiled decode changed them.
        sizes = getattr(self, "_tile_defaults", None) or vars(vae)
        tile_h = tile_size or sizes.get("tile_sample_min_height", sizes.get("tile_sample_min_size"))
        tile_w = tile_size or sizes.get("tile_sample_min_width", sizes.get("tile_sample_min_size"))
        itemsize = 2 if str(vae.dtype) in ("torch.bfloat16", "torch.float16") else 4
        estimate = peak_bytes(
            plan,
            chunk,
            height,
            width,
            self.vae_channels(self.spec),
            itemsize,
            self.decode_memory_factor,
            (chunk, int(tile_h or height), int(tile_w or width)),
        )
        # The decoded clip itself is held whole, however it is decoded.
        return estimate + plan.rows * max(frames - chunk, 0) * height * width * 3 * 4

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (as diffusers' `output_type="np"` gives them) -> uint8."""
    return np.clip(np.round(np.asarray(frames, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _seamless_tile(latent: int, overlap: float, unit: int) -> int:
    """The smallest tile of at least `latent` latent pixels whose stride, in VAEs that derive it
    from an overlap factor (AutoencoderKL, CogVideoX's), is the same in latent and decoded pixels;
    otherwise the tiles diffusers stitches together do not add up to the frame's size."""
    while int(latent * (1 - overlap)) * unit != latent * unit - int(latent * unit * overlap):
        latent += 1
    return latent
