"""Statistics: studies per day, positive rate, turnaround, failures, reader agreement — with SVG charts."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from fracwatch.store import search
from fracwatch.store.search import Stats
from fracwatch.web import charts
from fracwatch.web.context import Ctx, parse_bound
from fracwatch.web.pages.common import User, page

router = APIRouter(include_in_schema=False)


@router.get("/stats", response_class=HTMLResponse)
def stats_page(
    request: Request, ctx: Ctx, principal: User, since: str | None = None, until: str | None = None
) -> HTMLResponse:
    ctx.audit(request, principal, "stats", f"since={since}&until={until}")
    with ctx.read() as session:
        stats = search.statistics(session, parse_bound(since, "since"), parse_bound(until, "until"))
    return page(request, "stats.html", principal, stats=stats, charts=_charts(stats), since=since, until=until)


def _charts(stats: Stats) -> dict[str, str]:
    labels = [d.day.isoformat() for d in stats.days]
    return {
        "volume": charts.stacked_bars("Studies scored per day", labels, [d.counts for d in stats.days]),
        "rate": charts.lines(
            "Positive rate per day",
            labels,
            [charts.Series("positive rate", "#c0392b", [d.positive_rate for d in stats.days])],
        ),
        "turnaround": charts.lines(
            "Turnaround per day (seconds)",
            labels,
            [
                charts.Series("p50", "#2e86c1", [d.turnaround_p50 for d in stats.days]),
                charts.Series("p95", "#8e44ad", [d.turnaround_p95 for d in stats.days]),
            ],
            unit=" s",
        ),
    }
