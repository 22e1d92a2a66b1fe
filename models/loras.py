"""LoRA adapters: the deployment's catalog, the adapters a denoiser replica holds (an LRU), and
tiny adapters made offline for tests and demos.

A request names adapters of the catalog (`loras:` in the config) with scales; it never names a
path. The denoiser loads them on first use through diffusers' PEFT integration
(`load_lora_weights`, `set_adapters`, `delete_adapters`) into the transformer it already holds,
keeps the last `max_loras` of them, and switches between them per call: the base model is
never reloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kinoray.models import telemetry, tiny
from kinoray.models.request import LORA_NAME_PATTERN, LoraRef

if TYPE_CHECKING:
    from kinoray.models.families.base import FamilyAdapter
    from kinoray.models.spec import ModelSpec

# `tiny-lora-<seed>`: a random adapter for the served model's transformer, built offline;
# `tiny-lora-te-<seed>` adapts the text encoders too, where the family's loader takes them.
TINY_LORA = re.compile(r"^tiny-lora-(te-)?(\d{1,9})$")
LORA_FILE = "pytorch_lora_weights.safetensors"
# How long a failed load is remembered: rows naming a missing adapter fail at once, not after
# one slow attempt each, and a fixed file or a hub back up is picked up again soon.
FAILED_LOAD_TTL_S = 60.0


class LoraSource(BaseModel):
    """Where one catalog adapter's weights are: `weights` is a folder holding
    `pytorch_lora_weights.safetensors` (what diffusers' `save_lora_weights` writes), a
    `.safetensors` file, a Hugging Face hub id (with `weight_name` when the repository holds
    several files), or `tiny-lora-<seed>` (a random adapter, for trying the feature out).
    `weights_2` is the low-noise expert's adapter of a two-expert checkpoint (Wan 2.2 A14B),
    loaded under the same name into its `transformer_2`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = Field(min_length=1, description="folder, .safetensors file, hub id or tiny-lora-<seed>")
    weight_name: str | None = Field(default=None, description="file in the folder or hub repository")
    revision: str | None = Field(default=None, description="hub revision")
    weights_2: str | None = Field(default=None, description="adapter of Wan 2.2's low-noise transformer_2")
    weight_name_2: str | None = None

    @field_validator("weights", "weights_2")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        # A local path that is not there fails when the config loads, not at the first request.
        if v is not None and v.startswith((os.sep, ".", "~")) and not os.path.exists(os.path.expanduser(v)):
            raise ValueError(f"no such file or folder: {v}")
        return v


def catalog_entries(catalog: Mapping[str, Any]) -> dict[str, Any]:
    """The `loras:` section with each plain string as its source's `weights`.

    Raises ValueError naming a key that is not an adapter name (requests use them as names)."""
    out = {}
    for name, source in catalog.items():
        if not isinstance(name, str) or not LORA_NAME_PATTERN.match(name):
            raise ValueError(f"{name!r}: an adapter name is 1-64 letters, digits, '.', '_' or '-'")
        out[name] = {"weights": source} if isinstance(source, str) else source
    return out


def check_catalog(catalog: Mapping[str, Any]) -> dict[str, LoraSource]:
    """The `loras:` section (name -> `LoraSource`, its dict, or its `weights` string), validated."""
    return {name: LoraSource.model_validate(source) for name, source in catalog_entries(catalog).items()}


def lora_location(source: LoraSource, spec: ModelSpec, second: bool = False) -> tuple[str, dict[str, Any]]:
    """(what `load_lora_weights` takes, its keyword arguments) for one catalog source."""
    weights = source.weights_2 if second else source.weights
    weight_name = source.weight_name_2 if second else source.weight_name
    assert weights is not None
    match = TINY_LORA.match(weights)
    if match:
        return str(tiny_lora(spec, int(match.group(2)), bool(match.group(1)))), {"weight_name": LORA_FILE}
    local = os.path.expanduser(weights)
    if os.path.isfile(local):  # a single file: diffusers takes its folder and its name
        return os.path.dirname(os.path.abspath(local)), {"weight_name": os.path.basename(local)}
    kwargs: dict[str, Any] = {}
    if weight_name:
        kwargs["weight_name"] = weight_name
    if source.revision and not os.path.isdir(local):
        kwargs["revision"] = source.revision
    return (local if os.path.isdir(local) else weights), kwargs


def tiny_lora(spec: ModelSpec, seed: int, text_encoders: bool = False, rank: int = 4) -> Path:
    """A random rank-`rank` LoRA adapter for `spec`'s transformer (and, with `text_encoders`,
    for the text encoders its family's LoRA loader adapts), made with peft and saved with the
    family pipeline's `save_lora_weights`, as training scripts save theirs. It adapts the
    attention projections, which every family's transformer (`to_q`, `to_k`, `to_v`,
    `to_out.0`) and CLIP text encoder (`q_proj`, `k_proj`, `v_proj`, `out_proj`) has. Built
    once into the cache, named by the model's configs and the arguments."""
    import diffusers

    pipeline_cls = getattr(diffusers, spec.model_index["_class_name"])
    components = ["transformer"]
    if text_encoders:
        components += [
            c for c in getattr(pipeline_cls, "_lora_loadable_modules", []) if c.startswith("text_encoder")
        ]
    configs = [sorted(spec.read_config("config.json", c).items()) for c in components]
    digest = hashlib.sha256(f"{spec.identity}:{configs}:{seed}:{rank}".encode()).hexdigest()
    dest = tiny.cache_dir() / "loras" / f"tiny-lora-{'te-' if text_encoders else ''}{seed}-{digest[:12]}"
    if (dest / LORA_FILE).exists():
        return dest

    def write(tmp: Path) -> None:
        import torch
        import transformers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        layers = {}
        for k, component in enumerate(components):
            library, cls = spec.model_index[component]
            module = getattr(diffusers if library == "diffusers" else transformers, cls).from_pretrained(
                spec.path, subfolder=component
            )
            targets = ["to_q", "to_k", "to_v", "to_out.0"] if component == "transformer" else None
            torch.manual_seed(seed * 10 + k)
            module.add_adapter(
                LoraConfig(
                    r=rank,
                    lora_alpha=rank,
                    target_modules=targets or ["q_proj", "k_proj", "v_proj", "out_proj"],
                    init_lora_weights=False,  # random A and B: an untrained adapter that changes the output
                )
            )
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(module)
        pipeline_cls.save_lora_weights(tmp, **layers)

    return tiny.write_folder(dest, write, marker=LORA_FILE)


class LoraError(Exception):
    """An adapter of the catalog that could not be loaded; the message says which and why."""


class LoraCache:
    """The adapters one denoiser holds, least recently used first, at most `capacity`.

    `applied(refs)` makes exactly `refs` (at their scales) the active adapters of the
    adapter's pipeline for the duration of a `with` block, loading those not held and evicting
    the least recently used ones that the call does not need; `()` runs the base model. One
    block at a time: a load changes the transformer's modules, which no running call may see.
    Loads, hits and evictions are counted per adapter name (`kinoray_lora_*_total`, and
    `stats()`).
    """

    def __init__(self, adapter: FamilyAdapter, catalog: Mapping[str, LoraSource], capacity: int):
        self.adapter = adapter
        self.catalog = dict(catalog)
        self.capacity = capacity
        # name -> whether it has weights for this stage (an encoder holds transformer-only
        # adapters as nothing: it remembers that it need not read them again)
        self.held: OrderedDict[str, bool] = OrderedDict()
        self.loads: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.evictions: dict[str, int] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._active: tuple[LoraRef, ...] | None = ()  # a model starts with no adapter
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def applied(self, refs: Iterable[LoraRef]) -> Iterator[tuple[LoraRef, ...]]:
        """`refs` active inside the block, which gets those of them that have weights for this
        stage. Raises LoraError for one that cannot be loaded."""
        refs = tuple(refs)
        with self._lock:
            for ref in refs:
                self._hold(ref.name, keep={r.name for r in refs})
            effective = tuple(r for r in refs if self.held[r.name])
            if effective != self._active:
                self.adapter.set_loras(effective)
                self._active = effective
            yield effective

    def _hold(self, name: str, keep: set[str]) -> None:
        if name in self.held:
            self.held.move_to_end(name)
            self.hits[name] = self.hits.get(name, 0) + 1
            telemetry.inc("kinoray_lora_hits_total", lora=name, stage=self.adapter.stage or "")
            return
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() - failed[0] < FAILED_LOAD_TTL_S:
            raise LoraError(failed[1])
        while len(self.held) >= self.capacity:
            victim = next((n for n in self.held if n not in keep), None)
            if victim is None:
                break
            del self.held[victim]
            self.adapter.delete_lora(victim)
            self._active = None
            self.evictions[victim] = self.evictions.get(victim, 0) + 1
            telemetry.inc("kinoray_lora_evictions_total", lora=victim, stage=self.adapter.stage or "")
        if name not in self.catalog:
            raise LoraError(f"lora: unknown adapter {name!r}")
        source = self.catalog[name]
        try:
            has_weights = self.adapter.load_lora(name, source)
        except Exception as exc:
            self.adapter.delete_lora(name)  # a half-loaded adapter must not stay in the model
            message = f"lora: cannot load adapter {name!r} ({source.weights}): {type(exc).__name__}: {exc}"
            self._failed[name] = (time.monotonic(), message)
            raise LoraError(message) from None
        self._failed.pop(name, None)
        self._active = None
        self.held[name] = has_weights
        self.loads[name] = self.loads.get(name, 0) + 1
        telemetry.inc("kinoray_lora_loads_total", lora=name, stage=self.adapter.stage or "")

    def stats(self) -> dict[str, Any]:
        """Held adapters (least recently used first) and loads, hits and evictions by name."""
        return {
            "held": list(self.held),
            "loads": dict(self.loads),
            "hits": dict(self.hits),
            "evictions": dict(self.evictions),
        }
