"""`kinoray serve`: run the application on a local or existing Ray cluster until interrupted."""

from __future__ import annotations

import sys
import time

from kinoray.models.config import KinorayConfig


def serve_forever(config: KinorayConfig, address: str | None = None, verbose: bool = False) -> int:
    """Deploy the app, print one line with its URL, serve until SIGINT or SIGTERM.

    SIGTERM drains first (ServeConfig.drain_timeout_s) and returns 0; SIGINT returns 130. Serve
    and a local Ray cluster started here are shut down either way, also when the signal comes
    while the app is still starting."""
    import signal

    from ray import serve
    from ray.serve.schema import LoggingConfig

    from kinoray.deployments.app import INGRESS_CPUS, build
    from kinoray.models.cluster import check_placeable, connect, local_cpus

    received: dict[str, int] = {}

    def on_sigterm(signum: int, frame: object) -> None:
        received["signal"] = signum
        raise KeyboardInterrupt

    # Before Ray starts: `connect` puts Python handlers back over Ray's (a stack dump, exit 15).
    signal.signal(signal.SIGTERM, on_sigterm)
    started, serving = False, False
    try:
        started = connect(config, address, local_cpus(config, extra=2), verbose)
        check_placeable(config, INGRESS_CPUS * config.serve.ingress_replicas, started, "the ingress")
        logs = LoggingConfig(log_level="INFO" if verbose else "WARNING")
        serve.start(http_options={"host": config.serve.host, "port": config.serve.port}, logging_config=logs)
        serve.run(build(config), name="kinoray", route_prefix="/", logging_config=logs)
        serving = True
        base = f"http://{config.serve.host}:{config.serve.port}"
        print(f"kinoray: serving {config.model.weights} at {base}/v1 (API docs: {base}/docs)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    # A second signal while shutting down must not interrupt the shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated = received.get("signal") == signal.SIGTERM
    if terminated and serving:
        _drain(config)
    print("kinoray: shutting down", file=sys.stderr, flush=True)
    if started:  # the local cluster goes with everything on it, Serve included
        import ray

        ray.shutdown()
    elif serving:
        serve.shutdown()
    # SIGTERM is how a supervisor (Kubernetes, systemd) asks for a clean stop: a clean stop is 0.
    return 0 if terminated else 130


def _drain(config: KinorayConfig) -> None:
    """Stop taking jobs and wait for those in flight; what is left, the next server on the same
    storage runs again. Bounded: when the cluster itself went down with the signal (SIGTERM to
    the whole process group), Ray's calls would wait a minute for it."""
    import threading

    from ray import serve

    timeout = config.serve.drain_timeout_s
    print(f"kinoray: draining (up to {timeout:g} s)", file=sys.stderr, flush=True)
    outcome: dict[str, object] = {}

    def drain() -> None:
        try:
            handle = serve.get_deployment_handle("ingress", app_name="kinoray")
            outcome["left"] = handle.drain.remote(timeout).result(timeout_s=timeout + 5)
        except Exception as exc:  # shutting down regardless
            outcome["error"] = exc

    worker = threading.Thread(target=drain, daemon=True)
    worker.start()
    worker.join(timeout + 10)
    left = outcome.get("left")
    if not isinstance(left, dict):
        error = outcome.get("error", "no answer from the ingress")
        print(
            f"kinoray: drain failed ({error}); unfinished jobs run again on restart",
            file=sys.stderr,
            flush=True,
        )
        return
    if left["unfinished"]:
        print(
            f"kinoray: {left['unfinished']} job(s) unfinished; the next server on "
            f"{config.serve.storage} runs them again",
            file=sys.stderr,
            flush=True,
        )
