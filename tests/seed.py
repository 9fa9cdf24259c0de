"""Rows for query tests, written through the store's own units of work (no hand-made SQL)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from fracwatch.domain import InstanceHeader, ReceivedInstance
from fracwatch.store import instances, results
from fracwatch.store import triage as triage_store
from fracwatch.store.instances import HandOver
from fracwatch.store.results import ImageScore, NewResult, ReportFile


def seed_study(
    sessions: sessionmaker[Any],
    uid: str,
    *,
    received_at: datetime,
    category: str | None = "negative",
    probability: float = 0.1,
    accession: str = "ACC",
    body_part: str = "WRIST",
    sending_ae: str = "MODALITY",
    model_version: str = "1.0.0",
    images: int = 1,
    spool: Path | None = None,
    destinations: tuple[str, ...] = (),
    flag_categories: tuple[str, ...] = ("positive",),
) -> int | None:
    """A received study (``images`` DX instances) scored ``received_at + 30 s``; returns the result id."""
    ids = []
    for n in range(images):
        sop = f"{uid}.{n + 1}"
        path = (spool / f"{sop}.dcm") if spool else Path(f"/nonexistent/{sop}.dcm")
        if spool:
            path.write_bytes(b"spooled")
        header = InstanceHeader(
            uid, f"{uid}.0", sop, "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1", "DX", body_part, accession
        )
        with sessions() as session, session.begin():
            instances.record_instance(session, ReceivedInstance(header, path, 7, sending_ae, received_at))
            ids.append(instances.find_instance(session, sop).id)  # type: ignore[union-attr]
    if category is None:
        return None
    scored_at = received_at + timedelta(seconds=30)
    with sessions() as session, session.begin():
        instances.complete_stable_studies(session, received_at + timedelta(seconds=10), 1)
        instances.mark_ready(session, HandOver(uid, 1), received_at + timedelta(seconds=11))
        report = ReportFile(
            f"{uid}.9",
            "1.2.840.10008.5.1.4.1.1.88.34",
            f"{uid}.8",
            str(spool / f"{uid}.sr.dcm") if spool else "/nonexistent/sr.dcm",
        )
        if spool:
            Path(report.path).write_bytes(b"sr")
        result_id = results.save_result(
            session,
            NewResult(
                study_instance_uid=uid,
                study_version=1,
                model_name="fracwatch-phantom",
                model_version=model_version,
                device_uid="2.25.1",
                doubt_threshold=0.3,
                positive_threshold=0.7,
                probability=probability,
                category=category,
                images=[ImageScore(i, probability, category, None) for i in ids],
                scored_at=scored_at,
                report=report,
                destinations=list(destinations),
            ),
        )
        triage_store.raise_flag(session, result_id, flag_categories, [], f"c{uid[-6:]}", scored_at)
    return result_id
