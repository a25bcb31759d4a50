"""Bar charts as inline SVG, drawn on the server: the console needs no script and no chart library (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, BAR_H, GAP, LABEL_W = 640, 18, 6, 200


def bar_chart(title: str, bars: Sequence[tuple[str, float]], unit: str = "") -> str:
    """Horizontal bars, one per (label, value), scaled to the largest; values printed at the bar's end."""
    top = max((v for _, v in bars), default=0.0) or 1.0
    height = len(bars) * (BAR_H + GAP) + 24
    rows = []
    for i, (label, value) in enumerate(bars):
        y = 20 + i * (BAR_H + GAP)
        w = max(1.0, (WIDTH - LABEL_W - 90) * value / top)
        rows.append(
            f'<text x="{LABEL_W - 6}" y="{y + 13}" text-anchor="end">{escape(label[:32])}</text>'
            f'<rect x="{LABEL_W}" y="{y}" width="{w:.1f}" height="{BAR_H}" rx="2"/>'
            f'<text x="{LABEL_W + w + 6:.1f}" y="{y + 13}">{value:,.6g} {escape(unit)}</text>'
        )
    body = "".join(rows) or f'<text x="{LABEL_W}" y="34">no usage in this range</text>'
    return (f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {max(height, 48)}" '
            f'width="{WIDTH}" height="{max(height, 48)}"><text class="title" x="0" y="12">{escape(title)}</text>'
            f"{body}</svg>")
