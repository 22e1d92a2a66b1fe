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
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kinoray.models import telemetry, tiny
from kinoray.models.request import LORA_NAME_PATTERN, LoraRef
from kinoray.models.spec import ModelError, hub_file

if TYPE_CHECKING:
    from kinoray.models.families.base import FamilyAdapter
    from kinoray.models.spec import ModelSpec

log = logging.getLogger(__name__)

# `tiny-lora-<seed>`: a random adapter for the served model's transformer, built offline;
# `tiny-lora-te-<seed>` adapts the text encoders too, where the family's loader takes them.
TINY_LORA = re.compile(r"^tiny-lora-(te-)?(\d{1,9})$")
LORA_FILE = "pytorch_lora_weights.safetensors"
# How long a failed load is remembered: rows naming a missing adapter fail at once, not after
# one slow attempt each, and a fixed file or a hub back up is picked up again soon.
FAILED_LOAD_TTL_S = 60.0


# A Hugging Face hub repository: `org/name`.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoraSource(BaseModel):
    """Where one catalog adapter's weights are: `weights` is a folder holding a `.safetensors`
    file (`pytorch_lora_weights.safetensors` is what diffusers' `save_lora_weights` writes; name
    another with `weight_name`), a `.safetensors` file, a Hugging Face hub id `org/name` (with
    `weight_name` when the repository holds several files, and `revision`), or
    `tiny-lora-<seed>` (a random adapter, for trying the feature out). Relative paths are
    relative to the working directory, as every path of a config. `weights_2` is the low-noise
    expert's adapter of a two-expert checkpoint (Wan 2.2 A14B), loaded under the same name into
    its `transformer_2`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = Field(min_length=1, description="folder, .safetensors file, hub id or tiny-lora-<seed>")
    weight_name: str | None = Field(default=None, description="file in the folder or hub repository")
    revision: str | None = Field(default=None, description="hub revision")
    weights_2: str | None = Field(default=None, description="adapter of Wan 2.2's low-noise transformer_2")
    weight_name_2: str | None = None

    @field_validator("weights", "weights_2")
    @classmethod
    def _where(cls, v: str | None) -> str | None:
        # Anything that cannot be loaded fails when the config loads, not at the first request.
        if v is None or TINY_LORA.match(v):
            return v
        local = os.path.expanduser(v)
        if v.startswith((os.sep, ".", "~")) or os.path.exists(local):
            if not os.path.exists(local):
                raise ValueError(f"no such file or folder: {v}")
            if os.path.isfile(local) and not local.endswith(".safetensors"):
                raise ValueError(f"{v} is not a .safetensors file")
            return v
        if v.startswith("tiny-lora-"):
            raise ValueError(
                f"{v!r}: a tiny adapter is tiny-lora-<seed> (or tiny-lora-te-<seed>), seed up to 9 digits"
            )
        if not HUB_ID.match(v):
            raise ValueError(
                f"{v!r} is not a local folder or .safetensors file, a hub id (org/name) or tiny-lora-<seed>"
            )
        return v

    @model_validator(mode="after")
    def _folder_holds_weights(self) -> LoraSource:
        for field, weights, weight_name in (
            ("weights", self.weights, self.weight_name),
            ("weights_2", self.weights_2, self.weight_name_2),
        ):
            folder = os.path.expanduser(weights or "")
            if weights is None or not os.path.isdir(folder):
                continue
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if weight_name is not None and weight_name not in files:
                raise ValueError(f"{field}: {weights} has no {weight_name}")
            if not files:
                raise ValueError(f"{field}: {weights} holds no .safetensors file")
            if weight_name is None and len(files) > 1 and LORA_FILE not in files:
                raise ValueError(f"{field}: {weights} holds {', '.join(files)}; name one as weight_name")
        return self

    @property
    def identity(self) -> str:
        """What this source is, as part of a request's digest: its fields as given."""
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True)


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
    """(the folder `load_lora_weights` reads, its keyword arguments) for one catalog source; a
    hub adapter is downloaded first (or found in the local cache). Raises ModelError saying
    what to do when the hub cannot be reached and the cache does not hold it."""
    weights = source.weights_2 if second else source.weights
    weight_name = source.weight_name_2 if second else source.weight_name
    assert weights is not None
    match = TINY_LORA.match(weights)
    if match:
        return str(tiny_lora(spec, int(match.group(2)), bool(match.group(1)))), {"weight_name": LORA_FILE}
    local = os.path.expanduser(weights)
    if os.path.isfile(local):
        path = local
    elif os.path.isdir(local):
        files = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
        name = weight_name or (LORA_FILE if LORA_FILE in files or not files else files[0])
        path = os.path.join(local, name)
    else:
        path = hub_file(
            weights, weight_name or _hub_weight_name(weights, source.revision), None, source.revision
        )
    # diffusers takes a folder and a file name in it.
    return os.path.dirname(os.path.abspath(path)), {"weight_name": os.path.basename(path)}


