"""Output pane: the script's stdout/stderr (fd-level), stderr in red, tqdm-style ``\\r`` lines kept as
one live line that is overwritten in place; bounded (``max_lines``) and scrollable."""

from __future__ import annotations

import collections
import re
import threading

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import RichLog, Static

STREAM_STYLE = {"stdout": "", "stderr": "red", "tui_debug": "bold magenta"}
# Operating-system commands (a window title, a hyperlink's target): Text.from_ansi keeps their text
# ("\x1b]0;title\x07" showed as "0;title"). A hyperlink's label, between its two, stays.
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
MAX_PENDING_CHARS = 1 << 20  # what waits between two UI ticks, at most


class OutputBuffer:
    """Thread-safe hand-over from the capture's reader threads to the UI tick (no message per write)."""

    def __init__(self, max_chars: int = MAX_PENDING_CHARS) -> None:
        self._chunks: collections.deque[tuple[str, str]] = collections.deque()
        self._size = 0
        self._max = max_chars
        self._lock = threading.Lock()
        self.dropped_chars = 0

    def feed(self, stream: str, text: str) -> None:
        with self._lock:
            self._chunks.append((stream, text))
            self._size += len(text)
            while self._size > self._max and len(self._chunks) > 1:
                _, old = self._chunks.popleft()
                self._size -= len(old)
                self.dropped_chars += len(old)

    def drain(self) -> list[tuple[str, str]]:
        with self._lock:
            out = list(self._chunks)
            self._chunks.clear()
            self._size = 0
        return out


class LineAssembler:
    """Complete lines per stream; a ``\\r`` restarts the current line (progress bars redraw in place)."""

    def __init__(self) -> None:
        self.partial: dict[str, str] = {}

    def feed(self, stream: str, text: str) -> list[tuple[str, str]]:
        buf = self.partial.get(stream, "") + text.replace("\r\n", "\n")
        *complete, rest = buf.split("\n")
        out = [(stream, _last_cr(line)) for line in complete]
        self.partial[stream] = rest[-8192:]
        return out

    def live(self) -> list[tuple[str, str]]:
        return [(s, _last_cr(p)) for s, p in self.partial.items() if _last_cr(p)]


def _last_cr(line: str) -> str:
    if "\r" not in line:
        return line
    parts = [p for p in line.split("\r")]
    for p in reversed(parts):  # a trailing \r (tqdm) leaves the previous state on screen
        if p:
            return p
    return ""


def styled(stream: str, line: str) -> Text:
    if "\x1b]" in line:
        line = _OSC.sub("", line)
    try:
        t = Text.from_ansi(line, no_wrap=True) if "\x1b" in line else Text(line, no_wrap=True)
    except Exception:
        t = Text(line, no_wrap=True)
    if stream == "tui_debug":
        return Text("▸ ", "bold magenta") + Text(line, STREAM_STYLE["tui_debug"])
    if STREAM_STYLE.get(stream):
        t.stylize(STREAM_STYLE[stream])
    return t


class OutputPane(Vertical):
    def __init__(self, max_lines: int = 2000, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self.log_view = RichLog(max_lines=max_lines, wrap=False, markup=False, auto_scroll=True, id="output-log")
        self.live_line = Static("", id="output-live")
        self.assembler = LineAssembler()
        self.lines_seen = 0

    def compose(self):  # noqa: ANN201
        yield self.log_view
        yield self.live_line

    def ingest(self, chunks: list[tuple[str, str]]) -> None:
        if not chunks:
            return
        for stream, text in chunks:
            for s, line in self.assembler.feed(stream, text):
                self.log_view.write(styled(s, line))
                self.lines_seen += 1
        live = self.assembler.live()
        text = Text(no_wrap=True, overflow="ellipsis")
        for i, (s, line) in enumerate(live):
            if i:
                text.append("\n")
            text.append(styled(s, line))
        self.live_line.update(text)
        self.live_line.display = bool(live)
        self.border_subtitle = f"{self.lines_seen} lines"
