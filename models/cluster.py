"""Connecting to Ray: an existing cluster, or a local one started quietly with kinoray's settings.

A local cluster gets:
- Ray 2.60's token authentication, which Ray turns on for a new local cluster when
  `RAY_AUTH_MODE` is unset, without the warning Ray prints about it on every start (the README
  says it once). `RAY_AUTH_MODE=disabled` in the environment turns it off, as in Ray.
- Ray's Prometheus exporter on `ray.metrics_export_port` (8080, as on KubeRay), printed at start.
  Ray binds it on the node's address (all interfaces on a single machine), so
  `127.0.0.1:<port>` scrapes it.
- Ray's INFO lines only when `verbose` is set.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from typing import Any, NoReturn

from kinoray.models import reaper
from kinoray.models.config import RAY_RESOURCE_FIELDS, ConfigError, KinorayConfig, StageConfig

# Loggers whose INFO lines only `verbose` shows, and notices about kinoray's own choices
# (progress bars off: kinoray draws its own; token authentication: set on purpose).
QUIET_LOGGERS = ("ray", "ray.data", "ray.serve")
NOTICES = ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup")


# Warnings about a choice kinoray makes on purpose, by logger: a GPU stage also reserves its CPU
# share (Ray Data reserves one CPU for a GPU map task that names none), which Ray Data calls
# experimental on every run.
CHOSEN = {
    "ray.data._internal.execution.operators.map_operator": (
        "Specifying both num_cpus and num_gpus for map tasks is experimental",
    ),
}


class _Drop(logging.Filter):
    """Drops records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet(verbose: bool = False) -> None:
    """Ray's and Ray Serve's INFO lines in this process only when `verbose`, and no notice or
    warning about kinoray's own choices (NOTICES, CHOSEN) unless `verbose`."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for name in NOTICES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    for name, starts in CHOSEN.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Drop)]:
            logger.removeFilter(old)
        if not verbose:
            logger.addFilter(_Drop(starts))


STAGES = ("encoder", "denoiser", "decoder")


def stage_needs(
    config: KinorayConfig, extra: float, extra_for: str = "readers and writers"
) -> dict[str, dict[str, float]]:
    """What the stage pools' minimum replicas (at least one each) reserve, by Ray resource name
    ("CPU", "GPU", "memory" in bytes, custom ones) and then by who reserves it: a stage, or
    `extra_for` (readers and writers, the ingress) for `extra` CPUs."""
    needs: dict[str, dict[str, float]] = {}
    for name in STAGES:
        stage = getattr(config, name)
        replicas = max(1, stage.min_replicas)
        for resource, amount in replica_resources(stage).items():
            if amount:
                field = f"{name}.{RAY_RESOURCE_FIELDS.get(resource, 'resources.' + resource)}"
                per = _amount(resource, amount)
                who = field if replicas == 1 else f"{field} {per} x {name}.min_replicas {replicas} ="
                needs.setdefault(resource, {})[who] = amount * replicas
    if extra:
        needs.setdefault("CPU", {})[extra_for] = extra
    return needs


def replica_resources(stage: StageConfig) -> dict[str, float]:
    """One replica's reservation (`StageConfig.ray_resources`), by Ray resource name."""
    args = stage.ray_resources()
    named = {"CPU": args["num_cpus"], "GPU": args.get("num_gpus", 0.0), "memory": args.get("memory", 0.0)}
    return {**named, **args.get("resources", {})}


def local_cpus(config: KinorayConfig, extra: float, stages: bool = True) -> int:
    """Logical CPUs for a local cluster: this machine's cores, or more when the stage replicas'
    minimum asks for more (plus `extra` for readers, writers or the ingress), so that every
    actor is scheduled even on a small machine."""
    return max(os.cpu_count() or 1, needed_cpus(config, extra) if stages else math.ceil(extra))


def needed_cpus(config: KinorayConfig, extra: float) -> int:
    """The fewest logical CPUs on which the stage pools' minimum replicas and `extra` fit."""
    return math.ceil(sum(stage_needs(config, extra).get("CPU", {}).values()))


def unplaceable(
    config: KinorayConfig,
    nodes: list[dict[str, float]],
    extra: float,
    extra_for: str = "readers and writers",
    resources: tuple[str, ...] | None = None,
) -> str | None:
    """Why the stage pools' minimum replicas can never all be placed on a cluster of `nodes`
    (each node's total resources, as `ray.nodes()` gives them), or None when they can; only
    `resources` (default: all) are checked. Ray would keep them pending without a word: a job
    that never starts."""
    needs = stage_needs(config, extra, extra_for)
    if resources is not None:
        needs = {r: by for r, by in needs.items() if r in resources}
    for resource, by in needs.items():
        have = sum(node.get(resource, 0.0) for node in nodes)
        if sum(by.values()) > have + 1e-9:
            parts = ", ".join(f"{who} {_amount(resource, n)}" for who, n in by.items())
            return (
                f"the stage pools need {_amount(resource, sum(by.values()))} {_unit(resource)} "
                f"({parts}) and the cluster has {_amount(resource, have)}"
            )
    for name in STAGES:
        one = {
            r: n
            for r, n in replica_resources(getattr(config, name)).items()
            if n and (resources is None or r in resources)
        }
        if not any(all(node.get(r, 0.0) >= n - 1e-9 for r, n in one.items()) for node in nodes):
            wants = ", ".join(
                f"{name}.{RAY_RESOURCE_FIELDS.get(r, 'resources.' + r)} {_amount(r, n)}"
                for r, n in one.items()
            )
            return f"one {name} replica needs {wants} on one node, and no node of the cluster has that much"
    return None


