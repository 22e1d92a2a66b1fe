"""`kinoray serve`: run the application on a local or existing Ray cluster until interrupted."""

from __future__ import annotations

import os
import time

from kinoray.models.config import KinorayConfig


def serve_forever(config: KinorayConfig, address: str | None = None) -> None:
    import ray
    from ray import serve

    from kinoray.deployments.app import build

    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        stages = (config.encoder, config.denoiser, config.decoder)
        need = int(sum(s.num_cpus * max(1, s.min_replicas) for s in stages) + 2)
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(build(config), name="kinoray", route_prefix="/")
    print(
        f"kinoray is serving {config.model.weights} on http://{config.serve.host}:{config.serve.port}/v1",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
