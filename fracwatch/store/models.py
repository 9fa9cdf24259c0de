"""ORM tables.

PHI policy: the database holds no patient name, patient ID, birth date or sex. Studies are identified by
Study Instance UID and, for the admins' worklist searches, the Accession Number. Everything the SR needs
from the patient and study modules is copied from the spooled source instance when the SR is built.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        result: datetime = value
        return result.replace(tzinfo=UTC) if result.tzinfo is None else result.astimezone(UTC)


DATA_ROOT = "fracwatch_data_root"  # the attribute of an engine's dialect naming its data directory (db.make_engine)


class DataPath(TypeDecorator[str]):
    """A file under the data directory, stored relative to it (POSIX separators) so that hosts sharing one
    database may mount the shared data root where each likes; read back as an absolute path under this
    host's data directory. A path outside the data directory, or one written before paths were relative,
    is stored and read as given (``root / "/abs"`` is ``/abs``)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        root: Path | None = getattr(dialect, DATA_ROOT, None)
        if value is None or root is None:
            return value
        path = Path(os.path.abspath(value))
        if path.is_relative_to(root):
            return str(PurePosixPath(*path.relative_to(root).parts))
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        root: Path | None = getattr(dialect, DATA_ROOT, None)
        if value is None or root is None:
            return None if value is None else str(value)
        return str(root / str(value))


class Base(DeclarativeBase):
    """Declarative base of every fracwatch table."""


class Installation(Base):
    """One row: this database's identity, recorded by every data directory used with it (store.identity)."""

    __tablename__ = "installation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    database_uid: Mapped[str] = mapped_column(String(36), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Study(Base):
    """One study as fracwatch has received it; ``version`` grows each time it re-opens."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(64))  # modalities in study, sorted, backslash-joined
    body_part: Mapped[str | None] = mapped_column(String(64))
    sending_ae: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A study whose scoring job failed every attempt (state "failed"): when, and why (the last attempt's error).
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # The worklist flag: the highest category any result of this study raised (positive > doubt); never lowered.
    triage_priority: Mapped[str | None] = mapped_column(String(16))
    flagged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    instances: Mapped[list[Instance]] = relationship(back_populates="study")

    __table_args__ = (
        Index("ix_studies_state_last_received", "state", "last_received_at"),
        Index("ix_studies_accession", "accession_number"),
        Index("ix_studies_first_received", "first_received_at"),
    )


class Series(Base):
    """One series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    """One stored SOP instance and where its file lies."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    laterality: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(DataPath)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    study_version: Mapped[int] = mapped_column(Integer)  # the study version this instance arrived in
    scorable: Mapped[bool] = mapped_column(Boolean, server_default=true())  # a radiograph fracwatch scores
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # spool file deleted by retention

    study: Mapped[Study] = relationship(back_populates="instances")
    series: Mapped[Series] = relationship(back_populates="instances")


class StudyResult(Base):
    """The result of scoring one version of a study with one model."""

    __tablename__ = "study_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    device_uid: Mapped[str] = mapped_column(UID)
    doubt_threshold: Mapped[float] = mapped_column(Float)
    positive_threshold: Mapped[float] = mapped_column(Float)
    probability: Mapped[float | None] = mapped_column(Float)  # max over scored images
    category: Mapped[str] = mapped_column(String(16))  # positive, doubt, negative, error
    images_scored: Mapped[int] = mapped_column(Integer)
    images_failed: Mapped[int] = mapped_column(Integer)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scored_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # first acknowledgement by a destination
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    supersedes_sop_instance_uid: Mapped[str | None] = mapped_column(UID)

    images: Mapped[list[ImageResult]] = relationship(back_populates="study_result", cascade="all, delete-orphan")

    __table_args__ = (
        UniqueConstraint("study_id", "study_version", "device_uid", name="uq_study_results_version_model"),
        Index("ix_study_results_scored_at", "scored_at"),
    )


class ImageResult(Base):
    """The score (or the error) of one instance within a study result."""

    __tablename__ = "image_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_result_id: Mapped[int] = mapped_column(ForeignKey("study_results.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    probability: Mapped[float | None] = mapped_column(Float)  # max over frames
    category: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)

    study_result: Mapped[StudyResult] = relationship(back_populates="images")
    instance: Mapped[Instance] = relationship()


class ProducedObject(Base):
    """A DICOM object fracwatch wrote (SR, heat-map SC, KOS): not scorable, so it never re-opens a study."""

    __tablename__ = "produced_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_result_id: Mapped[int] = mapped_column(ForeignKey("study_results.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(DataPath)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # file deleted by retention

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="produced_object")


class Delivery(Base):
    """The outbox: one produced object for one destination. Once ``sent`` it is never sent there again."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    produced_object_id: Mapped[int] = mapped_column(ForeignKey("produced_objects.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(128))  # AE@HOST:PORT
    state: Mapped[str] = mapped_column(String(16))  # pending, sent, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    produced_object: Mapped[ProducedObject] = relationship(back_populates="deliveries")

    __table_args__ = (
        UniqueConstraint("produced_object_id", "destination", name="uq_deliveries_object_destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )


class TriageMessage(Base):
    """A worklist triage message (HL7 ORU^R01 over MLLP, or a FHIR-shaped webhook) and its delivery state."""

    __tablename__ = "triage_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_result_id: Mapped[int] = mapped_column(ForeignKey("study_results.id", ondelete="CASCADE"), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # hl7, webhook
    endpoint: Mapped[str] = mapped_column(String(512))
    priority: Mapped[str] = mapped_column(String(16))  # positive, doubt
    # MSH-10 / the Bundle identifier. The body is rebuilt at each attempt from the result and the spooled
    # source's patient module, so no patient identifier is stored here (PHI policy).
    control_id: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16))  # pending, sent, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    ack_code: Mapped[str | None] = mapped_column(String(16))  # HL7 MSA-1 or the HTTP status
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("study_result_id", "channel", "endpoint", name="uq_triage_result_endpoint"),
        Index("ix_triage_state_next", "state", "next_attempt_at"),
    )


class ApiToken(Base):
    """An API token: only its SHA-256 is stored; the token itself is shown once when created."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer, admin
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DashboardSession(Base):
    """A signed-in browser: the cookie carries a random session key (only its SHA-256 is stored), never the API
    token it was opened with; it ends at ``expires_at``, on sign-out, or when that token is revoked."""

    __tablename__ = "dashboard_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Who read or changed what, when: one row per request touching study data."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # token name
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))  # e.g. studies.list, study.view, export.csv
    target: Mapped[str | None] = mapped_column(Text)  # a Study Instance UID or the query
    client: Mapped[str | None] = mapped_column(String(64))  # the caller's address


class Feedback(Base):
    """A radiologist's verdict on a study's result."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_result_id: Mapped[int] = mapped_column(ForeignKey("study_results.id", ondelete="CASCADE"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))  # agree, disagree, note
    note: Mapped[str | None] = mapped_column(Text)
    user: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
