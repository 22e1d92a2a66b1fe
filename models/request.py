"""The request contract: one generation request, validated once for every front end.

`SamplingParams` is what the denoiser needs besides text embeddings and a seed: a frozen,
hashable value that is both the denoiser's grouping key and the one argument of a family
adapter's `denoise`. `GenerationRequest` adds what makes one request: id, prompt, negative
prompt, seed. Table columns, manifest columns, CLI flags and HTTP body fields are all derived
from these two models (`REQUEST_COLUMNS`, `request_fields`): a new sampling parameter is added
here, once, and used by the family adapter that knows it.

What a model can take (`RequestLimits`) and the values a request takes for the fields it
leaves out (`RequestDefaults`) come from the checkpoint's configs, then the deployment's
config; `RequestBuilder` holds both and turns raw values into a validated request.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic.fields import FieldInfo

# Ids name output files and storage keys: a conservative charset rules out path traversal.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_SEED = 2**63

StrictText = Annotated[str, Strict()]


class RequestLimits(BaseModel):
    """What a checkpoint (and the deployment serving it) can take.

    `size_multiple` and `frame_step` follow from the VAE's compression and the transformer's
    patch size; `max_size` and `max_frames` from the transformer's positional capacity (e.g.
    Wan's rotary table) or what the checkpoint declares; `optional_params` lists the
    family-specific sampling parameters (such as Wan 2.2's `guidance_scale_2`) it accepts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    optional_params: frozenset[str] = frozenset()
    # Whether requests give a reference image: never (text-to-video), either way (Wan 2.2 TI2V,
    # LTX-Video) or always (the image-to-video checkpoints of Wan 2.1, Wan 2.2 A14B, CogVideoX).
    image_input: Literal["none", "optional", "required"] = "none"
    # LoRA adapters of the deployment's catalog (`loras:`) that requests may name, and how many
    # one request may combine (no more than a denoiser replica keeps loaded).
    lora_names: frozenset[str] = frozenset()
    max_loras: int = 4

    def tightened(self, overrides: LimitOverrides) -> RequestLimits:
        """These limits, narrowed (never widened) by a deployment's `limits:` section."""
        changes: dict[str, Any] = {}
        for name, value in overrides.model_dump(exclude_none=True).items():
            current = getattr(self, name)
            changes[name] = max(current, value) if name.startswith("min_") else min(current, value)
        return self.model_copy(update=changes)


class LimitOverrides(BaseModel):
    """The `limits:` section of a config: tighter bounds than the model's own."""

    model_config = ConfigDict(extra="forbid")

    min_size: int | None = Field(default=None, ge=1)
    max_size: int | None = Field(default=None, ge=1)
    max_frames: int | None = Field(default=None, ge=1)
    max_pixel_frames: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_prompt_chars: int | None = Field(default=None, ge=1)
    max_guidance_scale: float | None = Field(default=None, ge=0)
    max_fps: int | None = Field(default=None, ge=1)


def _limits(info: ValidationInfo) -> RequestLimits:
    ctx = info.context or {}
    return ctx.get("limits") or RequestLimits()


def _no_bool(v: Any) -> Any:
    # pydantic's lax mode reads true as 1: in a table or a body it is a wrong type, not a number.
    if isinstance(v, bool):
        raise ValueError("must be a number, not true or false")
    return v


class SamplingParams(BaseModel):
    """Shape and sampling parameters of a request: the denoiser's grouping key.

    Rows with equal `SamplingParams` share one denoiser call. Fields whose schema carries
    `optional_param` are family-specific: `None` means the family's own default, and a value is
    refused by checkpoints whose limits do not list the field in `optional_params`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(description="frame height in pixels")
    width: int = Field(description="frame width in pixels")
    num_frames: int = Field(description="frames in the clip; 1 makes a still image (PNG)")
    fps: int = Field(description="frames per second of the written video (LTX-Video also conditions on it)")
    num_inference_steps: int = Field(description="denoising steps", json_schema_extra={"cli": "--steps"})
    guidance_scale: float = Field(
        description="classifier-free guidance scale (distilled guidance for FLUX.1 and HunyuanVideo)"
    )
    guidance_scale_2: float | None = Field(
        default=None,
        description="guidance scale of Wan 2.2's low-noise expert (default: guidance_scale)",
        json_schema_extra={"optional_param": True},
    )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SamplingParams:
        """The sampling parameters of a flat row of validated values (see `GenerationRequest.from_row`)."""
        values: dict[str, Any] = {k: _plain(row[k]) for k in cls.model_fields}
        return cls.model_construct(**values)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, v: Any) -> Any:
        return _no_bool(v)

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v < lim.min_size or v > lim.max_size:
            raise ValueError(f"must be between {lim.min_size} and {lim.max_size} for this model (got {v})")
        if v % lim.size_multiple:
            raise ValueError(f"must be a multiple of {lim.size_multiple} for this model (got {v})")
        return v

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if v < 1 or v > lim.max_frames:
            raise ValueError(f"must be between 1 and {lim.max_frames} for this model (got {v})")
        if (v - 1) % lim.frame_step:
            raise ValueError(f"must be 1 + a multiple of {lim.frame_step} for this model's VAE (got {v})")
        h, w = info.data.get("height"), info.data.get("width")
        if h and w and h * w * v > lim.max_pixel_frames:
            raise ValueError(
                f"{w}x{h} at {v} frames is {h * w * v} pixel-frames; "
                f"this deployment's limit is {lim.max_pixel_frames}"
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

    @field_validator("guidance_scale", "guidance_scale_2")
    @classmethod
    def _guidance(cls, v: float | None, info: ValidationInfo) -> float | None:
        lim = _limits(info)
        if v is not None and not (0.0 <= v <= lim.max_guidance_scale):
            raise ValueError(f"must be between 0 and {lim.max_guidance_scale} (got {v})")
        return v

    @field_validator("*", mode="after")
    @classmethod
    def _optional(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if v is not None and name in OPTIONAL_PARAMS and name not in _limits(info).optional_params:
            raise ValueError("is not supported by this model")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


def _is_optional_param(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("optional_param"))


OPTIONAL_PARAMS = frozenset(n for n, f in SamplingParams.model_fields.items() if _is_optional_param(f))


# Adapter names are keys of a deployment's catalog, never paths: a request cannot make a
# server read a file or a hub repository that its config does not list.
LORA_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# The strength of an adapter: diffusers takes any number, but far past this the frames are noise
# or black, and a request that asks for that is a mistake to report, not a video to make.
MAX_LORA_SCALE = 10.0
# Entries read from one `lora` value at most: more is refused before any is validated.
MAX_LORA_ENTRIES = 64
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class LoraRef(BaseModel):
    """One LoRA adapter of a request: a catalog `name` and the `scale` its weights are applied at
    (diffusers' `set_adapters(adapter_weights=...)`; 1.0 as trained, within +-MAX_LORA_SCALE)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictText = Field(description="an adapter of the deployment's catalog (`loras:` in its config)")
    scale: float = Field(default=1.0, description="strength of the adapter's weights (default 1.0)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "/" in v or "\\" in v or v.startswith((".", "~")) or ":" in v:
            raise ValueError(
                f"{_short(v)!r} looks like a path or URL; name an adapter of the catalog (`loras:` in the config)"
            )
        if not LORA_NAME_PATTERN.match(v):
            raise ValueError(f"{_short(v)!r} is not an adapter name (1-64 letters, digits, '.', '_' or '-')")
        return v

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: Any) -> Any:
        v = _no_bool(v)
        if isinstance(v, str):
            if not _NUMBER.match(v.strip()):
                raise ValueError(f"{_short(v)!r} is not a number")
            v = float(v)
        if isinstance(v, (int, float)) and not (abs(v) <= MAX_LORA_SCALE and math.isfinite(v)):
            raise ValueError(
                f"must be between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g} (got {_short(str(v))})"
            )
        return v


def parse_loras(value: Any) -> tuple[LoraRef, ...]:
    """A request's `lora` value, in any of the forms people send, -> adapters sorted by name.

    Accepted: a list of `{"name", "scale"}` objects (the API's and a Parquet list<struct>
    column's form; a missing, null or NaN `scale` is 1.0), one such object, its JSON text (a
    CSV cell, a form field), `name[:scale]` items joined by commas (`pixel-art:0.8,film-grain`),
    or a list mixing these (repeated CLI flags, repeated form fields). None, "", "null" and []
    mean no adapter; an adapter at scale 0 is left out (it changes nothing). Raises ValueError
    saying what is wrong: an adapter named twice, more than MAX_LORA_ENTRIES entries, a bad
    name or scale.
    """
    entries = _lora_entries(value)
    refs = []
    for k, item in enumerate(entries):
        if isinstance(item, str):
            # A path or URL is refused as a whole (as a name), not cut at its colon.
            if "/" in item or "\\" in item or ":" not in item:
                item = {"name": item.strip()}
            else:
                name, _, scale = (part.strip() for part in item.rpartition(":"))
                item = {"name": name, "scale": scale}
        if not isinstance(item, Mapping):
            raise ValueError(
                f'entry {k + 1}: expected {{"name": ..., "scale": ...}}, got {type(item).__name__}'
            )
        values = {key: _unwrap(v) for key, v in item.items()}
        if "scale" in values and _missing(values["scale"]):
            del values["scale"]  # as pandas writes a struct field left out, or NaN
        try:
            ref = LoraRef.model_validate(values)
        except ValidationError as exc:
            problem = RequestError.from_validation(exc)
            label = f" ({_short(str(values['name']))!r})" if isinstance(values.get("name"), str) else ""
            raise ValueError(f"entry {k + 1}{label}: {problem}") from None
        if ref.scale != 0:
            refs.append(ref)
    counts = Counter(r.name for r in refs)
    twice = sorted(n for n, c in counts.items() if c > 1)
    if twice:
        raise ValueError(f"adapter {twice[0]!r} is named twice; give each adapter once, with one scale")
    return tuple(sorted(refs, key=lambda r: r.name))


def _lora_entries(value: Any) -> list[Any]:
    """A `lora` value -> its entries: objects, or `name[:scale]` strings."""
    if _missing(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text or text == "null":
            return []
        if text[0] in "[{":
            try:
                return _lora_entries(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not valid JSON: {exc}") from None
        items: list[Any] = [p for p in (part.strip() for part in text.split(",", MAX_LORA_ENTRIES)) if p]
    elif isinstance(value, Mapping):
        items = [value]
    elif isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, bytes)):
        items = []
        for item in list(value)[: MAX_LORA_ENTRIES + 1]:
            # A string in a list is one more value of any form (a repeated flag or form field).
            items.extend(_lora_entries(item) if isinstance(item, str) else [item])
    else:
        raise ValueError('must be a list of {"name": ..., "scale": ...} objects')
    if len(items) > MAX_LORA_ENTRIES:
        raise ValueError(f"names more than {MAX_LORA_ENTRIES} adapters")
    return items


def _short(text: str, limit: int = 80) -> str:
    """`text` for an error message: at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lora_text(refs: tuple[LoraRef, ...]) -> str | None:
    """A request's adapters as one JSON text (table and manifest cells, stage columns), or None."""
    if not refs:
        return None
    return json.dumps([{"name": r.name, "scale": r.scale} for r in refs])


def lora_key(refs: tuple[LoraRef, ...]) -> str:
    """The adapter set of `refs` by name (no scales), e.g. "film-grain+pixel-art": the Serve
    multiplexed model id that routes a request to a replica holding its adapters; "" for none."""
    return "+".join(r.name for r in refs)


class GenerationRequest(BaseModel):
    """A fully specified request: identity, texts, seed and sampling parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="the request's identity: names its output file")
    prompt: StrictText = Field(description="what to generate")
    negative_prompt: StrictText = Field(default="", description="what to steer away from")
    seed: int = Field(ge=0, lt=MAX_SEED, description="seed of the initial noise")
    image: StrictText | None = Field(
        default=None,
        validate_default=True,
        description="reference image to start from (image-to-video): a path or URL, or a data: URL "
        "(default: none, text to video)",
    )
    lora: tuple[LoraRef, ...] = Field(
        default=(),
        description="LoRA adapters to apply, named as in the config's `loras:` catalog: "
        '[{"name": ..., "scale": ...}] or name[:scale],... (default: none)',
    )
    sampling: SamplingParams

    TEXT_FIELDS: ClassVar[tuple[str, ...]] = ("prompt", "negative_prompt")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v: Any) -> Any:
        return _no_bool(v)

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
    def _text(cls, v: str, info: ValidationInfo) -> str:
        limits = _limits(info)
        if info.field_name == "prompt" and not v.strip():
            raise ValueError("must not be empty")
        if len(v) > limits.max_prompt_chars:
            raise ValueError(f"is {len(v)} characters; the limit is {limits.max_prompt_chars}")
        if "\x00" in v:
            raise ValueError("must not contain NUL characters")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            if any("\udc80" <= ch <= "\udcff" for ch in v):  # bytes a UTF-8 reader could not decode
                raise ValueError(
                    "is not valid UTF-8 (is the file in another encoding, such as Latin-1? save it as UTF-8)"
                ) from None
            raise ValueError("is not valid Unicode text (a lone surrogate)") from None
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None, info: ValidationInfo) -> str | None:
        takes = _limits(info).image_input
        if v is not None and not v.strip():  # e.g. an unset shell variable: never a silent text-only video
            raise ValueError("is empty; leave it out to make a video from text alone")
        if v is None and takes == "required":
            raise ValueError("this model generates from a reference image; give one")
        if v is not None and takes == "none":
            raise ValueError("this model does not take a reference image (it is text-to-video)")
        if v is not None and "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v

    @field_validator("lora", mode="before")
    @classmethod
    def _parse_lora(cls, v: Any) -> Any:
        return parse_loras(v)

    @field_validator("lora")
    @classmethod
    def _lora(cls, v: tuple[LoraRef, ...], info: ValidationInfo) -> tuple[LoraRef, ...]:
        limits = _limits(info)
        unknown = [r.name for r in v if r.name not in limits.lora_names]
        if unknown:
            known = ", ".join(sorted(limits.lora_names))
            raise ValueError(
                f"unknown adapter {unknown[0]!r}; "
                + (f"this deployment serves: {known}" if known else "this deployment serves no LoRA adapters")
            )
        if len(v) > limits.max_loras:
            raise ValueError(f"{len(v)} adapters; a request may combine at most {limits.max_loras}")
        return v

    def row(self) -> dict[str, Any]:
        """The request as one flat row: `REQUEST_COLUMNS` -> plain values."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "image": self.image,
            "lora": lora_text(self.lora),
            **self.sampling.model_dump(),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GenerationRequest:
        """A request from a flat row of already validated values (no limits are checked).

        Values may be numpy scalars, and an optional parameter may be NaN: Arrow gives a float
        column's missing values back as NaN.
        """
        top = {k: _plain(row.get(k)) for k in TOP_FIELDS}
        top["lora"] = parse_loras(top["lora"])
        return cls.model_construct(**top, sampling=SamplingParams.from_row(row))


TOP_FIELDS = ("id", "prompt", "negative_prompt", "seed", "image", "lora")
SAMPLING_FIELDS = tuple(SamplingParams.model_fields)
# A request as one flat row: table columns, stage columns, manifest columns, API fields.
REQUEST_COLUMNS = (*TOP_FIELDS, *SAMPLING_FIELDS)


def request_fields() -> dict[str, FieldInfo]:
    """Every flat request field with its pydantic `FieldInfo` (type, default, description)."""
    fields = {k: GenerationRequest.model_fields[k] for k in TOP_FIELDS}
    fields.update(SamplingParams.model_fields)
    return fields


def field_type(info: FieldInfo) -> type:
    """The plain Python type of a request field (`str`, `int` or `float`), optional or not."""
    ann = info.annotation
    for t in (bool, int, float, str):
        if ann is t or (ann is not None and t in getattr(ann, "__args__", ())):
            return t
    return str


def is_scalar(info: FieldInfo) -> bool:
    """Whether a request field holds one plain value (not a list, such as `lora`)."""
    return not any(get_origin(t) in (tuple, list) for t in (info.annotation, *get_args(info.annotation)))


def partial_model(
    name: str, fields: Mapping[str, FieldInfo], doc: str, base: type[BaseModel] | None = None
) -> type[BaseModel]:
    """A model of `fields`, each optional (None = not given), that rejects unknown keys; with
    `base`, its fields come first and its config applies."""
    spec: dict[str, Any] = {
        k: (field_type(f) | None if is_scalar(f) else Any, Field(default=None, description=f.description))
        for k, f in fields.items()
    }
    if base is not None:
        return create_model(name, __base__=base, __doc__=doc, **spec)
    return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **spec)


# The fields a request may leave out, with the value a model or deployment gives them.
DEFAULTED_FIELDS = ("negative_prompt", *SAMPLING_FIELDS)
RequestDefaults = partial_model(
    "RequestDefaults",
    {k: request_fields()[k] for k in DEFAULTED_FIELDS},
    "Values a request takes for fields it leaves out (a family's, a checkpoint's or a config's).",
)


class RequestError(ValueError):
    """A request that cannot be generated; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    @classmethod
    def from_validation(cls, exc: ValidationError) -> RequestError:
        """The errors of a pydantic validation, each prefixed with its flat field name."""
        messages = []
        fields = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p != "sampling"]
            name = ".".join(loc)
            fields.append(name or None)
            msg = err["msg"].removeprefix("Value error, ")
            messages.append(f"{name}: {msg}" if name else msg)
        return cls("; ".join(messages), fields[0] if fields else None)


_CANONICAL = json.JSONEncoder(sort_keys=True, default=str, ensure_ascii=True)


def _canonical(values: Mapping[str, Any]) -> str:
    return _CANONICAL.encode(values)


@dataclass(frozen=True)
class RequestBuilder:
    """Raw values (a table row, an HTTP body, CLI flags) -> a validated `GenerationRequest`.

    `defaults` fill fields a request leaves out; `limits` bound what it may ask for; `model`
    names the weights, so the derived id of a request changes with the model that makes it (and
    `lora_sources` with the weights behind an adapter's name).
    """

    defaults: Mapping[str, Any]
    limits: RequestLimits
    model: str = ""
    # catalog name -> what its weights are (`LoraSource.identity`): a name pointed at other
    # weights makes other requests
    lora_sources: Mapping[str, str] = field(default_factory=dict)
    _cache: dict[Any, SamplingParams] = field(default_factory=dict, compare=False, repr=False)

    def build(self, raw: Mapping[str, Any]) -> GenerationRequest:
        """Fill, validate and identify one request.

        An explicit `id` is the request's identity; without one the id is a digest of
        everything that decides the output (texts, the reference image, sampling parameters,
        the seed when given, the model). A request without a seed gets one derived from its id, so two ids are two
        takes of the same prompt and a rerun reproduces each exactly.

        Raises `RequestError` naming the first offending field.
        """
        unknown = sorted(k for k in raw if k not in REQUEST_COLUMNS)
        if unknown:
            raise RequestError(f"unknown field(s): {', '.join(unknown)}", unknown[0])
        values = {k: v for k, v in raw.items() if not _missing(v)}
        for name, value in self.defaults.items():
            if value is not None:
                values.setdefault(name, value)
        if "prompt" not in values:
            raise RequestError("prompt: field required", "prompt")
        if "id" in values and not isinstance(values["id"], str):
            values["id"] = str(values["id"])
        top = {k: values[k] for k in TOP_FIELDS if k in values}
        placeholders = {"id": "pending", "seed": 0}
        try:
            sampling = self._sampling(tuple((k, values.get(k)) for k in SAMPLING_FIELDS))
            req = GenerationRequest.model_validate(
                {**placeholders, **top, "sampling": sampling}, context={"limits": self.limits}
            )
        except ValidationError as exc:
            raise RequestError.from_validation(exc) from None
        # Ids and seeds are derived from the validated content: "64" in a CSV and 64 in a JSONL
        # file are the same request and get the same id and seed.
        derived: dict[str, Any] = {}
        if "id" not in values:
            derived["id"] = self.digest(req, with_seed="seed" in values)[:16]
        if "seed" not in values:
            rid = derived.get("id", req.id)
            derived["seed"] = int(hashlib.sha256(f"seed:{rid}".encode()).hexdigest()[:15], 16)
        return req.model_copy(update=derived) if derived else req

    def _sampling(self, values: tuple[tuple[str, Any], ...]) -> SamplingParams:
        # Rows of a table mostly share their sampling values: each distinct set is validated once.
        key: tuple[Any, ...] | None = tuple((k, type(v), v) for k, v in values)
        try:
            cached = self._cache.get(key)
        except TypeError:  # an unhashable value (a list, an object): validate it to get its error
            cached = None
            key = None
        if cached is None:
            cached = SamplingParams.model_validate(
                {k: v for k, v in values if v is not None}, context={"limits": self.limits}
            )
            if key is not None:
                if len(self._cache) >= 4096:
                    self._cache.clear()
                self._cache[key] = cached
        return cached

    def digest(self, req: GenerationRequest, with_seed: bool = True) -> str:
        """A hex digest of what decides `req`'s output: texts, sampling, seed and the model.

        Parameters left at None (a family default) are left out, so adding an optional
        parameter to the request model does not change the digest of existing requests.
        """
        content = {k: v for k, v in req.sampling.__dict__.items() if v is not None}
        content.update(prompt=req.prompt, negative_prompt=req.negative_prompt, model=self.model)
        if req.image is not None:  # left out otherwise: text-to-video digests stay as they were
            content["image"] = req.image
        if req.lora:  # likewise: requests without adapters keep their digests
            content["lora"] = [[r.name, r.scale, self.lora_sources.get(r.name, "")] for r in req.lora]
        if with_seed:
            content["seed"] = req.seed
        return hashlib.sha256(_canonical(content).encode("utf-8", "surrogatepass")).hexdigest()


def _unwrap(v: Any) -> Any:
    # numpy scalars (as Arrow and Ray Data hand cells over) -> Python values
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _plain(v: Any) -> Any:
    v = _unwrap(v)
    return None if isinstance(v, float) and v != v else v


def _missing(v: Any) -> bool:
    # Table readers give None for empty cells; float NaN marks a missing number in pandas-made files.
    return v is None or (isinstance(v, float) and v != v)
