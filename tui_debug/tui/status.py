"""The header: script, state, step, steps/s, elapsed, recovery mode, exit code; last action/notice."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from .fmt import duration

STATE_STYLE = {
    "starting": "bold cyan", "running": "bold green", "paused": "bold yellow", "pausing": "bold yellow",
    "stopping": "bold yellow",
    "finished": "bold green", "crashed": "bold white on red", "exited": "bold yellow",
    "interrupted": "bold yellow",
}


class StatusBar(Static):
    """Two lines: the run's status, then the latest notice (action acknowledged / its effect)."""

    def __init__(self, **kw) -> None:  # noqa: ANN003
        super().__init__("", **kw)
        self._last: tuple | None = None

    def show(self, script: str, state: str, step: int, sps: float | None, elapsed: float, recover: str,
             exit_code: int | None, findings: int, notice: Text | str | None, checked: int = 0) -> None:
        # fast steps sampled: say how often a step is checked ("no findings" covers those steps only)
        every = round(step / checked) if 0 < checked < step else 1
        key = (script, state, step, None if sps is None else round(sps, 1), int(elapsed), recover, exit_code,
               findings, str(notice), every)
        if key == self._last:
            return
        self._last = key
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" tui_debug ", "bold reverse")
        t.append(f" {script} ", "bold")
        t.append(f" {state.upper()} ", STATE_STYLE.get(state, "bold"))
        t.append(f"  step {step}")
        if sps and state != "paused":  # (a run's average: held at its last value while nothing steps)
            t.append(f"  {sps:.1f}/s" if sps < 100 else f"  {sps:.0f}/s")
        t.append(f"  {duration(elapsed)}")
        t.append(f"  recover:{recover}", "dim")
        if findings:
            t.append(f"  {findings} finding{'s' if findings != 1 else ''}", "red")
        if exit_code is not None:
            t.append(f"  exit {exit_code}", "bold green" if exit_code == 0 else "bold red")
        if every > 1:  # last: the first thing a narrow terminal cuts
            t.append(f"  checks 1 step in {every}", "dim")
        t.append("\n")
        if notice:
            t.append(" ")
            t.append(notice if isinstance(notice, Text) else Text(notice))
        self.update(t)
