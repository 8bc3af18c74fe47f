"""``run_ui(monitor)``: the UI counterpart of ``Monitor.run_headless``.

Textual draws on a dup of the real terminal (fd 1 before the capture redirects it); fds 1/2 are
pointed at the monitor's capture, so nothing the script (or C code, or a child) writes can reach
the screen. The terminal is restored on every way out: normal end, the app failing, SIGTERM/SIGHUP
(through the monitor's signal forwarder), ``os._exit`` in the script. Then the tail of the
output (and any traceback) is replayed to the real terminal, and ``Monitor.finish`` writes the
report and says where it is.
"""

from __future__ import annotations

import os
import sys
import termios
import threading
import traceback
from typing import Any

# Leave the alternate screen, show the cursor, stop mouse reporting / bracketed paste / kitty keys.
RESET_SEQ = ("\x1b[<u\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1015l\x1b[?2004l\x1b[?1004l"
             "\x1b[?1049l\x1b[?25h\x1b[0m")
REPLAY_LINES = 20


def make_driver(term_fd: int) -> type:
    from textual.drivers.linux_driver import LinuxDriver

    class TerminalDriver(LinuxDriver):
        """LinuxDriver drawing on ``term_fd`` (a dup of the real terminal), sized from it."""

        def __init__(self, app: Any, **kw: Any) -> None:
            super().__init__(app, **kw)
            self._file = _HangupSafeFile(open(os.dup(term_fd), "w", encoding="utf-8", errors="replace", closefd=True))

        def _get_terminal_size(self) -> tuple[int, int]:
            try:
                size = os.get_terminal_size(term_fd)
                return size.columns or 80, size.lines or 24
            except OSError:
                return 80, 24

    return TerminalDriver


class _HangupSafeFile:
    """The terminal file Textual's writer thread writes to, minus the errors of a terminal that went
    away (SSH dropped, tmux killed): Textual's writer thread dies on the first EIO, its queue fills and
    the app's thread blocks on it for good, so the SIGHUP that follows is never acted on (the process
    spun at 100% CPU and never wrote its report). Writes to a dead terminal are dropped instead."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, text: str) -> int:
        try:
            return self._file.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._file.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, close, encoding...
        return getattr(self._file, name)


class TerminalGuard:
    """Puts the terminal back (termios + escape sequences), once, from whichever way out comes first."""

    def __init__(self, term_fd: int) -> None:
        self.term_fd = term_fd
        self.in_fd = sys.__stdin__.fileno() if sys.__stdin__ is not None else 0
        try:
            self.attrs = termios.tcgetattr(self.in_fd)
        except (termios.error, OSError):
            self.attrs = None
        self._lock = threading.Lock()
        self._orig_exit = os._exit

    def restore(self) -> None:
        with self._lock:
            try:
                os.write(self.term_fd, RESET_SEQ.encode())
            except OSError:
                pass
            if self.attrs is not None:
                try:
                    termios.tcsetattr(self.in_fd, termios.TCSANOW, self.attrs)
                except (termios.error, OSError):
                    pass

    def install_exit_guard(self, on_exit: Any) -> None:
        """``os._exit`` from the script (any thread) restores the terminal and replays output first."""
        orig = self._orig_exit

        def _exit(code: int) -> None:
            try:
                self.restore()
                on_exit(code)
            finally:
                orig(code)

        os._exit = _exit  # type: ignore[assignment]

    def uninstall_exit_guard(self) -> None:
        os._exit = self._orig_exit  # type: ignore[assignment]


def replay_tail(fd: int, tail: list[tuple[str, str]], n: int = REPLAY_LINES) -> None:
    """The last ``n`` output lines, widened to include the last traceback when there is one."""
    start = max(0, len(tail) - n)
    for i in range(len(tail) - 1, max(-1, len(tail) - 400), -1):
        if tail[i][1].startswith("Traceback (most recent call last)"):
            start = min(start, i)
            break
    lines = tail[start:]
    if not lines:
        return
    out = [f"tui_debug: the script's last {len(lines)} output line{'s' if len(lines) != 1 else ''}:\n"]
    out += [line + "\n" for _, line in lines]
    try:
        data = "".join(out).encode("utf-8", "replace")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass


def run_ui(monitor: Any, exit_on_end: bool = False) -> int:
    from .app import TuiDebugApp

    term_fd = os.dup(1)  # the real terminal, kept across the capture's redirection of fd 1
    guard = TerminalGuard(term_fd)
    printer = monitor.printer
    app = TuiDebugApp(monitor, exit_on_end=exit_on_end, driver_class=make_driver(term_fd))
    own_write = printer.set_writer(lambda text: app.output_buffer.feed("tui_debug", text.removeprefix(f"{printer.prefix}: ")))
    guard.install_exit_guard(lambda code: replay_tail(term_fd, monitor.capture.tail.tail()))
    stdin_before = sys.stdin
    sys.stdin = app.stdin  # Textual reads the terminal's fd 0; the script reads the app's input line
    app.stdin.waited = monitor.instr.exclude_wait  # (the time a user takes to answer is no step's)
    failure: BaseException | None = None
    try:
        app.run()
    except BaseException as exc:  # noqa: BLE001 - the app failing must not leave a broken terminal
        failure = exc
    finally:
        app.stdin.detach_app()  # a script still reading gets the end of file
        if sys.stdin is app.stdin:  # (the API's ui=True returns to the user's process: its stdin back)
            sys.stdin = stdin_before
        guard.restore()
        guard.uninstall_exit_guard()
        printer.set_writer(own_write)
        app.gpu_poller.stop()
    if failure is None and getattr(app, "_exception", None) is not None:
        failure = app._exception  # Textual printed it already; keep going to a clean finish
    if failure is not None and not isinstance(failure, KeyboardInterrupt):
        msg = "".join(traceback.format_exception(type(failure), failure, failure.__traceback__))
        os.write(term_fd, f"tui_debug: the terminal UI failed; stopping training\n{msg}".encode("utf-8", "replace"))
    if monitor.session.ended is None and monitor._terminate is None:
        # The app is gone while the script runs (a UI failure): stop training cleanly.
        monitor.stop_training()
        if monitor.runner.thread is not None:
            monitor.runner.thread.join(10)
    replay_tail(term_fd, monitor.capture.tail.tail())
    os.close(term_fd)
    return monitor.finish()
