"""Family adapters, one module per diffusers pipeline family."""

from __future__ import annotations

from models.families.base import FamilyAdapter, Stage
from models.families.cogvideox import CogVideoXAdapter
from models.families.flux import FluxAdapter
from models.families.hunyuan import HunyuanVideoAdapter
from models.families.ltx import LTXAdapter
from models.families.sd3 import SD3Adapter
from models.families.wan import WanAdapter
from models.spec import ModelSpec

FAMILIES: dict[str, type[FamilyAdapter]] = {
    a.name: a
    for a in (WanAdapter, CogVideoXAdapter, LTXAdapter, HunyuanVideoAdapter, FluxAdapter, SD3Adapter)
}


def adapter_class(spec: ModelSpec) -> type[FamilyAdapter]:
    return FAMILIES[spec.resolved_family]


def load_adapter(spec: ModelSpec, stage: Stage) -> FamilyAdapter:
    return adapter_class(spec)(spec, stage)


__all__ = ["FAMILIES", "FamilyAdapter", "Stage", "adapter_class", "load_adapter"]
