"""The outbox's shared retry bookkeeping and the triage channels it finds by name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from fracwatch.config import load_settings
from fracwatch.service import channels
from fracwatch.service.channels.hl7 import HL7Channel
from fracwatch.service.channels.webhook import WebhookChannel
from fracwatch.service.outbox import DEAD, RETRY, SENT, Attempt, RetryPolicy, settle
from fracwatch.store.triage import Endpoint

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def test_settle_sends_retries_with_back_off_and_dead_letters() -> None:
    policy = RetryPolicy(base_seconds=10, max_delay_seconds=60, max_attempts=4)
    assert settle(policy, Attempt(True, "AA"), 0, NOW).outcome == SENT
    first = settle(policy, Attempt(False, None, "refused"), 0, NOW)
    assert (first.outcome, first.next_attempt_at) == (RETRY, NOW + timedelta(seconds=10))
    assert settle(policy, Attempt(False, None, "refused"), 2, NOW).next_attempt_at == NOW + timedelta(seconds=40)
    assert settle(policy, Attempt(False, None, "refused"), 3, NOW).outcome == DEAD  # the fourth attempt failed
    capped = settle(RetryPolicy(10, 60, 100), Attempt(False, None, "refused"), 20, NOW)
    assert capped.next_attempt_at == NOW + timedelta(seconds=60)
    permanent = settle(policy, Attempt(False, "AR", "rejected", permanent=True), 0, NOW)
    assert (permanent.outcome, permanent.next_attempt_at) == (DEAD, None)


def test_channels_are_found_by_name_with_their_settings(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        data_dir=tmp_path,
        triage_hl7=["ris.example:2575"],
        triage_webhooks=["https://worklist.example/hook"],
    )
    built = channels.channels_of(settings)
    assert set(built) == {"hl7", "webhook"}
    assert isinstance(built["hl7"], HL7Channel) and isinstance(built["webhook"], WebhookChannel)
    assert channels.triage_endpoints(settings) == [
        Endpoint("hl7", "ris.example:2575"),
        Endpoint("webhook", "https://worklist.example/hook"),
    ]
    assert channels.triage_endpoints(load_settings(None, data_dir=tmp_path)) == []
