"""The one configuration schema shared by the CLI, the bulk job, the Serve app and k8s manifests.

Every section rejects keys it does not know, so a typo fails at load time with its name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kinoray.models.images import ImagePolicy
from kinoray.models.loras import LoraSource, catalog_entries
from kinoray.models.request import LimitOverrides, RequestBuilder, RequestDefaults
from kinoray.models.spec import ModelSpec

# The StageConfig field that reserves each of Ray's own resources
RAY_RESOURCE_FIELDS = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory_gb"}


class StageConfig(BaseModel):
    """Resources, batching and replica bounds of one stage's actor pool / deployment."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory_gb: float | None = Field(default=None, gt=0, description="memory reserved per replica")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources, e.g. to pin a stage to a KubeRay worker group",
    )
    batch_size: int = Field(default=4, ge=1, description="rows per call")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    # Online only: Serve autoscaling and dynamic batching.
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    max_ongoing_requests: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0)

    def ray_resources(self) -> dict[str, Any]:
        """What each replica reserves, named as both `map_batches` and `ray_actor_options` take it."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            out["num_gpus"] = self.num_gpus
        if self.memory_gb:
            out["memory"] = self.memory_gb * 1024**3
        if self.resources:
            out["resources"] = dict(self.resources)
        return out

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        # Ray refuses its own resources among the custom ones, when the first replica starts.
        for name in value:
            if name in RAY_RESOURCE_FIELDS or name == "object_store_memory":
                instead = f"; use {RAY_RESOURCE_FIELDS[name]}" if name in RAY_RESOURCE_FIELDS else ""
                raise ValueError(f"{name!r} is one of Ray's own resources, not a custom one{instead}")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> StageConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DenoiserConfig(StageConfig):
    """The denoise stage: a stage, plus how many LoRA adapters a replica keeps loaded."""

    max_loras: int = Field(
        default=4,
        ge=1,
        description="LoRA adapters a replica keeps loaded, least recently used evicted first "
        "(also the most one request may combine)",
    )
    max_lora_rank: int = Field(
        default=64,
        ge=1,
        description="with model.compile: the highest rank of the catalog's adapters; adapters "
        "are padded to it, so one can be swapped for another without recompiling",
    )


class DecoderConfig(StageConfig):
    """The decode stage: a stage, plus how it keeps the VAE decode within memory."""

    memory_budget_gb: float | None = Field(
        default=None,
        gt=0,
        description="memory a decode may use (default: the device's free memory on CUDA, unbounded on CPU)",
    )
    plan: Literal["auto", "whole", "split", "tiled"] = Field(
        default="auto",
        description="auto: the fastest plan whose estimated peak fits, then cheaper ones on out-of-memory",
    )
    tile_size: int | None = Field(
        default=None, ge=16, description="tile size in pixels for tiled plans (default: the VAE's own)"
    )
    testing_oom: str | None = Field(
        default=None,
        description="for tests only: fail VAE calls with out-of-memory errors: every=N, ids=a,b "
        "or prompt=text, joined with ';' (as $KINORAY_TESTING_DECODE_OOM does)",
    )

    @model_validator(mode="after")
    def _check_testing_oom(self) -> DecoderConfig:
        from kinoray.models.decode_plan import FaultInjection

        FaultInjection(
            self.testing_oom
        )  # raises ValueError naming a bad setting (also $KINORAY_TESTING_DECODE_OOM)
        return self

    def decode_options(self) -> dict[str, Any]:
        """The Decoder stage's keyword arguments."""
        return {
            "max_batch_size": self.batch_size,
            "memory_budget_gb": self.memory_budget_gb,
            "plan": self.plan,
            "tile_size": self.tile_size,
            "testing_oom": self.testing_oom,
        }


class BatchConfig(BaseModel):
    """Bulk job settings."""

    model_config = ConfigDict(extra="forbid")

    write_concurrency: int = Field(default=1, ge=1, description="parallel video writer tasks")
    passthrough_columns: list[str] = Field(
        default_factory=list,
        description="input columns carried into the manifest as text (e.g. a caption id); other unknown columns are an error",
    )
    metrics_port: int | None = Field(default=None, description="serve the job's Prometheus metrics here")
    pushgateway: str | None = Field(default=None, description="push the final summary here (host:port)")


