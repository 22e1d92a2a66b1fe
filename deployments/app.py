"""The Serve application: `deployments.app:app` (config from $KINORAY_CONFIG or defaults), or
`deployments.app:build_app` with `args: {config: {...}}` (how a RayService passes the config)."""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve import Application

from kinoray.deployments.ingress import Ingress
from kinoray.deployments.stages import DecoderDeployment, DenoiserDeployment, EncoderDeployment
from kinoray.models.config import KinorayConfig, StageConfig

# An ingress replica parses requests and keeps job records: a small CPU share, so that it is
# scheduled beside stage replicas that hold every core.
INGRESS_CPUS = 0.25


def _options(name: str, stage: StageConfig) -> dict[str, Any]:
    actor = stage.ray_resources()
    return {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": stage.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": stage.min_replicas,
            "initial_replicas": max(1, stage.min_replicas),
            "max_replicas": stage.max_replicas,
            "target_ongoing_requests": stage.target_ongoing_requests,
        },
    }


def build(config: KinorayConfig) -> Application:
    model = config.model.model_dump()
    encoder = (
        serve.deployment(EncoderDeployment)
        .options(**_options("encoder", config.encoder))
        .bind(
            model,
            config.encoder.batch_size,
            config.encoder.batch_wait_timeout_s,
            config.encode_options(),
        )
    )
    denoiser = (
        serve.deployment(DenoiserDeployment)
        .options(**_options("denoiser", config.denoiser))
        .bind(
            model,
            config.serve.storage,
            config.denoiser.batch_size,
            config.denoiser.batch_wait_timeout_s,
            config.denoise_options(),
        )
    )
    decoder = (
        serve.deployment(DecoderDeployment)
        .options(**_options("decoder", config.decoder))
        .bind(
            model,
            config.serve.storage,
            config.decoder.decode_options(),
            config.decoder.batch_size,
            config.decoder.batch_wait_timeout_s,
        )
    )
    return (
        serve.deployment(Ingress)
        .options(
            name="ingress",
            num_replicas=config.serve.ingress_replicas,
            max_ongoing_requests=config.serve.ingress_max_ongoing_requests,
            ray_actor_options={"num_cpus": INGRESS_CPUS},
        )
        .bind(config.model_dump(mode="json"), encoder, denoiser, decoder)
    )


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run` / serveConfigV2: args `config` (a dict) or `config_path`."""
    if "config" in args:
        config = KinorayConfig.model_validate(args["config"])
    else:
        config = KinorayConfig.load(args.get("config_path") or os.environ.get("KINORAY_CONFIG"))
    return build(config)


app = build_app({})
