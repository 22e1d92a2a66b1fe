"""The HTTP surface: OpenAI's Videos API shapes, its error body, auth, and request parsing.

Kept free of Ray so the shapes and the parsing can be tested and reused on their own.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    seconds: float | None = Field(default=None, gt=0, le=600, description="clip length; sets num_frames")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, e.g. 832x480")
    input_reference: Any | None = None


class OpenAIImageFields(BaseModel):
    """The fields of OpenAI's `POST /v1/images/generations`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, e.g. 1024x1024")
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    output_format: Literal["png"] | None = None


# kinoray's own fields, sent as `extra_body` by the openai client: the request's fields.
_FIELDS = request_fields()
VIDEO_EXTRA_FIELDS = [f for f in _FIELDS if f not in ("id", "prompt")]
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


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = RequestError.from_validation(exc)
        raise APIError(400, str(err), param=err.field, code="invalid_value") from None


def parse_images(
    data: dict[str, Any], served_models: list[str], builder: RequestBuilder, ids: list[str]
) -> tuple[Any, list[GenerationRequest]]:
    """Body -> one single-frame request per image (consecutive seeds from `seed`)."""
    body = _validate(ImageGenerateBody, data)
    video = {
        k: v for k, v in body.model_dump().items() if k in VideoCreateBody.model_fields and v is not None
    }
    video.pop("seed", None)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    requests = []
    for k, image_id in enumerate(ids[: body.n]):
        req, _ = parse_create(
            {**video, "seed": seed + k, "num_frames": 1, "fps": 1}, served_models, builder, image_id
        )
        requests.append(req)
    return body, requests


async def read_body(request: Request) -> dict[str, Any]:
    """JSON, multipart form (what the openai client sends) or urlencoded form -> a dict."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    if ctype == "application/json":
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return data
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=1, max_fields=64)
        except Exception as exc:
            raise APIError(400, f"cannot parse form body: {exc}", code="invalid_form") from None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            fields[key] = value if isinstance(value, str) else "<file>"
        return fields
    raise APIError(
        415,
        f"unsupported content type {ctype or 'none'!r}; send application/json or multipart/form-data",
        code="unsupported_media_type",
    )


def parse_create(
    data: dict[str, Any], served_models: list[str], builder: RequestBuilder, job_id: str
) -> tuple[GenerationRequest, str]:
    """Body -> (a validated request, the model name to report).

    OpenAI's `size` and `seconds` become height, width and num_frames; an error about one of
    those names the field the client sent.
    """
    body = _validate(VideoCreateBody, data)
    if body.input_reference is not None:
        raise APIError(400, "input_reference is not supported by this model", param="input_reference")
    model = body.model or served_models[0]
    if model not in served_models:
        raise APIError(
            404,
            f"model {model!r} is not served here; available: {', '.join(served_models)}",
            param="model",
            code="model_not_found",
        )
    fields: dict[str, Any] = {k: getattr(body, k) for k in VIDEO_EXTRA_FIELDS if getattr(body, k) is not None}
    sent_as: dict[str, str] = {}
    if body.size is not None:
        try:
            w, h = (int(x) for x in body.size.lower().split("x"))
        except ValueError:
            raise APIError(400, f"size must look like 832x480 (got {body.size!r})", param="size") from None
        for name, value in (("width", w), ("height", h)):
            if name not in fields:
                fields[name] = value
                sent_as[name] = "size"
    if body.seconds is not None and "num_frames" not in fields:
        fps = fields.get("fps", builder.defaults["fps"])
        step = builder.limits.frame_step
        # The nearest frame count the VAE takes: 1 + k * frame_step.
        fields["num_frames"] = 1 + max(0, math.floor(body.seconds * fps / step + 0.5)) * step
        sent_as["num_frames"] = "seconds"
    if "seed" not in fields:
        fields["seed"] = secrets.randbelow(2**31)
    try:
        req = builder.build({"id": job_id, "prompt": body.prompt, **fields})
    except RequestError as exc:
        sent = sent_as.get(exc.field or "")
        message = f"{sent} {getattr(body, sent)!r} gives {exc}" if sent else str(exc)
        param = sent or exc.field
        raise APIError(400, message, param=param, code="invalid_value") from None
    return req, model


def check_auth(request: Request, api_keys: list[str]) -> None:
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing bearer token in the Authorization header", code="invalid_api_key")
    if not any(secrets.compare_digest(token.strip(), k) for k in api_keys):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")
