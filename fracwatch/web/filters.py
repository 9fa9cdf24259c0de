"""The study list's query parameters, shared by ``GET /api/studies``, the CSV export and the dashboard."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from fracwatch.store.search import StudyQuery
from fracwatch.web.context import parse_bound


class StudyFilters(BaseModel):
    """Query parameters of the study list and the CSV export."""

    since: str | None = Field(None, description="first received at or after (ISO date or date-time, UTC)")
    until: str | None = Field(None, description="first received before (ISO date = its midnight, or date-time, UTC)")
    category: Literal["positive", "doubt", "negative", "error", "skipped"] | None = None
    body_part: str | None = None
    accession: str | None = None
    sending_ae: str | None = None
    model_version: str | None = None
    flagged: bool | None = None
    sort: Literal["received", "-received", "scored", "-scored", "probability", "-probability"] = "-received"

    def query(self, limit: int, offset: int) -> StudyQuery:
        return StudyQuery(
            received_since=parse_bound(self.since, "since"),
            received_until=parse_bound(self.until, "until"),
            category=self.category,
            body_part=self.body_part or None,
            accession_number=self.accession or None,
            sending_ae=self.sending_ae or None,
            model_version=self.model_version or None,
            flagged=self.flagged,
            sort=self.sort,
            limit=limit,
            offset=offset,
        )

    def describe(self) -> str:
        return "&".join(f"{k}={v}" for k, v in self.model_dump(exclude_none=True).items())
