"""The script's ``sys.stdin`` under the terminal UI: the lines the user types in the app's input line.

Textual reads the terminal (fd 0) for its keys, so a script reading it too (``input()``, the pdb
of a ``breakpoint()``, an "overwrite? [y/N]") got none of what was typed and waited for ever. Under
the UI the script reads this object instead: a read asks the app for a line and waits for it;
Ctrl+D in the input line is the end of file, as on a terminal. ``fileno()`` is unsupported, so
``input()`` writes its prompt to stdout (the Output pane) and calls ``readline`` here.
"""

from __future__ import annotations

import io
import queue
import time
from typing import Callable

WAIT_S = 0.1  # between two looks at the queue: an interrupt (q, Ctrl+C) reaches a waiting script
ASK_AGAIN_S = 1.0  # a waiting reader asks again (the app merges the asks): two readers, one line typed


class UiStdin(io.TextIOBase):
    """Lines fed by the app (``feed``), read by the script's thread (``readline``, ``read``...)."""

    def __init__(self, ask: Callable[[], None], waited: Callable[[float], None] | None = None) -> None:
        super().__init__()
        self._ask = ask  # the reading thread wants a line: tell the app (thread-safe)
        self.waited = waited  # then, in the reading thread: how long it waited for the user
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._rest = ""  # what a sized read left of the last line
        self._gone = False  # the app has ended: every read is the end of file
        self.waiting = 0  # readers waiting now (the app closes its input line when none is)

    # -- the app's side -----------------------------------------------------------------------
    def feed(self, text: str) -> None:
        """A line with its newline, or ``""`` for the end of file (one read returns it)."""
        self._lines.put(text)

    def detach_app(self) -> None:
        """The app is gone: a script still reading gets the end of file instead of waiting for ever."""
        self._gone = True
        self._lines.put("")

    # -- the script's side --------------------------------------------------------------------
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "strict"

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation("under tui_debug's terminal UI the script's stdin is the app's input line")

    def _line(self) -> str:
        if self._rest:
            line, self._rest = self._rest, ""
            return line
        if self._gone:
            return ""
        try:
            return self._lines.get_nowait()  # typed ahead
        except queue.Empty:
            pass
        self.waiting += 1
        self._ask()
        start = asked = time.perf_counter()
        try:
            while True:
                try:
                    return self._lines.get(timeout=WAIT_S)
                except queue.Empty:
                    if self._gone:
                        return ""
                    now = time.perf_counter()
                    if now - asked >= ASK_AGAIN_S:
                        asked = now
                        self._ask()
        finally:
            self.waiting -= 1
            if self.waited is not None:
                self.waited(time.perf_counter() - start)

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        if size == 0:
            return ""
        line = self._line()
        if size is not None and 0 <= size < len(line):
            line, self._rest = line[:size], line[size:]
        return line

    def read(self, size: int | None = -1) -> str:
        """Up to ``size`` characters (all, up to the end of file, when negative), a line at a time."""
        parts: list[str] = []
        n = 0
        while size is None or size < 0 or n < size:
            line = self.readline(-1 if size is None or size < 0 else size - n)
            if not line:
                break
            parts.append(line)
            n += len(line)
        return "".join(parts)

    def readlines(self, hint: int = -1) -> list[str]:  # type: ignore[override]
        lines: list[str] = []
        total = 0
        while hint is None or hint <= 0 or total < hint:
            line = self.readline()
            if not line:
                break
            lines.append(line)
            total += len(line)
        return lines

    def __iter__(self) -> UiStdin:  # type: ignore[override]
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line
