"""API tokens, the audit trail and radiologists' feedback. Callers own the session and its transaction."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from fracwatch.errors import FracwatchError
from fracwatch.store.models import ApiToken, AuditEvent, DashboardSession, Feedback, Study, StudyResult

ROLES = ("viewer", "admin")
VERDICTS = ("agree", "disagree", "note")
TOKEN_PREFIX = "fw_"  # noqa: S105 (a prefix that makes leaked tokens recognisable, not a secret)


class TokenError(FracwatchError):
    """A token cannot be created or revoked as asked."""


def token_digest(token: str) -> str:
    """The stored form of a token (tokens are 256-bit random, so a plain SHA-256 is enough)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and role."""

    token_id: int
    name: str
    role: str

    def may(self, role: str) -> bool:
        """True when this principal's role is ``role`` or above it."""
        return ROLES.index(self.role) >= ROLES.index(role)


def create_token(session: Session, name: str, role: str, now: datetime) -> str:
    """Store a new token's digest and return the token (shown once, never stored)."""
    if role not in ROLES:
        raise TokenError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not name or len(name) > 64:
        raise TokenError("a token name is 1-64 characters")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists; revoke it or choose another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=role, token_sha256=token_digest(token), created_at=now))
    return token


def revoke_token(session: Session, name: str, now: datetime) -> None:
    """Revoke the token called ``name``; it stops working at once."""
    done = session.execute(
        update(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)).values(revoked_at=now)
    )
    if done.rowcount == 0:  # type: ignore[attr-defined]
        raise TokenError(f"no active token named {name!r}")


@dataclass(frozen=True)
class TokenSummary:
    """A token as ``fracwatch token list`` shows it (never the token itself)."""

    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def list_tokens(session: Session) -> list[TokenSummary]:
    """Every token, oldest first."""
    rows = session.scalars(select(ApiToken).order_by(ApiToken.id))
    return [TokenSummary(t.name, t.role, t.created_at, t.last_used_at, t.revoked_at) for t in rows]


def authenticate(session: Session, token: str, now: datetime) -> Principal | None:
    """The principal holding ``token``, or None when it is unknown or revoked."""
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == token_digest(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    row.last_used_at = now
    return Principal(row.id, row.name, row.role)


def open_session(session: Session, principal: Principal, now: datetime, lifetime: timedelta) -> str:
    """A new dashboard session for ``principal``; returns its key (for the cookie; only its digest is stored).
    Expired sessions are swept here, so the table holds only live ones."""
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    key = secrets.token_urlsafe(32)
    session.add(
        DashboardSession(
            key_sha256=token_digest(key), token_id=principal.token_id, created_at=now, expires_at=now + lifetime
        )
    )
    return key


def session_principal(session: Session, key: str, now: datetime) -> Principal | None:
    """Who a dashboard session key belongs to; None when unknown, expired, signed out or its token revoked."""
    row = session.execute(
        select(ApiToken, DashboardSession.expires_at)
        .join(DashboardSession, DashboardSession.token_id == ApiToken.id)
        .where(DashboardSession.key_sha256 == token_digest(key))
    ).first()
    if row is None or row[1] <= now or row[0].revoked_at is not None:
        return None
    token: ApiToken = row[0]
    token.last_used_at = now
    return Principal(token.id, token.name, token.role)


def close_session(session: Session, key: str) -> None:
    """Sign out: the session key stops working at once."""
    session.execute(delete(DashboardSession).where(DashboardSession.key_sha256 == token_digest(key)))


def record_audit(
    session: Session, principal: Principal, action: str, target: str | None, client: str | None, now: datetime
) -> None:
    """Append one audit row."""
    session.add(
        AuditEvent(at=now, actor=principal.name, role=principal.role, action=action, target=target, client=client)
    )


@dataclass(frozen=True)
class AuditRow:
    """One audit event."""

    at: datetime
    actor: str
    role: str
    action: str
    target: str | None
    client: str | None


def list_audit(
    session: Session,
    since: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[int, list[AuditRow]]:
    """Audit events, newest first, with the total count of the filtered set."""
    query = select(AuditEvent)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset))
    return total, [AuditRow(r.at, r.actor, r.role, r.action, r.target, r.client) for r in rows]


def add_feedback(
    session: Session, study_instance_uid: str, verdict: str, note: str | None, user: str, now: datetime
) -> int | None:
    """Record feedback on the study's latest result; None when the study has no result."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
    row = session.execute(
        select(Study.id, StudyResult.id)
        .join(StudyResult, StudyResult.study_id == Study.id)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(StudyResult.id.desc())
    ).first()
    if row is None:
        return None
    feedback = Feedback(study_id=row[0], study_result_id=row[1], verdict=verdict, note=note, user=user, created_at=now)
    session.add(feedback)
    session.flush()
    return feedback.id


@dataclass(frozen=True)
class FeedbackRow:
    """One feedback entry as the study page shows it."""

    verdict: str
    note: str | None
    user: str
    created_at: datetime
    study_version: int
    category: str


def study_feedback(session: Session, study_ids: Sequence[int]) -> list[FeedbackRow]:
    """Feedback on these studies, oldest first."""
    rows = session.execute(
        select(Feedback, StudyResult.study_version, StudyResult.category)
        .join(StudyResult, StudyResult.id == Feedback.study_result_id)
        .where(Feedback.study_id.in_(study_ids))
        .order_by(Feedback.id)
    ).all()
    return [FeedbackRow(f.verdict, f.note, f.user, f.created_at, version, category) for f, version, category in rows]
