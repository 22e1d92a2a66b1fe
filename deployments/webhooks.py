"""Job events POSTed to configured receivers, signed and retried as OpenAI's webhooks are.

Signature: Standard Webhooks (https://www.standardwebhooks.com), which OpenAI uses and its
clients verify with `client.webhooks.verify_signature`: headers `webhook-id`,
`webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed by the secret's base64 after `whsec_`.

Delivery is at least once: an event is written to the job store's outbox before any attempt and
removed only after a 2xx, so an ingress restart between attempts still delivers it. Attempts are
spaced by doubling delays (1 s, 2 s, 4 s ... at most RETRY_MAX_DELAY_S) until RETRY_FOR_S after
the event; each attempt is signed with its own timestamp, so a late retry still verifies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from kinoray.deployments.store import JobStore
from kinoray.models import telemetry
from kinoray.models.config import WebhookEndpoint

log = logging.getLogger(__name__)

RETRY_FIRST_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 300.0
RETRY_FOR_S = 24 * 3600.0
TIMEOUT_S = 10.0


def signature_headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery of `body`."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": event_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{digest}"}


def event(kind: str, video_id: str) -> dict[str, Any]:
    """An event as OpenAI shapes it: {id, object, created_at, type, data: {id}}."""
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "created_at": int(time.time()),
        "type": kind,
        "data": {"id": video_id},
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # An event goes to the configured URL only, never where a redirect points.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"content-type": "application/json", **headers}
    )
    try:
        with _opener.open(request, timeout=TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


class Outbox:
    """Pending deliveries in the job store (`outbox/`), one file per (event, endpoint)."""

    def __init__(self, store: JobStore, endpoints: list[WebhookEndpoint]):
        self.store, self.endpoints = store, endpoints

    def publish(self, kind: str, video_id: str) -> None:
        """Queue `kind` for `video_id` to every endpoint that asked for it."""
        payload = event(kind, video_id)
        for n, endpoint in enumerate(self.endpoints):
            if kind in endpoint.events:
                self.store.put_outbox(
                    f"{payload['id']}-{n}",
                    {"endpoint": n, "url": endpoint.url, "event": payload, "attempts": 0, "next_at": 0.0},
                )

    async def deliver_due(self) -> int:
        """Attempt every delivery that is due; returns how many succeeded."""
        delivered = 0
        now = time.time()
        for name, entry in self.store.outbox():
            if entry["next_at"] > now:
                continue
            n = int(entry["endpoint"])
            # Only an endpoint still configured, at the URL it had: never an address from storage.
            if n >= len(self.endpoints) or self.endpoints[n].url != entry["url"]:
                self.store.delete_outbox(name)
                continue
            body = json.dumps(entry["event"], separators=(",", ":")).encode()
            headers = signature_headers(
                self.endpoints[n].secret, entry["event"]["id"], int(time.time()), body
            )
            status = await asyncio.to_thread(_post, entry["url"], body, headers)
            entry["attempts"] += 1
            kind = entry["event"]["type"]
            if 200 <= status < 300:
                self.store.delete_outbox(name)
                telemetry.inc("kinoray_webhook_deliveries_total", type=kind, outcome="delivered")
                delivered += 1
            elif now - entry["event"]["created_at"] > RETRY_FOR_S:
                log.warning(
                    "webhook %s to %s given up after %d attempts", kind, entry["url"], entry["attempts"]
                )
                self.store.delete_outbox(name)
                telemetry.inc("kinoray_webhook_deliveries_total", type=kind, outcome="given_up")
            else:
                delay = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (entry["attempts"] - 1))
                entry["next_at"] = time.time() + delay
                self.store.put_outbox(name, entry)
                telemetry.inc("kinoray_webhook_deliveries_total", type=kind, outcome="retried")
        return delivered
