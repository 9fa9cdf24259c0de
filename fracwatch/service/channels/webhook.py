"""A FHIR R4 Bundle POSTed to a webhook: 2xx completes, 4xx (not 408/429) is permanent, the rest is retried."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import datetime

from fracwatch.config import Settings
from fracwatch.service.outbox import Attempt
from fracwatch.triage.messages import TriageFacts, build_fhir_bundle

NAME = "webhook"


def endpoints(settings: Settings) -> list[str]:
    """The configured webhook URLs."""
    return list(settings.triage_webhooks)


def from_settings(settings: Settings) -> WebhookChannel:
    """The channel with the configured bearer token (from the environment) and send timeout."""
    token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
    return WebhookChannel(token, settings.send_timeout)


class WebhookChannel:
    """One POST per message; the control id doubles as the Idempotency-Key."""

    def __init__(self, token: str | None = None, timeout: float = 30.0) -> None:
        self._token = token
        self._timeout = timeout

    def send(self, endpoint: str, facts: TriageFacts, now: datetime) -> Attempt:
        body = json.dumps(build_fhir_bundle(facts)).encode("utf-8")
        headers = {"Content-Type": "application/fhir+json", "Idempotency-Key": facts.control_id}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")  # noqa: S310 (http/https only)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                return Attempt(True, str(response.status))
        except urllib.error.HTTPError as exc:
            permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
            return Attempt(False, str(exc.code), f"HTTP {exc.code} {exc.reason}", permanent=permanent)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return Attempt(False, None, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
