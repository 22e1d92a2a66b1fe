"""The HTTP surface: OpenAI's Videos API shapes, its error body, auth, and request parsing.

Kept free of Ray so the shapes and the parsing can be tested and reused on their own.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kinoray.models.images import ImageError, ImagePolicy, decode_image, fetch_url, fit_image, parse_data_url
from kinoray.models.request import (
    GenerationRequest,
    RequestBuilder,
    RequestError,
    partial_model,
    request_fields,
)

MAX_BODY_BYTES = 1 << 20


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape, used for every 4xx."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "a bad field, named in `param`"),
        (401, "missing or wrong API key"),
        (404, "unknown video or model"),
        (429, "too many jobs in flight; see Retry-After"),
    )
}


class OpenAIVideoFields(BaseModel):
    """The fields of OpenAI's `POST /v1/videos`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    model: str | None = None
    seconds: float | None = Field(default=None, gt=0, le=600, description="clip length; sets num_frames")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, e.g. 832x480")
    input_reference: Any | None = Field(
        default=None,
        description='reference image (image-to-video): a file upload, or {"image_url": a data: or http(s) URL}',
    )


class OpenAIImageFields(BaseModel):
    """The fields of OpenAI's `POST /v1/images/generations`.

    Fields kinoray cannot honour are accepted with the value that asks for OpenAI's default
    behaviour, or one that kinoray's output already has, and refused by name otherwise (see
    IGNORED_IMAGE_VALUES).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    model: str | None = None
    n: int | None = Field(default=1, ge=1, le=10)
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, e.g. 1024x1024, or auto")
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100, description="jpeg/webp quality")
    quality: str | None = None
    style: str | None = None
    moderation: str | None = None
    background: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    user: str | None = None


class VideoRemixBody(BaseModel):
    """`POST /v1/videos/{id}/remix`: the new prompt; everything else comes from the source."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)


# Accepted values of fields kinoray does not act on: OpenAI's default, or what kinoray's output
# is anyway (opaque images, no moderation step, one final image).
IGNORED_IMAGE_VALUES: dict[str, tuple[Any, ...]] = {
    "quality": ("auto", "standard"),
    "style": ("vivid",),
    "moderation": ("auto",),
    "background": ("auto", "opaque"),
    "stream": (False,),
    "partial_images": (0,),
}


# kinoray's own fields, sent as `extra_body` by the openai client: the request's fields.
_FIELDS = request_fields()
# The reference image comes as OpenAI's `input_reference`, never as a path the server would read.
VIDEO_EXTRA_FIELDS = [f for f in _FIELDS if f not in ("id", "prompt", "image")]
IMAGE_EXTRA_FIELDS = [f for f in VIDEO_EXTRA_FIELDS if f not in ("num_frames", "fps")]
VideoCreateBody = partial_model(
    "VideoCreateBody",
    {k: _FIELDS[k] for k in VIDEO_EXTRA_FIELDS},
    "`POST /v1/videos`: OpenAI's fields, then kinoray's.",
    base=OpenAIVideoFields,
)
ImageGenerateBody = partial_model(
    "ImageGenerateBody",
    {k: _FIELDS[k] for k in IMAGE_EXTRA_FIELDS},
    "`POST /v1/images/generations`: OpenAI's fields, then kinoray's.",
    base=OpenAIImageFields,
)


