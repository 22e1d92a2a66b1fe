"""The bulk driver's metrics: served while the job runs, pushed to a Pushgateway at the end."""

import http.server
import threading
import urllib.request

from helpers import free_port

from kinoray.pipelines.progress import JobMetrics


def counts(total, generated, failed, skipped, duplicate=0):
    return {
        "total": total,
        "finished": generated + failed + skipped + duplicate,
        "generated": generated,
        "failed": failed,
        "skipped": skipped,
        "duplicate": duplicate,
    }


def test_progress_is_served_and_the_summary_pushed():
    pushed = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            pushed.append((self.path, self.rfile.read(int(self.headers["Content-Length"])).decode()))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    gateway = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    port = free_port()
    metrics = JobMetrics("run-1", port=port, pushgateway=f"127.0.0.1:{gateway.server_address[1]}")
    metrics.update(counts(None, 1, 0, 1))
    metrics.update(counts(5, 3, 1, 1))
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kinoray_job_rows_total{status="ok"} 3.0' in scraped
    assert 'kinoray_job_rows_total{status="skipped"} 1.0' in scraped
    assert "kinoray_job_rows_remaining 0.0" in scraped
    assert "kinoray_job_rows_planned 5.0" in scraped
    metrics.finish()
    gateway.shutdown()
    ((path, body),) = pushed
    assert path == "/metrics/job/kinoray_batch/run/run-1"
    assert 'kinoray_job_rows_total{status="failed"} 1.0' in body
