"""The encode stage: prompts -> the family's conditioning arrays, with an LRU cache of texts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from kinoray.models.stages.base import Batch, ModelStage


class TextEncoder(ModelStage):
    """Prompts -> `prompt_embeds` and the family's other conditioning (e.g. attention masks), each
    also as `negative_<name>` for the negative prompt, named as the pipeline's `__call__` takes them.

    A job's negative prompt (usually one text for all rows) and any repeated prompt are encoded
    once: the last `cache_size` texts' embeddings are kept.
    """

    name = "encode"

    def __init__(self, model: Any = None, *, adapter: Any = None, cache_size: int = 1024):
        super().__init__(model, adapter=adapter)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.cache_hits = 0

    def input_columns(self) -> dict[str, str]:
        return {"prompt": "text to generate", "negative_prompt": "text to steer away from"}

    def output_columns(self) -> dict[str, str]:
        out = {}
        for name in self.adapter.conditioning:
            out[name] = f"the prompt's {name}, as the pipeline takes it"
            out[f"negative_{name}"] = f"the negative prompt's {name}"
        return out

    def output_dtypes(self) -> dict[str, np.dtype]:
        # The family's conditioning dtypes, from the empty text (cached: the usual negative prompt).
        first = self.embed([""])[0]
        return {
            **{name: arr.dtype for name, arr in first.items()},
            **{f"negative_{name}": arr.dtype for name, arr in first.items()},
        }

    def embed(self, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Each text's conditioning arrays (one row of each), from the cache where possible."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.cache_hits += len(texts) - len(missing)
        if missing:
            encoded = self.adapter.encode(missing)
            for k, text in enumerate(missing):
                self._cache[text] = {name: arr[k] for name, arr in encoded.items()}
        out = []
        for t in texts:
            self._cache.move_to_end(t)
            out.append(self._cache[t])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def compute(self, batch: Batch, rows: list[int], key: Hashable, **kwargs: Any) -> dict[str, list[Any]]:
        prompts = [str(batch["prompt"][i]) for i in rows]
        negatives = [str(batch["negative_prompt"][i]) for i in rows]
        embeds = self.embed(prompts + negatives)
        out: dict[str, list[Any]] = {}
        for name in self.adapter.conditioning:
            out[name] = [e[name] for e in embeds[: len(rows)]]
            out[f"negative_{name}"] = [e[name] for e in embeds[len(rows) :]]
        return out