class WebhookEndpoint(BaseModel):
    """A receiver of job events, signed as OpenAI signs its webhooks (Standard Webhooks)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL the events are POSTed to")
    secret: str = Field(description="signing secret, `whsec_` + base64 (as OpenAI's dashboard gives)")
    events: list[str] = Field(
        default_factory=lambda: ["video.completed", "video.failed"],
        description="event types sent here: video.completed, video.failed, video.cancelled",
    )

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return url

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
        if unknown:
            raise ValueError(f"unknown event(s) {', '.join(unknown)}; known: {', '.join(WEBHOOK_EVENTS)}")
        return events


WEBHOOK_EVENTS = ("video.completed", "video.failed", "video.cancelled")


class ServeConfig(BaseModel):
    """Online app settings."""

    model_config = ConfigDict(extra="forbid")

    storage: str = Field(
        min_length=1,
        default_factory=lambda: os.environ.get("KINORAY_STORAGE", "file://./kinoray-store"),
        description="fsspec URL for job records and videos (default: $KINORAY_STORAGE, else ./kinoray-store)",
    )
    api_keys: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="bearer tokens; empty means no auth"
    )
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    model_aliases: list[str] = Field(
        default_factory=lambda: [
            "sora-2",
            "sora-2-pro",
            "gpt-image-1",
            "gpt-image-1-mini",
            "dall-e-3",
            "dall-e-2",
        ],
        description="other model names accepted for the served model by both APIs, so existing "
        "client code runs unchanged",
    )
    max_queued_requests: int = Field(default=64, ge=1, description="video jobs in flight per ingress replica")
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After of a 429")
    job_deadline_s: float = Field(default=3600.0, gt=0, description="a job not finished by then ends failed")
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description="HTTP requests an ingress replica handles at once; they wait on I/O and on "
        "the stages, so far more than Serve's default of 5 (past which Serve's router backs off "
        "and retries, and status polls pile up)",
    )
    retention_s: float | None = Field(
        default=86400.0,
        gt=0,
        description="finished videos (and their files) are deleted this long after they finish "
        "(`expires_at`); null keeps them",
    )
    sweep_interval_s: float = Field(
        default=5.0, gt=0, description="how often expired jobs and jobs of departed replicas are looked for"
    )
    on_restart: Literal["requeue", "fail"] = Field(
        default="requeue",
        description="unfinished jobs of a replica that is gone: run them again (same seed, same "
        "video), or end them failed with code `interrupted`",
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long jobs in flight may take to finish"
    )
    poll_after_ms: int = Field(
        default=1000,
        ge=0,
        description="`openai-poll-after-ms` of status answers, which the openai client waits",
    )
    webhooks: list[WebhookEndpoint] = Field(
        default_factory=list, description="where `video.*` events are POSTed, signed (Standard Webhooks)"
    )


class RayConfig(BaseModel):
    """The local Ray cluster kinoray starts when no address is given."""

    model_config = ConfigDict(extra="forbid")

    metrics_export_port: int = Field(
        default=8080,
        ge=1,
        le=65535,
        description="where Ray exports Prometheus metrics (KubeRay's `metrics` port is 8080 too)",
    )


class KinorayConfig(BaseModel):
    """model + per-stage pools + request defaults and limits; one YAML file."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(default_factory=ModelSpec)
    defaults: RequestDefaults = Field(  # type: ignore[valid-type]
        default_factory=RequestDefaults, description="overrides of the model's request defaults"
    )
    limits: LimitOverrides = Field(
        default_factory=LimitOverrides, description="tighter request limits than the model's"
    )
    images: ImagePolicy = Field(
        default_factory=ImagePolicy,
        description="reference images (image-to-video): size caps, URL fetching, resizing",
    )
    loras: dict[str, LoraSource] = Field(
        default_factory=dict,
        description="LoRA adapters requests may name: name -> a folder, .safetensors file or hub id "
        "(or {weights, weight_name, revision, weights_2})",
    )
    encoder: StageConfig = Field(default_factory=StageConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("loras", mode="before")
    @classmethod
    def _catalog(cls, v: Any) -> Any:
        return catalog_entries(v) if isinstance(v, Mapping) else v

    @classmethod
    def load(cls, path: str | Path | None, model: Mapping[str, Any] | None = None) -> KinorayConfig:
        """The config in YAML file `path` (defaults when None), with `model` fields (e.g. from
        CLI flags) replacing the file's and the environment's.

        Raises ConfigError (one line: the file, and the key or the problem) for a file that is
        missing, unreadable, not YAML, or holds an unknown key or a bad value; a bad value in
        `model` is named `model.<field>`.
        """
        data = {} if path is None else cls._read(path)
        if model:
            section = data.get("model")
            data = {**data, "model": {**(section if isinstance(section, dict) else {}), **model}}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # also from the environment ($KINORAY_MODEL, ...)
            where = f"config file {path}: " if path is not None else ""
            raise ConfigError(where + explain(exc, cls)) from None

    @staticmethod
    def _read(path: str | Path) -> dict[str, Any]:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(
                f"config file {path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {path}: expected sections (model:, denoiser:, ...), got a {type(data).__name__}"
            )
        return data

    def encode_options(self) -> dict[str, Any]:
        """The TextEncoder stage's keyword arguments (besides the model)."""
        return {
            "image_policy": self.images.model_dump(mode="json"),
            "loras": self._catalog_dicts(),
            "max_loras": self.denoiser.max_loras,
        }

    def denoise_options(self) -> dict[str, Any]:
        """The Denoiser stage's keyword arguments (besides the model)."""
        return {
            "max_batch_size": self.denoiser.batch_size,
            "loras": self._catalog_dicts(),
            "max_loras": self.denoiser.max_loras,
            "max_lora_rank": self.denoiser.max_lora_rank,
        }

    def _catalog_dicts(self) -> dict[str, dict[str, Any]]:
        return {name: source.model_dump() for name, source in self.loras.items()}

    def with_model(self, **changes: Any) -> KinorayConfig:
        """A copy with `model` fields replaced (and validated), e.g. from CLI flags."""
        spec = ModelSpec.model_validate({**self.model.model_dump(exclude_unset=True), **changes})
        return self.model_copy(update={"model": spec})

    def request_builder(self) -> RequestBuilder:
        """The model's defaults and limits, with this config's overrides, as one builder.

        Reads the checkpoint's config files only (cached per model); no weights are loaded.
        """
        info = self.model.info
        defaults = {**info.defaults, **BaseModel.model_dump(self.defaults, exclude_none=True)}
        limits = info.limits.tightened(self.limits).model_copy(
            update={"lora_names": frozenset(self.loras), "max_loras": self.denoiser.max_loras}
        )
        second = self.model.model_index.get("transformer_2")
        for name, source in self.loras.items():
            if source.weights_2 is not None and not (isinstance(second, list) and second[0]):
                raise ConfigError(
                    f"loras.{name}.weights_2: {self.model.weights} has one transformer; weights_2 is "
                    "the adapter of a two-expert checkpoint's transformer_2 (Wan 2.2 A14B)"
                )
        sources = {name: source.identity for name, source in self.loras.items()}
        return RequestBuilder(
            defaults=defaults, limits=limits, model=self.model.identity, lora_sources=sources
        )


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def explain(exc: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """Pydantic's errors as one line: `key.path: problem`, and for an unknown key the keys its
    section takes (from `schema`)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "value"
        if err["type"] == "extra_forbidden":
            known = _section_keys(schema, err["loc"][:-1]) if schema else []
            hint = f" (known: {', '.join(known)})" if known else ""
            parts.append(f"unknown key {where!r}{hint}")
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{where}: {message}")
    return "; ".join(parts)


def _section_keys(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = schema
    for key in loc:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))