def validate_body(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """`data` as `model`; raises a 400 APIError naming the first bad field. A JSON true or
    false is refused for a field that is not a boolean (pydantic would read it as 1 or 0)."""
    for name, value in data.items():
        field = model.model_fields.get(name)
        if (
            isinstance(value, bool)
            and field is not None
            and field.annotation is not Any
            and "bool" not in str(field.annotation)
        ):
            raise APIError(
                400, f"{name}: expected a number or a string, got {value}", param=name, code="invalid_value"
            )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = RequestError.from_validation(exc)
        raise APIError(400, str(err), param=err.field, code="invalid_value") from None


def parse_images(
    data: dict[str, Any], served_models: list[str], builder: RequestBuilder, ids: list[str]
) -> tuple[Any, list[GenerationRequest]]:
    """Body -> one single-frame request per image (consecutive seeds from `seed`)."""
    body = validate_body(ImageGenerateBody, data)
    # OpenAI's spec lets these be null, meaning the default.
    nulls = {k: OpenAIImageFields.model_fields[k].default for k in ("n", "response_format", "output_format")}
    body = body.model_copy(update={k: v for k, v in nulls.items() if getattr(body, k) is None})
    for name, accepted in IGNORED_IMAGE_VALUES.items():
        value = getattr(body, name)
        if value is not None and value not in accepted:
            raise APIError(
                400,
                f"{name} {value!r} is not supported here; accepted: " + ", ".join(repr(v) for v in accepted),
                param=name,
                code="unsupported_value",
            )
    video = {
        k: v
        for k, v in body.model_dump().items()
        if k in VideoCreateBody.model_fields and v is not None and k != "input_reference"
    }
    if video.get("size") == "auto":
        del video["size"]
    video.pop("seed", None)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    requests = []
    for k, image_id in enumerate(ids[: body.n]):
        req, _ = parse_create(
            {**video, "seed": seed + k, "num_frames": 1, "fps": 1},
            served_models,
            builder,
            image_id,
            image=True,
        )
        requests.append(req)
    return body, requests


_SIZE = re.compile(r"([0-9]+)x([0-9]+)", re.ASCII)


class _NonFinite(float):
    """A JSON number that is not finite (NaN, Infinity, or one too large for a float)."""


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(value)


def _non_finite_field(data: Any, path: str = "") -> str | None:
    if isinstance(data, _NonFinite):
        return path or "body"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _non_finite_field(value, path or str(key))
        if found:
            return found
    return None


# Form fields that take a list: repeated, each part adds to it (as a repeated CLI flag does).
LIST_FIELDS = frozenset({"lora"})


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# Form fields that are files; every other part is text, even one sent as a file part.
FILE_FIELDS = frozenset({"input_reference"})
MAX_FORM_PARTS = 64


async def read_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """JSON, multipart form (what the openai client sends) or urlencoded form -> a dict.

    Raises APIError: 413 over `max_bytes`, 415 for another content type or any
    content-encoding, 400 for malformed JSON, a non-finite number, or a text part that is not
    UTF-8.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise APIError(
            415,
            f"content-encoding {encoding!r} is not supported; send the body uncompressed",
            param="content-encoding",
            code="unsupported_media_type",
        )
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise APIError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    if ctype == "application/json":
        raw = await request.body()
        if len(raw) > max_bytes:
            raise APIError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(
                raw.decode("utf-8"), parse_float=_parse_float, parse_constant=lambda c: _NonFinite(c)
            )
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        bad = _non_finite_field(data)
        if bad:
            raise APIError(400, f"{bad}: numbers must be finite", param=bad, code="invalid_value")
        return data
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
        except Exception as exc:
            raise APIError(400, f"cannot parse form body: {exc}", code="invalid_form") from None
        fields: dict[str, Any] = {}
        nested: list[tuple[str, str]] = []
        for key, value in form.multi_items():
            if not isinstance(value, str) and key not in FILE_FIELDS:
                # A text field sent as a file part (what `requests` sends for `files={...}`).
                raw = await value.read(MAX_BODY_BYTES + 1)
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise APIError(
                        400, f"{key}: a text field must be UTF-8", param=key, code="invalid_value"
                    ) from None
            if "[" in key and isinstance(value, str):
                nested.append((key, value))
            elif key in LIST_FIELDS and key in fields:  # a repeated list field: each part adds
                fields[key] = [*_as_list(fields[key]), value]
            else:
                fields[key] = value
        for key, values in form_lists(nested).items():
            fields[key] = [*_as_list(fields[key]), *values] if key in fields else values
        return fields
    raise APIError(
        415,
        f"unsupported content type {ctype or 'none'!r}; send application/json or multipart/form-data",
        code="unsupported_media_type",
    )


_LIST_KEY = re.compile(r"^(\w+)\[(\d*)\](?:\[(\w+)\])?$", re.ASCII)


def form_lists(items: list[tuple[str, str]]) -> dict[str, Any]:
    """Form fields that spell a list -> the list: what the openai client sends for a list in
    `extra_body` of a multipart request (`lora[][name]=a`, `lora[][scale]=0.8`, ..., keys in
    "brackets" format, each key's values in order), and the indexed form (`lora[0][name]`).

    Raises APIError 400 naming the field for keys that are not such a list, or entries that
    cannot be told apart (a key given for some entries only, in the brackets format)."""
    lists: dict[str, dict[str, list[str]]] = {}
    indexed: dict[str, dict[int, dict[str, str]]] = {}
    for key, value in items:
        match = _LIST_KEY.match(key)
        if match is None:
            raise APIError(400, f"{key}: not a field of this API", param=key, code="invalid_value")
        name, index, attr = match.groups()
        if index:
            entry = indexed.setdefault(name, {}).setdefault(int(index), {})
            if attr is None:
                entry[""] = value
            else:
                entry[attr] = value
        else:
            lists.setdefault(name, {}).setdefault(attr or "", []).append(value)
    out: dict[str, Any] = {}
    for name, entries in indexed.items():
        out[name] = [entry.get("", entry) if "" in entry else entry for _, entry in sorted(entries.items())]
    for name, columns in lists.items():
        if "" in columns:  # name[]=a&name[]=b: a list of values
            out[name] = out.get(name, []) + columns.pop("")
        if columns:
            counts = {len(values) for values in columns.values()}
            if len(counts) > 1:
                raise APIError(
                    400,
                    f"{name}: in a form, give every entry the same keys ({', '.join(sorted(columns))}), "
                    f"or send {name} as JSON text",
                    param=name,
                    code="invalid_value",
                )
            keys = list(columns)
            out[name] = out.get(name, []) + [{k: columns[k][i] for k in keys} for i in range(counts.pop())]
    return out


def parse_create(
    data: dict[str, Any],
    served_models: list[str],
    builder: RequestBuilder,
    job_id: str,
    image: bool = False,
) -> tuple[GenerationRequest, str]:
    """Body -> (a validated request, the model name to report).

    OpenAI's `size` and `seconds` become height, width and num_frames; an error about one of
    those names the field the client sent. A video request (`image` False) must make a clip of
    more than one frame, from a model that makes videos. An `input_reference` is checked for
    presence only (the model's need of one): the request's `image` is then a placeholder, which
    the caller replaces with the image it reads (`read_input_reference`).

    Raises APIError: 400 naming the field, 404 for a model that is not served.
    """
    body = validate_body(VideoCreateBody, data)
    model = body.model or served_models[0]
    if model not in served_models:
        raise APIError(
            404,
            f"model {model!r} is not served here; available: {', '.join(served_models)}",
            param="model",
            code="model_not_found",
        )
    limits = builder.limits
    if not image and limits.max_frames == 1:
        raise APIError(
            400,
            f"model {model!r} makes images, not videos; use POST /v1/images/generations",
            param="model",
            code="invalid_value",
        )
    fields: dict[str, Any] = {k: getattr(body, k) for k in VIDEO_EXTRA_FIELDS if getattr(body, k) is not None}
    sent_as: dict[str, str] = {}
    if body.size is not None:
        match = _SIZE.fullmatch(body.size.strip().lower())
        if match is None:
            raise APIError(
                400, f"size must look like 832x480 (got {body.size!r})", param="size", code="invalid_value"
            )
        w, h = int(match.group(1)), int(match.group(2))
        for name, value in (("width", w), ("height", h)):
            if fields.get(name, value) != value:
                raise APIError(
                    400,
                    f"size {body.size!r} and {name} {fields[name]} disagree; send one of them",
                    param=name,
                    code="invalid_value",
                )
            fields[name] = value
            sent_as[name] = "size"
    if body.seconds is not None and "num_frames" in fields:
        raise APIError(
            400, "seconds and num_frames both set the length; send one of them", param="num_frames",
            code="invalid_value",
        )  # fmt: skip
    fps = fields.get("fps", builder.defaults["fps"])
    if body.seconds is not None and not 1 <= fps <= limits.max_fps:
        raise APIError(
            400,
            f"fps must be between 1 and {limits.max_fps} (got {fps:g})",
            param="fps",
            code="invalid_value",
        )
    if body.seconds is not None:
        step = limits.frame_step
        # The nearest frame count the VAE takes: 1 + k * frame_step.
        fields["num_frames"] = 1 + max(0, math.floor(body.seconds * fps / step + 0.5)) * step
        sent_as["num_frames"] = "seconds"
        shortest, longest = (1 + step) / fps, (limits.max_frames - 1) / fps
        if not shortest / 2 <= body.seconds <= longest + step / fps / 2:
            raise APIError(
                400,
                f"seconds must be between {shortest:g} and {longest:g} for this model "
                f"({1 + step} to {limits.max_frames} frames at {fps:g} fps); got {body.seconds:g}",
                param="seconds",
                code="invalid_value",
            )
    frames = fields.get("num_frames", builder.defaults.get("num_frames"))
    if not image and frames == 1:
        raise APIError(
            400,
            "num_frames 1 makes an image, not a video; use POST /v1/images/generations",
            param="num_frames",
            code="invalid_value",
        )
    if "seed" not in fields:
        fields["seed"] = secrets.randbelow(2**31)
    if body.input_reference is not None:
        fields["image"] = REFERENCE_PENDING
    try:
        req = builder.build({"id": job_id, "prompt": body.prompt, **fields})
    except RequestError as exc:
        if exc.field == "image":
            message = str(exc).replace("image:", "input_reference:", 1)
            raise APIError(400, message, param="input_reference", code="invalid_value") from None
        sent = sent_as.get(exc.field or "")
        message = f"{sent} {getattr(body, sent)!r} gives {exc}" if sent else str(exc)
        param = sent or exc.field
        raise APIError(400, message, param=param, code="invalid_value") from None
    return req, model


REFERENCE_PENDING = "input_reference"
# Reference image URLs fetched at once by one ingress replica, on threads of their own: slow
# hosts cannot hold up uploads (decoded on the event loop's default threads), and a flood of
# them is answered 429 rather than queued past its timeout.
MAX_FETCHES = 16
_FETCHERS = ThreadPoolExecutor(MAX_FETCHES, thread_name_prefix="kinoray-fetch")
_fetching = 0


async def _fetch(url: str, policy: ImagePolicy) -> bytes:
    global _fetching
    if _fetching >= MAX_FETCHES:
        raise APIError(
            429,
            f"{MAX_FETCHES} reference image URLs are being fetched; retry later or upload the image",
            type="rate_limit_exceeded",
            param="input_reference",
            code="too_many_fetches",
            headers={"Retry-After": "5"},
        )
    _fetching += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_FETCHERS, fetch_url, url, policy)
    finally:
        _fetching -= 1


async def read_input_reference(value: Any, policy: ImagePolicy, width: int, height: int) -> bytes:
    """`input_reference` as a client sends it -> the image file's bytes, checked to decode.

    Takes a multipart file upload (what the openai client sends), or `{"image_url": URL}` (or
    the URL alone) with a data: URL (RFC 2397) or an http(s) URL, fetched under `policy` (size
    cap, timeout, no private addresses unless allowed). A `{"file_id": ...}` is refused: there
    is no Files API here. With `policy.resize` "refuse", an image of another size than
    `width` x `height` is refused.

    Raises APIError 400 with `param` "input_reference".
    """

    def refuse(message: str, code: str = "invalid_value") -> APIError:
        return APIError(400, f"input_reference: {message}", param="input_reference", code=code)

    try:
        if hasattr(value, "read"):  # a starlette UploadFile
            size = getattr(value, "size", None)
            if size is not None and size > policy.max_bytes:
                raise ImageError(
                    f"the image file is {size:,} bytes; the limit is {policy.max_bytes:,} bytes", "too_large"
                )
            data = await value.read(policy.max_bytes + 1)
        else:
            url = value.get("image_url") if isinstance(value, dict) else value
            if isinstance(value, dict) and "file_id" in value:
                raise refuse(
                    'file_id is not supported (there is no Files API here); upload the image, or send {"image_url": ...}',
                    "unsupported_value",
                )
            if isinstance(url, dict):  # {"image_url": {"url": ...}}, as in chat messages
                url = url.get("url")
            if not isinstance(url, str):
                raise refuse('expected an image file upload or {"image_url": "<data: or http(s) URL>"}')
            if url.startswith("data:"):
                data = parse_data_url(url, policy)
            elif url.lower().startswith(("http://", "https://")):
                data = await _fetch(url, policy)
            elif isinstance(value, str) and "://" not in url[:16]:
                # A multipart part without a filename arrives as text, not as a file.
                raise refuse(
                    'send the image as a file (a multipart part with a filename), or {"image_url": ...}'
                )
            else:
                raise refuse("image_url must be a data: URL or an http(s) URL")
        image = await asyncio.to_thread(decode_image, data, policy)
        if policy.resize == "refuse":
            fit_image(image, width, height, "refuse")
    except ImageError as exc:
        raise refuse(str(exc)) from None
    return data


def check_auth(request: Request, api_keys: list[str]) -> None:
    """Raises a 401 (with `WWW-Authenticate`, RFC 6750) unless the bearer token is one of
    `api_keys`; with none configured, every request passes."""
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401,
            "missing bearer token in the Authorization header",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="kinoray"'},
        )
    if not any(secrets.compare_digest(token.strip(), k) for k in api_keys):
        raise APIError(
            401,
            "incorrect API key provided",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="kinoray", error="invalid_token"'},
        )
