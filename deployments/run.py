"""`kinoray serve`: run the application on a local or existing Ray cluster until interrupted."""

from __future__ import annotations

import sys
import time

from kinoray.models.config import KinorayConfig


def serve_forever(config: KinorayConfig, address: str | None = None, verbose: bool = False) -> int:
    """Deploy the app, print one line with its URL, serve until SIGINT/SIGTERM; returns the exit
    code (130 / 143)."""
    import signal

    from ray import serve
    from ray.serve.schema import LoggingConfig

    from kinoray.deployments.app import build
    from kinoray.models.cluster import connect, local_cpus

    started = connect(config, address, local_cpus(config, extra=2), verbose)
    logs = LoggingConfig(log_level="INFO" if verbose else "WARNING")
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port}, logging_config=logs)
    serve.run(build(config), name="kinoray", route_prefix="/", logging_config=logs)
    base = f"http://{config.serve.host}:{config.serve.port}"
    print(f"kinoray: serving {config.model.weights} at {base}/v1 (API docs: {base}/docs)", flush=True)

    stopped_by = {"code": 130}  # SIGINT unless SIGTERM says otherwise

    def on_sigterm(signum: int, frame: object) -> None:
        stopped_by["code"] = 143
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    print("kinoray: shutting down", file=sys.stderr, flush=True)
    if started:  # the local cluster goes with everything on it
        import ray

        ray.shutdown()
    else:
        serve.shutdown()
    return stopped_by["code"]
