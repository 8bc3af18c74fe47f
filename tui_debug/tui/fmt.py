"""Small text helpers shared by the panes (pure functions, easy to test)."""

from __future__ import annotations

import math

from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fnum(v: float | None) -> str:
    """A compact number: 4 significant digits, non-finite as nan/inf."""
    if v is None:
        return "-"
    if v != v:
        return "nan"
    if v in (math.inf, -math.inf):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


def duration(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def sparkline(points: list[float], width: int) -> Text:
    """One line of block characters; NaN is a red ``×``, +/-Inf a red ``↑``/``↓`` (never dropped).

    With more points than columns, each column covers a bucket: its last finite value, or the
    non-finite marker when the bucket holds any non-finite value.
    """
    out = Text()
    if width <= 0 or not points:
        return out
    n = len(points)
    if n > width:
        buckets = []
        for c in range(width):
            lo, hi = c * n // width, max(c * n // width + 1, (c + 1) * n // width)
            chunk = points[lo:hi]
            bad = [v for v in chunk if not math.isfinite(v)]
            buckets.append(bad[-1] if bad else chunk[-1])
        points = buckets
    finite = [v for v in points if math.isfinite(v)]
    lo = min(finite) if finite else 0.0
    hi = max(finite) if finite else 1.0
    span = hi - lo
    for v in points:
        if v != v:
            out.append("×", "bold red")
        elif math.isinf(v):
            out.append("↑" if v > 0 else "↓", "bold red")
        else:
            k = int((v - lo) / span * (len(BLOCKS) - 1)) if span > 0 else len(BLOCKS) // 2
            out.append(BLOCKS[max(0, min(len(BLOCKS) - 1, k))], "cyan")
    return out


def log_bar(value: float, lo_exp: float, hi_exp: float, width: int) -> tuple[int, float]:
    """(filled cells, fraction) of ``value`` on a log10 scale from 10**lo_exp to 10**hi_exp."""
    if width <= 0:
        return 0, 0.0
    if not math.isfinite(value):
        return width, 1.0
    if value <= 0:
        return 0, 0.0
    frac = (math.log10(value) - lo_exp) / max(1e-9, hi_exp - lo_exp)
    frac = max(0.0, min(1.0, frac))
    return max(1, round(frac * width)) if value > 0 else 0, frac


def bar(used: float, total: float, width: int) -> Text:
    frac = 0.0 if not total else max(0.0, min(1.0, used / total))
    n = round(frac * width)
    style = "green" if frac < 0.7 else "yellow" if frac < 0.9 else "red"
    t = Text("█" * n, style)
    t.append("░" * (width - n), "grey39")
    return t
