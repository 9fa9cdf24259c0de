"""Triage channels: how a flagged study's message reaches a RIS or a worklist.

A channel is one module in this package that defines ``NAME`` (the value stored in ``triage_messages.channel``),
``endpoints(settings)`` (its configured receivers) and ``from_settings(settings)`` (a :class:`TriageChannel`).
Adding a channel is one new module here plus its settings; the sender and the planner find it by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from datetime import datetime
from types import ModuleType
from typing import Protocol

from fracwatch.config import Settings
from fracwatch.service.outbox import Attempt
from fracwatch.store.triage import Endpoint
from fracwatch.triage.messages import TriageFacts


class TriageChannel(Protocol):
    """Sends one triage message to one endpoint of its kind, once."""

    def send(self, endpoint: str, facts: TriageFacts, now: datetime) -> Attempt: ...


def channel_modules() -> Sequence[ModuleType]:
    """Every channel module of this package, in name order."""
    return [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
    ]


def channels_of(settings: Settings) -> dict[str, TriageChannel]:
    """Each channel by its name, built from the settings."""
    return {module.NAME: module.from_settings(settings) for module in channel_modules()}


def triage_endpoints(settings: Settings) -> list[Endpoint]:
    """Every configured triage receiver, of every channel."""
    return [Endpoint(module.NAME, address) for module in channel_modules() for address in module.endpoints(settings)]
