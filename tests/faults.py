"""Scorers that fail on purpose, run inside the scoring processes (``Daemon(processor_factory=...)``).

A study whose Accession Number names a fault gets it; every other study is scored by the real scorer. They stand
in for what a hostile or broken study does to a process (a decoder's segfault, an endless loop), which the sandbox
must contain; a real one is a bug to fix, so the tests cannot rely on finding one.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from fracwatch.config import Settings
from fracwatch.jobs.sandbox import build_scorer
from fracwatch.model.bundle import Bundle
from fracwatch.service.lifecycle import Clock, StudyProcessor
from fracwatch.store.instances import HandOver
from fracwatch.store.models import Study

LOGGER = logging.getLogger("tests.faults")
CRASH = "FAULT-CRASH"  # the process kills itself with SIGKILL (as the OOM killer would)
HANG = "FAULT-HANG"  # the process never returns
RAISE = "FAULT-RAISE"  # the scorer raises
SLOW = "FAULT-SLOW"  # scored, after a pause long enough to kill the worker host meanwhile


def faulty(settings: Settings, sessions: sessionmaker[Any], bundle: Bundle, clock: Clock) -> StudyProcessor:
    real = build_scorer(settings, sessions, bundle, clock)

    def process(hand_overs: list[HandOver]) -> None:
        for hand_over in hand_overs:
            with sessions() as session:
                accession = session.scalar(
                    select(Study.accession_number).where(Study.study_instance_uid == hand_over.study_instance_uid)
                )
            LOGGER.warning("scoring started: study %s (%s)", hand_over.study_instance_uid, accession)
            if accession == CRASH:
                os.kill(os.getpid(), signal.SIGKILL)
            if accession == HANG:
                time.sleep(3600)
            if accession == RAISE:
                raise RuntimeError("a scorer bug")
            if accession == SLOW:
                time.sleep(8)
        real(hand_overs)

    return process
