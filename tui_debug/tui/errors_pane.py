"""Errors pane: findings as they happen, severity-coloured; Enter opens a finding's detail."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ..errors import ErrorInfo
from .messages import ShowFinding

SEVERITY_STYLE = {"debug": "dim", "info": "cyan", "warning": "yellow", "error": "bold red", "critical": "bold white on red"}
SEVERITY_TAG = {"debug": "DBG", "info": "INF", "warning": "WRN", "error": "ERR", "critical": "CRT"}


def finding_line(info: ErrorInfo) -> Text:
    sev = info.severity.value
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(SEVERITY_TAG.get(sev, sev[:3].upper()), SEVERITY_STYLE.get(sev, ""))
    t.append(f" {info.category.value.replace('_error', '')}", "bold")
    t.append(f" @{info.step if info.step is not None else '-'}", "dim")
    if info.count > 1:
        t.append(f" x{info.count}", "magenta")
    if info.resolved:
        t.append(" ✓", "green")
    t.append(f" {info.message}")
    return t


class ErrorsPane(OptionList):
    """One line per distinct finding (repeats bump the count); newest at the bottom."""


    def __init__(self, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self._shown: dict[str, tuple] = {}
        self._ids: list[str] = []

    def sync(self, findings: list[ErrorInfo]) -> None:
        ids = [f.error_id for f in findings]
        if ids[:len(self._ids)] != self._ids:  # an old finding was evicted: rebuild
            self.clear_options()
            self._shown.clear()
            self._ids = []
        follow = self.highlighted is None or self.highlighted >= len(self._ids) - 1
        new = []
        for idx, info in enumerate(findings):
            key = (info.count, info.severity, info.resolved, info.message, info.step)
            if idx < len(self._ids):
                if self._shown.get(info.error_id) != key:
                    self._shown[info.error_id] = key
                    self.replace_option_prompt_at_index(idx, finding_line(info))
            else:
                self._shown[info.error_id] = key
                new.append(Option(finding_line(info), id=info.error_id))
                self._ids.append(info.error_id)
        if new:
            self.add_options(new)
            if follow and (not self.has_focus or self.highlighted is None):
                self.highlighted = len(self._ids) - 1
        self.border_subtitle = f"{len(self._ids)}  ⏎ detail" if self._ids else "no findings yet"

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.post_message(ShowFinding(event.option.id))
