"""Loss pane: one sparkline per loss (``d_loss``, ``g_loss`` told apart) with last and min values."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from .fmt import fnum, sparkline


def render_losses(losses: list, width: int) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    if not losses:
        t.append("no loss seen yet (losses appear at the first backward())", "dim")
        return t
    name_w = max(4, min(12, max(len(s.name) for s in losses)))
    for i, s in enumerate(losses):
        if i:
            t.append("\n")
        points = [v for _, v in s.history.points()]
        vals = f" {fnum(s.last):>8} min {fnum(s.min):<8}"
        if s.nonfinite:
            vals += f" ✗{s.nonfinite}"
        spark_w = max(4, width - name_w - 1 - len(vals))
        t.append(f"{s.name[:name_w]:<{name_w}} ", "bold")
        t.append(sparkline(points, spark_w))
        t.append(" " * max(0, spark_w - min(spark_w, len(points))))
        t.append(vals, "bold red" if s.last is not None and s.last != s.last else "")
    return t


class LossPane(Static):
    def __init__(self, **kw) -> None:  # noqa: ANN003
        super().__init__("", **kw)
        self._key: tuple | None = None
        self.lines = 1

    def sync(self, losses: list, force: bool = False) -> None:
        width = max(20, self.content_region.width or 40)
        key = (width, tuple((s.name, s.count) for s in losses))
        if key == self._key and not force:
            return
        self._key = key
        text = render_losses(losses, width)
        self.lines = len(text.plain.splitlines()) or 1
        self.update(text)
