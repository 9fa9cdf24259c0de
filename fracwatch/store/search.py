"""What admins ask of the result database: study search, a study's full record, statistics, the worklist.

Read-only queries; callers own the session. Each study is shown with its latest result. The one study query
(:class:`StudyQuery`) serves the CLI's ``fracwatch studies``, ``GET /api/studies``, the CSV export and the
dashboard alike: ``received_since`` / ``received_until`` bound the study's *first received* time, half-open
(``since`` included, ``until`` not).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import Select, and_, case, func, select
from sqlalchemy.orm import Session

from fracwatch.store.models import (
    Delivery,
    Feedback,
    ImageResult,
    Instance,
    ProducedObject,
    Series,
    Study,
    StudyResult,
    TriageMessage,
)
from fracwatch.store.outbox import MessageSummary, result_messages
from fracwatch.store.results import turnaround_seconds
from fracwatch.store.triage import PRIORITY_RANK

SORTS = ("received", "-received", "scored", "-scored", "probability", "-probability")


@dataclass(frozen=True)
class StudyQuery:
    """Filters, paging and sort order of the study search."""

    received_since: datetime | None = None
    received_until: datetime | None = None
    state: str | None = None
    category: str | None = None
    body_part: str | None = None
    accession_number: str | None = None
    sending_ae: str | None = None
    model_version: str | None = None
    flagged: bool | None = None
    sort: str = "-received"
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class StudyRow:
    """One study with its latest result."""

    study_instance_uid: str
    accession_number: str | None
    modality: str | None
    body_part: str | None
    sending_ae: str | None
    state: str
    version: int
    instances: int
    series: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    category: str | None
    probability: float | None
    model_name: str | None
    model_version: str | None
    scored_at: datetime | None
    triage_priority: str | None
    flagged_at: datetime | None


def _latest_result_ids() -> Any:
    return select(func.max(StudyResult.id).label("id")).group_by(StudyResult.study_id).subquery()


def _instance_counts() -> Any:
    return select(Instance.study_id, func.count(Instance.id).label("n")).group_by(Instance.study_id).subquery()


def _series_counts() -> Any:
    return select(Series.study_id, func.count(Series.id).label("n")).group_by(Series.study_id).subquery()


def _study_rows_query(query: StudyQuery) -> Select[Any]:
    latest = _latest_result_ids()
    counts = _instance_counts()
    series = _series_counts()
    stmt = (
        select(Study, StudyResult, counts.c.n, series.c.n)
        .select_from(Study)
        .outerjoin(StudyResult, and_(StudyResult.study_id == Study.id, StudyResult.id.in_(select(latest.c.id))))
        .outerjoin(counts, counts.c.study_id == Study.id)
        .outerjoin(series, series.c.study_id == Study.id)
    )
    if query.received_since is not None:
        stmt = stmt.where(Study.first_received_at >= query.received_since)
    if query.received_until is not None:
        stmt = stmt.where(Study.first_received_at < query.received_until)
    if query.state is not None:
        stmt = stmt.where(Study.state == query.state)
    if query.category is not None:
        stmt = stmt.where(StudyResult.category == query.category)
    if query.body_part is not None:
        stmt = stmt.where(func.upper(Study.body_part) == query.body_part.upper())
    if query.accession_number is not None:
        stmt = stmt.where(Study.accession_number == query.accession_number)
    if query.sending_ae is not None:
        stmt = stmt.where(Study.sending_ae == query.sending_ae)
    if query.model_version is not None:
        stmt = stmt.where(StudyResult.model_version == query.model_version)
    if query.flagged is not None:
        stmt = stmt.where(Study.triage_priority.is_not(None) if query.flagged else Study.triage_priority.is_(None))
    return stmt


def _order(stmt: Select[Any], sort: str) -> Select[Any]:
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}")
    column = {
        "received": Study.first_received_at,
        "scored": StudyResult.scored_at,
        "probability": StudyResult.probability,
    }[sort.lstrip("-")]
    direction = column.desc().nulls_last() if sort.startswith("-") else column.asc().nulls_last()
    return stmt.order_by(direction, Study.id.desc() if sort.startswith("-") else Study.id.asc())


def _row(study: Study, result: StudyResult | None, instances: int | None, series: int | None) -> StudyRow:
    return StudyRow(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        modality=study.modality,
        body_part=study.body_part,
        sending_ae=study.sending_ae,
        state=study.state,
        version=study.version,
        instances=instances or 0,
        series=series or 0,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        completed_at=study.completed_at,
        category=result.category if result else None,
        probability=result.probability if result else None,
        model_name=result.model_name if result else None,
        model_version=result.model_version if result else None,
        scored_at=result.scored_at if result else None,
        triage_priority=study.triage_priority,
        flagged_at=study.flagged_at,
    )


def search_studies(session: Session, query: StudyQuery) -> tuple[int, list[StudyRow]]:
    """The total number of matching studies and one page of them."""
    stmt = _study_rows_query(query)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    page = session.execute(_order(stmt, query.sort).limit(query.limit).offset(query.offset)).all()
    return total, [_row(*row) for row in page]


def worklist(session: Session, limit: int = 200) -> list[StudyRow]:
    """Flagged studies: positive before doubt, then the longest waiting first."""
    rank = case(PRIORITY_RANK, value=Study.triage_priority, else_=0)
    stmt = _study_rows_query(StudyQuery(flagged=True)).order_by(rank.desc(), Study.flagged_at.asc(), Study.id)
    return [_row(*row) for row in session.execute(stmt.limit(limit)).all()]


# --- one study in full ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRow:
    sop_instance_uid: str
    series_instance_uid: str
    probability: float | None
    category: str | None
    error: str | None
    frames: int
    reason: str | None = None  # why a skipped image (category "skipped", out of scope) was not scored


@dataclass(frozen=True)
class DeliveryRow:
    destination: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class ProducedRow:
    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    purged: bool
    deliveries: list[DeliveryRow]


@dataclass(frozen=True)
class ResultDetail:
    study_version: int
    category: str
    probability: float | None
    model_name: str
    model_version: str
    device_uid: str
    doubt_threshold: float
    positive_threshold: float
    scored_at: datetime
    delivered_at: datetime | None
    sr_sop_instance_uid: str | None
    supersedes_sop_instance_uid: str | None
    images: list[ImageRow]
    objects: list[ProducedRow]
    triage: list[MessageSummary]


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    received_at: datetime
    study_version: int
    calling_ae: str | None
    scorable: bool
    purged: bool


@dataclass(frozen=True)
class StudyDetail:
    study: StudyRow
    instances: list[InstanceRow]
    results: list[ResultDetail] = field(default_factory=list)  # newest first
    study_id: int = 0


def study_detail(session: Session, study_instance_uid: str) -> StudyDetail | None:
    """Everything held about one study; None when it is unknown."""
    found = session.execute(
        _study_rows_query(StudyQuery()).where(Study.study_instance_uid == study_instance_uid)
    ).first()
    if found is None:
        return None
    study, latest, n, n_series = found
    instances = [
        InstanceRow(
            i.sop_instance_uid,
            series_uid,
            i.sop_class_uid,
            i.transfer_syntax_uid,
            i.received_at,
            i.study_version,
            i.calling_ae,
            i.scorable,
            i.purged_at is not None,
        )
        for i, series_uid in session.execute(
            select(Instance, Series.series_instance_uid)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.study_id == study.id)
            .order_by(Instance.id)
        ).all()
    ]
    results = [
        _result_detail(session, r)
        for r in session.scalars(
            select(StudyResult).where(StudyResult.study_id == study.id).order_by(StudyResult.id.desc())
        )
    ]
    return StudyDetail(_row(study, latest, n, n_series), instances, results, study.id)


def _result_detail(session: Session, result: StudyResult) -> ResultDetail:
    images = [
        ImageRow(
            uid,
            series_uid,
            image.probability,
            image.category,
            None if image.category == "skipped" else image.error,
            image.frames,
            image.error if image.category == "skipped" else None,
        )
        for image, uid, series_uid in session.execute(
            select(ImageResult, Instance.sop_instance_uid, Series.series_instance_uid)
            .join(Instance, Instance.id == ImageResult.instance_id)
            .join(Series, Series.id == Instance.series_id)
            .where(ImageResult.study_result_id == result.id)
            .order_by(ImageResult.id)
        ).all()
    ]
    objects = []
    for produced in session.scalars(
        select(ProducedObject).where(ProducedObject.study_result_id == result.id).order_by(ProducedObject.id)
    ):
        deliveries = [
            DeliveryRow(d.destination, d.state, d.attempts, d.last_status, d.last_error, d.sent_at)
            for d in session.scalars(
                select(Delivery).where(Delivery.produced_object_id == produced.id).order_by(Delivery.id)
            )
        ]
        objects.append(
            ProducedRow(
                produced.kind,
                produced.sop_instance_uid,
                produced.series_instance_uid,
                produced.purged_at is not None,
                deliveries,
            )
        )
    triage = result_messages(session, result.id)
    return ResultDetail(
        study_version=result.study_version,
        category=result.category,
        probability=result.probability,
        model_name=result.model_name,
        model_version=result.model_version,
        device_uid=result.device_uid,
        doubt_threshold=result.doubt_threshold,
        positive_threshold=result.positive_threshold,
        scored_at=result.scored_at,
        delivered_at=result.delivered_at,
        sr_sop_instance_uid=result.sr_sop_instance_uid,
        supersedes_sop_instance_uid=result.supersedes_sop_instance_uid,
        images=images,
        objects=objects,
        triage=triage,
    )


def instance_path(session: Session, study_instance_uid: str, sop_instance_uid: str) -> str | None:
    """The spooled file of one received instance of this study, unless purged."""
    return session.scalar(
        select(Instance.path)
        .join(Study, Study.id == Instance.study_id)
        .where(
            Study.study_instance_uid == study_instance_uid,
            Instance.sop_instance_uid == sop_instance_uid,
            Instance.purged_at.is_(None),
        )
    )


# --- statistics -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayStats:
    day: date
    counts: dict[str, int]  # category -> studies scored that day
    positive_rate: float | None
    turnaround_p50: float | None
    turnaround_p95: float | None


@dataclass(frozen=True)
class Agreement:
    category: str
    model_version: str
    agree: int
    disagree: int
    notes: int
    agreement_rate: float | None


@dataclass(frozen=True)
class Stats:
    since: datetime | None
    until: datetime | None
    studies_scored: int
    counts: dict[str, int]
    positive_rate: float | None
    turnaround_p50: float | None
    turnaround_p95: float | None
    failures: dict[str, int]
    days: list[DayStats]
    agreement: list[Agreement]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _positive_rate(counts: Counter[str]) -> float | None:
    scored = sum(n for category, n in counts.items() if category not in ("error", "skipped"))
    return counts["positive"] / scored if scored else None


def statistics(session: Session, since: datetime | None, until: datetime | None) -> Stats:
    """Counts by category per day, positive rate, turnaround p50/p95, failures, feedback agreement."""
    stmt = select(
        StudyResult.category,
        StudyResult.scored_at,
        StudyResult.delivered_at,
        StudyResult.completed_at,
        StudyResult.study_version,
        StudyResult.images_failed,
        Study.version,
        Study.last_received_at,
    ).join(Study, Study.id == StudyResult.study_id)
    if since is not None:
        stmt = stmt.where(StudyResult.scored_at >= since)
    if until is not None:
        stmt = stmt.where(StudyResult.scored_at < until)
    counts: Counter[str] = Counter()
    per_day: dict[date, Counter[str]] = defaultdict(Counter)
    turnaround: list[float] = []
    per_day_turnaround: dict[date, list[float]] = defaultdict(list)
    images_failed = 0
    for category, scored_at, delivered_at, completed_at, version, failed, current, last_received in session.execute(
        stmt
    ):
        day = scored_at.date()
        counts[category] += 1
        per_day[day][category] += 1
        images_failed += failed
        seconds = turnaround_seconds(
            category, version, current, last_received, completed_at, delivered_at or scored_at
        )
        if seconds is not None:
            turnaround.append(seconds)
            per_day_turnaround[day].append(seconds)
    days = [
        DayStats(
            day,
            dict(per_day[day]),
            _positive_rate(per_day[day]),
            percentile(per_day_turnaround[day], 50),
            percentile(per_day_turnaround[day], 95),
        )
        for day in sorted(per_day)
    ]
    failures = {
        "studies_in_error": counts.get("error", 0),
        "images_failed": images_failed,
        "deliveries_dead": session.scalar(select(func.count()).where(Delivery.state == "dead")) or 0,
        "deliveries_pending": session.scalar(select(func.count()).where(Delivery.state == "pending")) or 0,
        "triage_dead": session.scalar(select(func.count()).where(TriageMessage.state == "dead")) or 0,
    }
    return Stats(
        since=since,
        until=until,
        studies_scored=sum(counts.values()),
        counts=dict(counts),
        positive_rate=_positive_rate(counts),
        turnaround_p50=percentile(turnaround, 50),
        turnaround_p95=percentile(turnaround, 95),
        failures=failures,
        days=days,
        agreement=_agreement(session),
    )


def _agreement(session: Session) -> list[Agreement]:
    rows = session.execute(
        select(StudyResult.category, StudyResult.model_version, Feedback.verdict, func.count(Feedback.id))
        .join(StudyResult, StudyResult.id == Feedback.study_result_id)
        .group_by(StudyResult.category, StudyResult.model_version, Feedback.verdict)
    ).all()
    table: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for category, model_version, verdict, n in rows:
        table[(category, model_version)][verdict] += n
    out = []
    for (category, model_version), verdicts in sorted(table.items()):
        judged = verdicts["agree"] + verdicts["disagree"]
        out.append(
            Agreement(
                category,
                model_version,
                verdicts["agree"],
                verdicts["disagree"],
                verdicts["note"],
                verdicts["agree"] / judged if judged else None,
            )
        )
    return out