def _hub_weight_name(repo: str, revision: str | None) -> str:
    """The adapter file of hub repository `repo`: its only .safetensors file, or diffusers' name."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return LORA_FILE
    try:
        files = [f for f in HfApi().list_repo_files(repo, revision=revision) if f.endswith(".safetensors")]
    except Exception as exc:
        if type(exc).__name__ in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
            raise ModelError(f"{repo}: {type(exc).__name__} on the Hugging Face hub") from None
        raise ModelError(
            f"cannot reach the Hugging Face hub to list {repo}'s files: check the network (HF_ENDPOINT "
            "for a mirror), or set weight_name, so that the local cache is used when the hub is down"
        ) from None
    if LORA_FILE in files or not files:
        return LORA_FILE
    if len(files) > 1:
        raise ModelError(f"{repo} holds {', '.join(files[:8])}: name one as weight_name")
    return files[0]


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
    """The adapters one stage holds, least recently used first, at most `capacity`.

    `applied(refs)` makes exactly `refs` (at their scales) the active adapters of the
    adapter's pipeline for the duration of a `with` block, loading those not held and evicting
    the least recently used ones that the call does not need; `()` runs the base model. One
    block at a time: a load changes the transformer's modules, which no running call may see.
    Loads, hits and evictions are counted per adapter name (`kinoray_lora_*_total`, and
    `stats()`).

    With `hotswap` (a compiled transformer), adapters live in `capacity` fixed slots (`slot0`,
    ...): a new adapter replaces the evicted one's weights in place (diffusers' hot swap), every
    loaded slot stays active, and those a call does not use are set to scale 0 rather than
    disabled. The compiled graph then changes only while slots fill up, never as adapters or
    scales change.
    """

    def __init__(
        self,
        adapter: FamilyAdapter,
        catalog: Mapping[str, LoraSource],
        capacity: int,
        hotswap: bool = False,
    ):
        self.adapter = adapter
        self.catalog = dict(catalog)
        self.capacity = capacity
        self.hotswap = hotswap
        # catalog name -> its name inside the model (the catalog name, or its slot), or None
        # when it has no weights for this stage (an encoder remembers a transformer-only
        # adapter as nothing, so as not to read it again)
        self.held: OrderedDict[str, str | None] = OrderedDict()
        self.loads: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.evictions: dict[str, int] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._active: dict[str, float] | None = {}  # a model starts with no adapter
        self._slots: list[str] = []  # hot swap: the slots loaded so far
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def applied(self, refs: Iterable[LoraRef]) -> Iterator[tuple[LoraRef, ...]]:
        """`refs` active inside the block, which gets those of them that have weights for this
        stage. Raises LoraError for one that cannot be loaded."""
        refs = tuple(refs)
        with self._lock:
            for ref in refs:
                self._hold(ref.name, keep={r.name for r in refs})
            effective = tuple(r for r in refs if self.held[r.name] is not None)
            weights = dict.fromkeys(self._slots, 0.0) if self.hotswap else {}
            weights.update({self.held[r.name]: r.scale for r in effective})  # type: ignore[misc]
            if weights != self._active:
                self.adapter.set_loras(weights)
                self._active = weights
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
        if name not in self.catalog:
            raise LoraError(f"lora: unknown adapter {name!r}")
        slot, swap = self._make_room(keep)
        source = self.catalog[name]
        try:
            try:
                has_weights = self.adapter.load_lora(name, source, adapter_name=slot or name, hotswap=swap)
            except Exception:
                if not swap or slot is None:
                    raise
                # An adapter that adapts other layers than the slot's last one cannot be swapped
                # in: the slot is loaded afresh (the compiled graph changes once more).
                self.adapter.delete_lora(slot)
                has_weights = self.adapter.load_lora(name, source, adapter_name=slot)
        except Exception as exc:
            self.adapter.delete_lora(slot or name)  # a half-loaded adapter must not stay in the model
            if slot in self._slots:
                self._slots.remove(slot)
            log.debug("cannot load LoRA adapter %s from %s", name, source.weights, exc_info=True)
            first = (str(exc).strip().splitlines() or [""])[0]
            first = first if len(first) <= 300 else first[:297] + "..."
            message = f"lora: cannot load adapter {name!r}: {type(exc).__name__}: {first}"
            self._failed[name] = (time.monotonic(), message)
            self._active = None
            raise LoraError(message) from None
        self._failed.pop(name, None)
        self._active = None
        self.held[name] = (slot or name) if has_weights else None
        if slot and has_weights and slot not in self._slots:
            self._slots.append(slot)
        self.loads[name] = self.loads.get(name, 0) + 1
        telemetry.inc("kinoray_lora_loads_total", lora=name, stage=self.adapter.stage or "")

    def _make_room(self, keep: set[str]) -> tuple[str | None, bool]:
        """Evict least recently used adapters (not in `keep`) down to one free place: (the slot
        to load into, whether it is swapped in place); no slot without hot swap."""
        free = None
        while len(self.held) >= self.capacity:
            victim = next((n for n in self.held if n not in keep), None)
            if victim is None:
                break
            where = self.held.pop(victim)
            if self.hotswap and where is not None:
                free = where  # the new adapter's weights replace the victim's in place
            elif where is not None:
                self.adapter.delete_lora(where)
            self._active = None
            self.evictions[victim] = self.evictions.get(victim, 0) + 1
            telemetry.inc("kinoray_lora_evictions_total", lora=victim, stage=self.adapter.stage or "")
        if not self.hotswap:
            return None, False
        if free is not None:
            return free, True
        used = set(self._slots)
        return next(f"slot{k}" for k in range(self.capacity + 1) if f"slot{k}" not in used), False

    def stats(self) -> dict[str, Any]:
        """Held adapters (least recently used first) and loads, hits and evictions by name."""
        return {
            "held": list(self.held),
            "slots": {name: where for name, where in self.held.items()} if self.hotswap else {},
            "loads": dict(self.loads),
            "hits": dict(self.hits),
            "evictions": dict(self.evictions),
        }
