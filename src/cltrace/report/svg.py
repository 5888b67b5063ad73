"""Tiny SVG figures for reports (no plotting dependency): grouped before/after bar charts."""

from __future__ import annotations

from html import escape
from pathlib import Path


def before_after_bars(
    path: Path,
    title: str,
    labels: list[str],
    before: list[float],
    after: list[float],
    *,
    names: tuple[str, str] = ("before", "after"),
) -> Path:
    """Write a horizontal grouped bar chart of probabilities (0..1) to `path` (SVG)."""
    row_h, bar_h, left, width = 34, 12, 170, 360
    height = 50 + row_h * len(labels) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (label, b, a) in enumerate(zip(labels, before, after)):
        y = 40 + i * row_h
        parts.append(
            f'<text x="{left - 8}" y="{y + bar_h + 2}" text-anchor="end">{escape(repr(label))}</text>'
        )
        for j, (value, colour) in enumerate(((b, "#8c8c8c"), (a, "#d9480f"))):
            w = max(1.0, width * max(0.0, min(1.0, value)))
            yy = y + j * (bar_h + 1)
            parts.append(f'<rect x="{left}" y="{yy}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{yy + bar_h - 2}">{value:.3f}</text>')
    ly = height - 18
    parts.append(
        f'<rect x="{left}" y="{ly - 10}" width="10" height="10" fill="#8c8c8c"/>'
        f'<text x="{left + 14}" y="{ly}">{escape(names[0])}</text>'
        f'<rect x="{left + 90}" y="{ly - 10}" width="10" height="10" fill="#d9480f"/>'
        f'<text x="{left + 104}" y="{ly}">{escape(names[1])}</text>'
    )
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path
