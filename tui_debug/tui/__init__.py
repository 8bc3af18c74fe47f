"""The live terminal UI (Textual): ``run_ui(monitor)`` is the UI counterpart of ``Monitor.run_headless``."""

from __future__ import annotations

__all__ = ["run_api", "run_ui"]


def run_ui(monitor, exit_on_end: bool = False) -> int:  # noqa: ANN001 - lazy import keeps textual off the headless path
    from .run import run_ui as _run_ui

    return _run_ui(monitor, exit_on_end=exit_on_end)


def run_api(work, debugger=None, exit_on_end: bool = False):  # noqa: ANN001, ANN201
    """Run ``work()`` in a worker thread under the terminal UI and return its result (API ``ui=True``).

    The same Monitor as ``python -m tui_debug`` (instrumentation, findings, report in a run folder);
    the API's own findings go into it once. An exception raised by ``work`` is re-raised after the
    UI closes. Must be called from the main thread (signals and the terminal belong to it).
    """
    import os

    from ..cli import default_run_dir
    from ..config import DebugConfig
    from ..monitor import Monitor
    from ..runner import Target

    config = getattr(debugger, "config", None) or DebugConfig()
    target = Target(kind="callable", name="<api>", argv=list(__import__("sys").argv), code=None, path=None,
                    fn=work)  # type: ignore[arg-type]
    run_dir = os.path.abspath(default_run_dir("api"))
    monitor = Monitor(target, config, run_dir=run_dir, report_path=os.path.join(run_dir, "report.json"),
                      passthrough=False)
    monitor.run_ui(exit_on_end=exit_on_end)
    if monitor.runner.exception is not None:
        raise monitor.runner.exception
    return monitor.runner.value
