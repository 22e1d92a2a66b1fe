"""Family adapters, one module per diffusers pipeline family, found by the pipeline class that a
checkpoint's `model_index.json` names. Each module registers its adapter and its tiny presets on
import; every module in this package is imported here."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from kinoray.models.families.base import FAMILIES, FamilyAdapter, StageName
from kinoray.models.spec import ModelError, ModelInfo, ModelSpec

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def adapter_class(spec: ModelSpec) -> type[FamilyAdapter]:
    """The adapter of `spec`'s family: named in the spec, or found by the checkpoint's pipeline class."""
    if spec.family != "auto":
        return next(a for a in FAMILIES.values() if a.name == spec.family)
    cls = spec.model_index.get("_class_name", "")
    if cls not in FAMILIES:
        raise ModelError(
            f"{spec.weights}: pipeline class {cls!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[cls]


@lru_cache(maxsize=64)
def model_info(spec: ModelSpec) -> ModelInfo:
    """What `spec`'s checkpoint accepts, read once per spec from its config files."""
    return adapter_class(spec).model_info(spec)


def load_adapter(spec: ModelSpec, stage: StageName) -> FamilyAdapter:
    """An adapter holding the components of `stage` (and nothing else) of `spec`'s pipeline."""
    return adapter_class(spec)(spec, stage)


def load_pipeline(spec: ModelSpec) -> object:
    """The family's whole diffusers pipeline, loaded as its users load it (all components)."""
    import diffusers

    pipe = getattr(diffusers, adapter_class(spec).pipeline_class).from_pretrained(
        spec.path, revision=spec.revision, dtype=spec.torch_dtype()
    )
    pipe.to(spec.torch_device())
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "StageName",
    "adapter_class",
    "load_adapter",
    "load_pipeline",
    "model_info",
]
