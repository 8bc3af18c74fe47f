"""The live terminal UI (Textual): ``run_ui(monitor)`` is the UI counterpart of ``Monitor.run_headless``."""

from __future__ import annotations

__all__ = ["run_ui"]


def run_ui(monitor, exit_on_end: bool = False) -> int:  # noqa: ANN001 - lazy import keeps textual off the headless path
    from .run import run_ui as _run_ui

    return _run_ui(monitor, exit_on_end=exit_on_end)
