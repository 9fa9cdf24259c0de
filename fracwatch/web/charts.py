"""Small server-rendered SVG charts for the dashboard (no JavaScript, no build step)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

CATEGORY_COLOURS = {"positive": "#c0392b", "doubt": "#e67e22", "negative": "#2e86c1", "error": "#7f8c8d"}
WIDTH, HEIGHT, PAD = 640, 200, 36


@dataclass(frozen=True)
class Series:
    """One line of a line chart."""

    name: str
    colour: str
    values: Sequence[float | None]


def _x(index: int, count: int) -> float:
    span = WIDTH - 2 * PAD
    return PAD + (span * (index + 0.5) / count if count else 0)


def _frame(title: str, top: float, unit: str, labels: Sequence[str], body: str) -> str:
    count = len(labels)
    ticks = "".join(
        f'<text x="{_x(i, count):.1f}" y="{HEIGHT - 8}" font-size="9" text-anchor="middle">{escape(label[5:])}</text>'
        for i, label in enumerate(labels)
        if count <= 16 or i % max(1, count // 12) == 0
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" class="chart">'
        f"<title>{escape(title)}</title>"
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>'
        f'<line x1="{PAD}" y1="{PAD / 2}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>'
        f'<text x="4" y="{PAD / 2 + 4}" font-size="10">{escape(_fmt(top))}{escape(unit)}</text>'
        f'<text x="4" y="{HEIGHT - PAD}" font-size="10">0</text>'
        f"{body}{ticks}</svg>"
    )


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2f}"


def stacked_bars(title: str, labels: Sequence[str], stacks: Sequence[dict[str, int]]) -> str:
    """A bar per label, stacked by category (study volume per day)."""
    top = max((sum(s.values()) for s in stacks), default=0) or 1
    count = len(labels)
    bar = max(2.0, (WIDTH - 2 * PAD) / max(count, 1) * 0.7)
    scale = (HEIGHT - 1.5 * PAD) / top
    parts = []
    for index, stack in enumerate(stacks):
        y = float(HEIGHT - PAD)
        for category in ("error", "negative", "doubt", "positive"):
            n = stack.get(category, 0)
            if not n:
                continue
            h = n * scale
            y -= h
            parts.append(
                f'<rect x="{_x(index, count) - bar / 2:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{CATEGORY_COLOURS[category]}"><title>{escape(labels[index])}: {n} {category}</title></rect>'
            )
    return _frame(title, top, "", labels, "".join(parts))


def lines(title: str, labels: Sequence[str], series: Sequence[Series], unit: str = "") -> str:
    """One polyline per series (positive rate, turnaround p50/p95 per day); gaps where a value is missing."""
    values = [v for s in series for v in s.values if v is not None]
    top = max(values, default=0) or 1
    count = len(labels)
    scale = (HEIGHT - 1.5 * PAD) / top
    parts = []
    for line in series:
        points = [
            f"{_x(i, count):.1f},{HEIGHT - PAD - v * scale:.1f}" for i, v in enumerate(line.values) if v is not None
        ]
        if points:
            parts.append(
                f'<polyline fill="none" stroke="{line.colour}" stroke-width="2" points="{" ".join(points)}">'
                f"<title>{escape(line.name)}</title></polyline>"
            )
            parts.extend(
                f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" fill="{line.colour}"/>' for p in points
            )
    legend = "".join(
        f'<text x="{WIDTH - PAD - 120}" y="{14 + 12 * i}" font-size="10" fill="{s.colour}">{escape(s.name)}</text>'
        for i, s in enumerate(series)
    )
    return _frame(title, top, unit, labels, "".join(parts) + legend)
