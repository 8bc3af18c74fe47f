"""Gradients pane: per-parameter gradient norms of the latest step on a log-scale bar, in model order.

Flags: non-finite (NaN/Inf), vanishing (< VANISH), exploding (> EXPLODE); a bias that a BatchNorm right
after it cancels is marked "redundant" rather than vanishing (its gradient is ~0 by construction). Flagged parameters are
summarised in the first line, so they are visible even among hundreds of layers; ``o`` switches
between model order and "most relevant first" (flagged, then largest norm). Scroll for the rest.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from .fmt import fnum, log_bar

VANISH = 1e-7
EXPLODE = 1e3
LO_EXP, HI_EXP = -8.0, 4.0  # the bar's scale: 1e-8 .. 1e4


def flag_of(v: float, redundant: bool = False) -> str | None:
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "Inf"
    if v > EXPLODE:
        return "explode"
    if v < VANISH:
        return "redundant" if redundant else "vanish"
    return None


FLAG_STYLE = {"NaN": "bold white on red", "Inf": "bold white on red", "explode": "bold red", "vanish": "yellow",
              "redundant": "dim"}


def render_grads(rows: list[tuple[str, float, int]], width: int, relevant_first: bool, step: int | None,
                 redundant: frozenset[str] | set[str] = frozenset()) -> Text:
    """``rows``: (parameter name, last norm, last step) in model order; ``redundant``: biases a BatchNorm
    cancels (flagged as such, not as vanishing, and not counted in the summary line's warning)."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if not rows:
        t.append("no gradients yet (they appear after the first optimizer step)", "dim")
        return t
    flags = {n: flag_of(v, n in redundant) for n, v, _ in rows}
    flagged = [(n, v) for n, v, _ in rows if flags[n] not in (None, "redundant")]
    if flagged:
        counts: dict[str, int] = {}
        for n, _ in flagged:
            counts[flags[n] or ""] = counts.get(flags[n] or "", 0) + 1
        t.append("⚠ " + ", ".join(f"{k} {c}" for k, c in counts.items()) + ": ", "bold red")
        t.append(", ".join(n for n, _ in flagged[:3]) + (" …" if len(flagged) > 3 else ""))
    else:
        t.append(f"{len(rows)} parameters, all finite", "green")
        quiet = sum(1 for f in flags.values() if f == "redundant")
        if quiet:
            t.append(f" ({quiet} redundant bias{'es' if quiet > 1 else ''})", "dim")
    t.append("\n")
    if relevant_first:
        rows = sorted(rows, key=lambda r: (flags[r[0]] in (None, "redundant"),
                                           -(r[1] if math.isfinite(r[1]) else math.inf)))
    name_w = max(8, min(max(len(r[0]) for r in rows), width // 2 - 4))
    bar_w = max(4, width - name_w - 10 - 8)
    for name, v, last in rows:
        flag = flags[name]
        shown = name if len(name) <= name_w else "…" + name[-(name_w - 1):]
        t.append(f"{shown:<{name_w}} ", "bold" if flag else "")
        n, frac = log_bar(v, LO_EXP, HI_EXP, bar_w)
        style = FLAG_STYLE.get(flag or "", "green" if frac < 0.75 else "yellow")
        t.append("━" * n, style)
        t.append("─" * (bar_w - n), "grey23")
        t.append(f" {fnum(v):>9}", FLAG_STYLE.get(flag or "", ""))
        if flag:
            t.append(f" {flag}", FLAG_STYLE[flag])
        elif step is not None and last < step:
            t.append(f" @{last}", "dim")
        t.append("\n")
    t.rstrip()
    return t


class GradientsPane(VerticalScroll):
    BINDINGS = [Binding("o", "toggle_order", "order", tooltip="model order / most relevant first")]

    def __init__(self, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self.body = Static("", id="grad-body")
        self.relevant_first = False
        self._key: tuple | None = None

    def compose(self):  # noqa: ANN201
        yield self.body

    def sync(self, grads: dict, order: list[str], step: int, force: bool = False,
             redundant: frozenset[str] | set[str] = frozenset()) -> None:
        width = max(20, self.scrollable_content_region.width or self.size.width or 40)
        rows = [(n, grads[n].last, grads[n].last_step) for n in order if n in grads]
        last = max((r[2] for r in rows), default=None)
        key = (len(rows), last, width, self.relevant_first, len(redundant))
        if key == self._key and not force:
            return
        self._key = key
        self.body.update(render_grads(rows, width, self.relevant_first, last, redundant))
        self.border_subtitle = (f"step {last}  " if last is not None else "") + \
            ("o: relevant first" if not self.relevant_first else "o: model order")

    def action_toggle_order(self) -> None:
        self.relevant_first = not self.relevant_first
        self._key = None
        app = self.app
        if hasattr(app, "refresh_panes"):
            app.refresh_panes()
