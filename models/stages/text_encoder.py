"""The encode stage: prompts (and reference images) -> the family's conditioning arrays, with an
LRU cache of texts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from kinoray.models.images import ImageError, ImagePolicy, fit_image, load_image
from kinoray.models.loras import LoraCache, LoraError, check_catalog
from kinoray.models.request import LoraRef, lora_text
from kinoray.models.stages.base import Batch, ModelStage, RowError, loras_of, reference_image, scalar
from kinoray.models.stages.denoiser import sampling_of


class TextEncoder(ModelStage):
    """Prompts -> `prompt_embeds` and the family's other conditioning (e.g. attention masks), each
    also as `negative_<name>` for the negative prompt, named as the pipeline's `__call__` takes them.
    For image-to-video models, each row's reference image (`image`, read here: never by the
    driver) -> the family's image conditioning (`adapter.image_conditioning`) and `image_sha256`.

    A job's negative prompt (usually one text for all rows) and any repeated prompt are encoded
    once: the last `cache_size` texts' embeddings are kept. `image_policy` (an `ImagePolicy` or
    its dict) bounds the images read.

    In families whose LoRA adapters may adapt the text encoder (FLUX.1, SD3), rows are encoded
    under their adapters (`loras`, the catalog; an LRU of `max_loras`), grouped by adapter set;
    an adapter without text-encoder weights leaves the embeddings as they are.
    """

    name = "encode"

    def __init__(
        self,
        model: Any = None,
        *,
        adapter: Any = None,
        cache_size: int = 1024,
        image_policy: ImagePolicy | dict[str, Any] | None = None,
        loras: Mapping[str, Any] | None = None,
        max_loras: int = 4,
    ):
        super().__init__(model, adapter=adapter)
        self.cache_size = cache_size
        # (text, the JSON of the adapters it was encoded under) -> its arrays
        self._cache: OrderedDict[tuple[str, str | None], dict[str, np.ndarray]] = OrderedDict()
        self.cache_hits = 0
        self.image_policy = ImagePolicy.model_validate(image_policy or {})
        adapts = bool(loras) and bool(getattr(self.adapter, "text_encoder_loras", ()))
        self.loras = LoraCache(self.adapter, check_catalog(loras or {}), max_loras) if adapts else None

    def input_columns(self) -> dict[str, str]:
        cols = {"prompt": "text to generate", "negative_prompt": "text to steer away from"}
        if self.adapter.image_conditioning:
            cols.update(image="reference image: a path, URL or data: URL", seed="seed (VAEs that sample)")
            cols.update(height="frame height", width="frame width", num_frames="frames in the clip")
        return cols

    def output_columns(self) -> dict[str, str]:
        out = {}
        for name in self.adapter.conditioning:
            out[name] = f"the prompt's {name}, as the pipeline takes it"
            out[f"negative_{name}"] = f"the negative prompt's {name}"
        for name in self.adapter.image_conditioning:
            out[name] = f"the reference image's {name}"
        if self.adapter.image_conditioning:
            out["image_sha256"] = "SHA-256 of the reference image's file, hex"
        return out

    def output_dtypes(self) -> dict[str, np.dtype]:
        # The family's conditioning dtypes, from the empty text (cached: the usual negative prompt).
        first = self.embed([""])[0]
        return {
            **{name: arr.dtype for name, arr in first.items()},
            **{f"negative_{name}": arr.dtype for name, arr in first.items()},
            **{
                name: np.dtype(self.adapter.image_dtypes.get(name, "float32"))
                for name in self.adapter.image_conditioning
            },
        }

    def group_key(self, batch: Batch, i: int) -> Hashable:
        return loras_of(batch, i) if self.loras is not None else None

    def embed(self, texts: Sequence[str], lora: tuple[LoraRef, ...] = ()) -> list[dict[str, np.ndarray]]:
        """Each text's conditioning arrays (one row of each), from the cache where possible;
        `lora`: the adapters active in the text encoder while it encodes them. Raises LoraError
        for an adapter that cannot be loaded."""
        if self.loras is None:
            return self._embed(texts, None)
        with self.loras.applied(lora) as effective:
            return self._embed(texts, lora_text(effective))

    def _embed(self, texts: Sequence[str], tag: str | None) -> list[dict[str, np.ndarray]]:
        missing = list(dict.fromkeys(t for t in texts if (t, tag) not in self._cache))
        self.cache_hits += len(texts) - len(missing)
        if missing:
            encoded = self.adapter.encode(missing)
            for k, text in enumerate(missing):
                self._cache[(text, tag)] = {name: arr[k] for name, arr in encoded.items()}
        out = []
        for t in texts:
            self._cache.move_to_end((t, tag))
            out.append(self._cache[(t, tag)])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def compute(self, batch: Batch, rows: list[int], key: Hashable, **kwargs: Any) -> dict[str, list[Any]]:
        prompts = [str(batch["prompt"][i]) for i in rows]
        negatives = [str(batch["negative_prompt"][i]) for i in rows]
        try:
            embeds = self.embed(prompts + negatives, key if isinstance(key, tuple) else ())
        except LoraError as exc:
            raise RowError("lora_unavailable", str(exc)) from None
        out: dict[str, list[Any]] = {}
        for name in self.adapter.conditioning:
            out[name] = [e[name] for e in embeds[: len(rows)]]
            out[f"negative_{name}"] = [e[name] for e in embeds[len(rows) :]]
        if self.adapter.image_conditioning:
            out.update(self._encode_images(batch, rows))
        return out

    def _encode_images(self, batch: Batch, rows: list[int]) -> dict[str, list[Any]]:
        names = self.adapter.image_conditioning
        out: dict[str, list[Any]] = {name: [] for name in (*names, "image_sha256")}
        for i in rows:
            ref = reference_image(batch, i)
            if ref is None:  # text-to-video on a model that takes either
                for values in out.values():
                    values.append(None)
                continue
            sampling = sampling_of(batch, i)
            try:
                image, digest = load_image(ref, self.image_policy)
                image = fit_image(image, sampling.width, sampling.height, self.image_policy.resize)
            except ImageError as exc:
                error = RowError("invalid_image", f"image: {exc}")
                for values in out.values():
                    values.append(error)
                continue
            seed, prompt = int(scalar(batch["seed"][i])), str(batch["prompt"][i])
            arrays = self.adapter.encode_image(image, sampling, seed, prompt)
            for name in names:
                out[name].append(arrays[name])
            out["image_sha256"].append(digest)
        return out
