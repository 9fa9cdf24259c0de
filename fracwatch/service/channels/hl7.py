"""HL7 v2 over MLLP: an ORU^R01 per flagged study, its ACK read back (AA accepts; AR/CR are permanent)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import hl7
from hl7.mllp import open_hl7_connection

from fracwatch.config import Settings
from fracwatch.service.outbox import Attempt
from fracwatch.triage.messages import HL7Header, TriageFacts, build_oru, read_ack

NAME = "hl7"


def endpoints(settings: Settings) -> list[str]:
    """The configured MLLP listeners, HOST:PORT."""
    return [str(endpoint) for endpoint in settings.triage_hl7]


def from_settings(settings: Settings) -> HL7Channel:
    """The channel with the configured MSH header and send timeout."""
    header = HL7Header(
        settings.hl7_sending_application,
        settings.hl7_sending_facility,
        settings.hl7_receiving_application,
        settings.hl7_receiving_facility,
    )
    return HL7Channel(header, settings.send_timeout)


async def _exchange(host: str, port: int, text: str, timeout: float) -> Any:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, encoding="utf-8"), timeout)
    try:
        writer.writemessage(hl7.parse(text))
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()


class HL7Channel:
    """One MLLP exchange per message: send the ORU^R01, read and interpret the ACK."""

    def __init__(self, header: HL7Header, timeout: float = 30.0) -> None:
        self._header = header
        self._timeout = timeout

    def send(self, endpoint: str, facts: TriageFacts, now: datetime) -> Attempt:
        host, _, port = endpoint.rpartition(":")
        message = build_oru(facts, self._header, now)
        try:
            answer = asyncio.run(_exchange(host.strip("[]"), int(port), str(message), self._timeout))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            return Attempt(False, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        ack = read_ack(answer, facts.control_id)
        if ack.accepted:
            return Attempt(True, ack.code)
        return Attempt(False, ack.code or None, f"NAK {ack.code}: {ack.text}".strip(), permanent=ack.permanent)