def _unit(resource: str) -> str:
    return {"memory": "GiB of memory"}.get(resource, resource)


def _amount(resource: str, n: float) -> str:
    return f"{round(n / 1024**3, 1):g}" if resource == "memory" else f"{n:g}"


def check_placeable(
    config: KinorayConfig, extra: float, started: bool, extra_for: str = "readers and writers"
) -> None:
    """After connecting: raise ConfigError when the stage pools cannot be placed on a cluster
    this process started (nothing will add nodes to it); on another cluster, say on stderr what
    is missing, since an autoscaler may add it."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = unplaceable(config, nodes, extra, extra_for)
    if problem is None:
        return
    if started:
        raise ConfigError(f"{problem}: lower the stage settings named, or use a cluster that has them")
    print(f"kinoray: waiting for the cluster: {problem}", file=sys.stderr, flush=True)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def connect(
    config: KinorayConfig,
    address: str | None = None,
    num_cpus: int | None = None,
    verbose: bool = False,
    **init: Any,
) -> bool:
    """Connect to the cluster at `address` (or $RAY_ADDRESS), else start a local one with
    `num_cpus` logical CPUs; returns whether this call started a cluster."""
    import ray

    quiet(verbose)
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        check_reachable(address or os.environ["RAY_ADDRESS"])
        handlers = _python_handlers()
        ray.init(
            address=address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING
        )
        _restore(handlers)
        return False
    port = config.ray.metrics_export_port
    # Ray installs C++ handlers for SIGTERM (a stack dump, then exit): the caller's own Python
    # handlers (a clean stop with what finished recorded) are put back after it starts.
    handlers = _python_handlers()
    if _port_free(port):
        init["_metrics_export_port"] = port
        where = f"Ray metrics on http://127.0.0.1:{port}/metrics"
    else:
        where = f"port {port} is taken, so Ray picked another metrics port (set ray.metrics_export_port)"
    # Nothing of the cluster outlives this process, even one killed while Ray starts.
    reaper.start(os.getpid())
    ray.init(
        # "local": a cluster of this process's own, even when another local one (`ray start`)
        # is running, which a plain ray.init() would join.
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        **init,
    )
    _restore(handlers)
    print(f"kinoray: local Ray cluster, {where}", file=sys.stderr, flush=True)
    return True


def check_reachable(address: str) -> None:
    """Raise ConfigError when nothing listens at a `host:port` cluster address: Ray would retry
    for a long while, printing its own connection warnings."""
    host, _, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except OSError as exc:
        raise ConfigError(
            f"Ray address {address}: no cluster answers there ({exc.strerror or exc}); start one with "
            "`ray start --head`, or leave the address out for a local cluster"
        ) from None


def exit_now(code: int) -> NoReturn:
    """End this process with `code` at once, for a command whose work is finished and recorded
    on a local cluster it started: Ray's head processes die with it (Ray ties them to their
    parent), their workers follow the raylet, and the reaper stops the agents. `ray.shutdown`
    would stop each head process in turn, waiting up to a second for each to exit gracefully,
    when nothing is in flight that could need it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _python_handlers() -> dict[int, Any]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    found = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    return {s: h for s, h in found.items() if callable(h)}


def _restore(handlers: dict[int, Any]) -> None:
    import signal

    for sig, handler in handlers.items():
        signal.signal(sig, handler)


# Lines Ray's C++ core worker writes to the driver's stderr that tell a user nothing they can act
# on: Ray Data's actor pools always pass their constructor arguments through the object store
# (ray-project/ray#53727).
SPURIOUS_LINES = (b"has constructor arguments in the object store and max_restarts > 0",)


class StderrFilter:
    """While active, drops Ray's SPURIOUS_LINES from this process's stderr (file descriptor 2,
    where Ray's C++ code writes); everything else passes through unchanged as it arrives."""

    def __enter__(self) -> StderrFilter:
        import threading

        sys.stderr.flush()
        self._saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, args=(read,), daemon=True)
        self._thread.start()
        return self

    def _pump(self, read: int) -> None:
        pending = b""
        while True:
            chunk = os.read(read, 65536)
            if not chunk:
                break
            pending += chunk
            # Whole lines are checked; a partial line (a progress bar's "\r" update) passes at once.
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(s in line for s in SPURIOUS_LINES))
            if pending and b"\r" in pending:
                out, pending = out + pending, b""
            if out:
                os.write(self._saved, out)
        if pending:
            os.write(self._saved, pending)
        os.close(read)

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's write end: the pump drains and stops
        self._thread.join(timeout=5)
        os.close(self._saved)
