"""Headless sink: findings and a periodic progress line on stderr, prefixed ``tui_debug:``."""

from __future__ import annotations

from typing import Callable

from ..errors import ErrorInfo, ErrorSeverity

REPEAT_MILESTONES = (10, 100, 1000, 10_000, 100_000)


class HeadlessPrinter:
    def __init__(self, write: Callable[[str], None], min_severity: ErrorSeverity = ErrorSeverity.INFO,
                 prefix: str = "tui_debug") -> None:
        self._write = write
        self.min_severity = min_severity
        self.prefix = prefix  # the rank too, when several processes share the terminal

    def set_writer(self, write: Callable[[str], None]) -> Callable[[str], None]:
        """Send the lines elsewhere (the UI's Output pane); returns the previous writer."""
        previous, self._write = self._write, write
        return previous

    def line(self, text: str) -> None:
        self._write(f"{self.prefix}: {text}\n")

    def on_finding(self, info: ErrorInfo, is_new: bool) -> None:
        if info.severity.rank < self.min_severity.rank:
            return
        if is_new:
            self.line(info.one_line())
        elif info.count in REPEAT_MILESTONES:
            self.line(f"{info.one_line()} [repeated]")

    def on_action(self, text: str) -> None:
        self.line(f"recovery: {text}")
