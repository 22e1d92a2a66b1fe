"""The bulk driver's own metrics: progress and throughput of the running job.

The stage actors' metrics go through Ray's exporter; these live in the driver process, served
by prometheus-client on `batch.metrics_port` while the job runs and pushed to a Pushgateway at
the end where one is configured.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server

log = logging.getLogger(__name__)
# label -> the job state's count
STATUSES = {"ok": "generated", "failed": "failed", "skipped": "skipped", "duplicate": "duplicate"}


class JobMetrics:
    """`kinoray_job_*` gauges, updated from the job state's counts (`JobState.progress`)."""

    def __init__(self, run: str, port: int | None = None, pushgateway: str | None = None):
        self.registry = CollectorRegistry()
        self.pushgateway = pushgateway
        self.run = run
        self.start = time.time()
        self.rows = Counter(
            "kinoray_job_rows", "Rows finished by this job, by status", ["status"], registry=self.registry
        )
        self._seen = dict.fromkeys(STATUSES, 0)
        self.total = Gauge(
            "kinoray_job_rows_planned",
            "Rows in the prompt tables (once read to the end)",
            registry=self.registry,
        )
        self.remaining = Gauge("kinoray_job_rows_remaining", "Rows not finished yet", registry=self.registry)
        self.vpm = Gauge(
            "kinoray_job_videos_per_minute", "Videos per minute since the job started", registry=self.registry
        )
        self.server = None
        if port is not None:
            self.server, _ = start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def update(self, counts: dict[str, Any]) -> None:
        for label, key in STATUSES.items():
            if counts[key] > self._seen[label]:
                self.rows.labels(status=label).inc(counts[key] - self._seen[label])
                self._seen[label] = counts[key]
        if counts["total"] is not None:
            self.total.set(counts["total"])
            self.remaining.set(counts["total"] - counts["finished"])
        self.vpm.set(60.0 * counts["generated"] / max(time.time() - self.start, 1e-9))

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
