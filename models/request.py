"""One generation request, validated once for both front ends.

A request always carries concrete values: missing fields are filled from the model's defaults
before validation, and the limits of the model family (size multiples, frame counts the VAE can
take, step range) are checked here so that a bad request fails with the field it is about.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator

# Ids name output files and storage keys: a conservative charset rules out path traversal.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RequestLimits(BaseModel):
    """What a model family (and the loaded checkpoint) can take."""

    model_config = ConfigDict(frozen=True)

    size_multiple: int = 16
    min_size: int = 16
    max_size: int = 2048
    # Video VAEs take 1 + k * frame_step frames (Wan: 4; CogVideoX: 8, its VAE decodes latent pairs).
    frame_step: int = 4
    max_frames: int = 257
    # Work and memory grow with height x width x frames: one request must not be able to take a
    # replica down. The default admits 1280x720 at 129 frames.
    max_pixel_frames: int = 1280 * 720 * 129
    max_steps: int = 200
    max_prompt_chars: int = 4000
    max_guidance_scale: float = 50.0
    max_fps: int = 120


class RequestDefaults(BaseModel):
    """Values a request takes for fields it leaves out."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str = ""
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    num_inference_steps: int = 50
    guidance_scale: float = 5.0


class RequestError(ValueError):
    """A request that cannot be generated; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    @classmethod
    def from_validation(cls, exc: ValidationError) -> RequestError:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        messages = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            messages.append(f"{loc}: {msg}" if loc else msg)
        return cls("; ".join(messages), field)


StrictText = Annotated[str, Strict()]


class GenerationRequest(BaseModel):
    """A fully specified request: prompt, shape, sampling parameters and seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: StrictText
    negative_prompt: StrictText = ""
    height: int
    width: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int = Field(ge=0, lt=2**63)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_PATTERN.match(v):
            raise ValueError(
                "must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        limits = _limits(info)
        if info.field_name == "prompt" and not v.strip():
            raise ValueError("must not be empty")
        if len(v) > limits.max_prompt_chars:
            raise ValueError(f"is {len(v)} characters; the limit is {limits.max_prompt_chars}")
        if "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v < lim.min_size or v > lim.max_size:
            raise ValueError(f"must be between {lim.min_size} and {lim.max_size} (got {v})")
        if v % lim.size_multiple:
            raise ValueError(f"must be a multiple of {lim.size_multiple} for this model (got {v})")
        return v

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v < 1 or v > lim.max_frames:
            raise ValueError(f"must be between 1 and {lim.max_frames} (got {v})")
        if (v - 1) % lim.frame_step:
            raise ValueError(f"must be 1 + a multiple of {lim.frame_step} for this model's VAE (got {v})")
        h, w = info.data.get("height"), info.data.get("width")
        if h and w and h * w * v > lim.max_pixel_frames:
            raise ValueError(
                f"{w}x{h} at {v} frames is {h * w * v} pixel-frames; this deployment's limit is {lim.max_pixel_frames}"
            )
        return v

    @field_validator("fps")
    @classmethod
    def _fps(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v < 1 or v > lim.max_fps:
            raise ValueError(f"must be between 1 and {lim.max_fps} (got {v})")
        return v

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v < 1 or v > lim.max_steps:
            raise ValueError(f"must be between 1 and {lim.max_steps} (got {v})")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float, info: ValidationInfo) -> float:
        lim = _limits(info)
        if not (0.0 <= v <= lim.max_guidance_scale):
            raise ValueError(f"must be between 0 and {lim.max_guidance_scale} (got {v})")
        return v


def _limits(info: ValidationInfo) -> RequestLimits:
    ctx = info.context or {}
    return ctx.get("limits") or RequestLimits()


CONTENT_FIELDS = (
    "prompt",
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "fps",
    "num_inference_steps",
    "guidance_scale",
)


def content_hash(values: dict[str, Any]) -> str:
    """A stable digest of what a request asks for (not its id or seed)."""
    canon = json.dumps({k: values.get(k) for k in CONTENT_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()


def build_request(
    raw: dict[str, Any],
    defaults: RequestDefaults,
    limits: RequestLimits,
) -> GenerationRequest:
    """Fill missing fields from `defaults`, give an id and seed where absent, and validate.

    Ids and seeds default to digests of the content, so the same row always yields the same
    video: reruns and resumed jobs reproduce their outputs exactly.
    """
    known = set(GenerationRequest.model_fields)
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    values = {k: v for k, v in raw.items() if not _missing(v)}
    for name, value in defaults.model_dump().items():
        values.setdefault(name, value)
    if "prompt" not in values:
        raise RequestError("prompt: field required", "prompt")
    if "id" in values and not isinstance(values["id"], str):
        values["id"] = str(values["id"])
    # Validate first, then derive id and seed from the validated content: "64" in a CSV and 64
    # in a JSONL file are the same request and get the same id and seed.
    placeholders = {"id": "pending", "seed": 0}
    try:
        req = GenerationRequest.model_validate({**placeholders, **values}, context={"limits": limits})
    except ValidationError as exc:
        raise RequestError.from_validation(exc) from None
    digest = content_hash(req.model_dump())
    derived = {"id": digest[:16], "seed": int(digest[16:31], 16)}
    return req.model_copy(update={k: v for k, v in derived.items() if k not in values})


def _missing(v: Any) -> bool:
    # Table readers give None for empty cells; float NaN marks a missing number in pandas-made files.
    return v is None or (isinstance(v, float) and v != v)
