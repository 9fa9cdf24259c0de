"""Which spool files retention may delete, and marking them purged. Rows are kept; only files go."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from fracwatch.domain import InstanceState, StudyState
from fracwatch.store.models import Delivery, Instance, ProducedObject, Study, StudyResult

# A study still being received or scored keeps its files whatever their age.
SETTLED = (StudyState.SCORED.value, StudyState.SKIPPED.value)


@dataclass(frozen=True)
class PurgeItem:
    """One file retention would delete."""

    kind: str  # instance, produced
    id: int
    study_instance_uid: str
    sop_instance_uid: str
    path: str
    at: datetime  # received or created


def purge_candidates(session: Session, cutoff: datetime, limit: int = 10_000) -> list[PurgeItem]:
    """Files older than ``cutoff``: received instances of settled studies, produced objects none waits for."""
    received = session.execute(
        select(Instance.id, Study.study_instance_uid, Instance.sop_instance_uid, Instance.path, Instance.received_at)
        .join(Study, Study.id == Instance.study_id)
        .where(Instance.purged_at.is_(None), Instance.received_at < cutoff, Study.state.in_(SETTLED))
        .order_by(Instance.id)
        .limit(limit)
    ).all()
    waiting = exists().where(Delivery.produced_object_id == ProducedObject.id, Delivery.state == "pending")
    produced = session.execute(
        select(
            ProducedObject.id,
            Study.study_instance_uid,
            ProducedObject.sop_instance_uid,
            ProducedObject.path,
            ProducedObject.created_at,
        )
        .join(StudyResult, StudyResult.id == ProducedObject.study_result_id)
        .join(Study, Study.id == StudyResult.study_id)
        .where(ProducedObject.purged_at.is_(None), ProducedObject.created_at < cutoff, ~waiting)
        .order_by(ProducedObject.id)
        .limit(limit)
    ).all()
    return [PurgeItem("instance", *row) for row in received] + [PurgeItem("produced", *row) for row in produced]


def mark_purged(session: Session, items: Sequence[PurgeItem], now: datetime) -> None:
    """Record that these files are gone."""
    instances = [item.id for item in items if item.kind == "instance"]
    if instances:
        session.execute(
            update(Instance).where(Instance.id.in_(instances)).values(purged_at=now, state=InstanceState.PURGED.value)
        )
    produced = [item.id for item in items if item.kind == "produced"]
    if produced:
        session.execute(update(ProducedObject).where(ProducedObject.id.in_(produced)).values(purged_at=now))
