"""The bulk driver's own metrics: progress and throughput of the running job.

The stage actors' metrics go through Ray's exporter; these live in the driver process, served
by prometheus-client on `batch.metrics_port` while the job runs and pushed to a Pushgateway at
the end where one is configured.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server

log = logging.getLogger(__name__)


class JobMetrics:
    def __init__(self, run: str, total: int, port: int | None = None, pushgateway: str | None = None):
        self.registry = CollectorRegistry()
        self.pushgateway = pushgateway
        self.run = run
        self.start = time.time()
        self.rows = Counter(
            "kinoray_job_rows", "Rows finished by this job, by status", ["status"], registry=self.registry
        )
        self.total = Gauge("kinoray_job_rows_planned", "Rows in the prompt table", registry=self.registry)
        self.remaining = Gauge("kinoray_job_rows_remaining", "Rows not finished yet", registry=self.registry)
        self.vpm = Gauge(
            "kinoray_job_videos_per_minute", "Videos per minute since the job started", registry=self.registry
        )
        self.total.set(total)
        self.remaining.set(total)
        self.server = None
        if port is not None:
            self.server, _ = start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def add(self, status: str, n: int = 1) -> None:
        if n:
            self.rows.labels(status=status).inc(n)
            self.remaining.dec(n)
        ok = self.rows.labels(status="ok")._value.get()
        self.vpm.set(60.0 * ok / max(time.time() - self.start, 1e-9))

    def finish(self) -> None:
        if self.pushgateway:
            try:
                push_to_gateway(
                    self.pushgateway,
                    job="kinoray_batch",
                    registry=self.registry,
                    grouping_key={"run": self.run},
                )
            except OSError as exc:
                log.warning("could not push the job summary to %s: %s", self.pushgateway, exc)
        if self.server is not None:
            self.server.shutdown()
