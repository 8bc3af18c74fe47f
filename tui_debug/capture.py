"""Capture everything written to fds 1 and 2 (Python, C/C++/CUDA, child processes).

Each fd is pointed at a pipe (or a pty when it was a terminal, so line buffering, ``isatty`` and
progress bars behave as before); a reader thread per fd passes the bytes through to the original
destination (headless) and keeps a bounded tail plus ``output.log``. The training thread only
ever writes into the pipe, which the reader keeps drained.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import faulthandler
import fcntl
import os
import pty
import sys
import termios
import threading
import tty
from typing import Callable

OutputListener = Callable[[str, str], None]  # (stream, text)
MAX_PARTIAL = 8192
MIDLINE_WAIT_S = 0.05  # how long a monitor line waits for the script to finish the line it is writing


class OutputTail:
    """The last N lines per run, tagged with their stream; carriage returns keep the final state."""

    def __init__(self, max_lines: int) -> None:
        self.lines: collections.deque[tuple[str, str]] = collections.deque(maxlen=max_lines)
        self._partial: dict[str, str] = {"stdout": "", "stderr": ""}
        self._lock = threading.Lock()
        self.total_bytes = 0

    def feed(self, stream: str, text: str) -> None:
        with self._lock:
            self.total_bytes += len(text)
            buf = self._partial.get(stream, "") + text
            *complete, rest = buf.split("\n")
            for line in complete:
                self.lines.append((stream, _cr(line)))
            self._partial[stream] = rest[-MAX_PARTIAL:]

    def tail(self, n: int | None = None) -> list[tuple[str, str]]:
        with self._lock:
            out = list(self.lines)
            for stream, rest in self._partial.items():
                if rest:
                    out.append((stream, _cr(rest)))
        return out[-n:] if n else out


def _cr(line: str) -> str:
    line = line.rstrip("\r")
    return line.rsplit("\r", 1)[-1] if "\r" in line else line


class _Stream:
    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.forward = True  # passed on to the original fd (off once that fails)
        self.saved = os.dup(fd)
        if os.isatty(fd):
            master, slave = pty.openpty()
            tty.setraw(slave)  # no \n -> \r\n translation, no echo
            try:
                size = fcntl.ioctl(self.saved, termios.TIOCGWINSZ, b"\0" * 8)
                fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
            except OSError:
                pass
            self.read_fd, write_fd = master, slave
        else:
            self.read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        os.close(write_fd)
        self.thread: threading.Thread | None = None
        self.midline = False  # the last bytes passed through did not end a line
        self.shares_terminal = False  # it goes where the monitor's lines go (see write_monitor)


class OutputCapture:
    """Redirect fds 1/2 into reader threads; ``stop`` restores them exactly."""

    def __init__(self, tail_lines: int = 2000, log_path: str | None = None, passthrough: bool = True,
                 max_log_bytes: int = 100 * 1024 * 1024) -> None:
        self.tail = OutputTail(tail_lines)
        self.passthrough = passthrough
        self.log_path = log_path
        self.max_log_bytes = max_log_bytes
        self._log = None
        self.log_error: str | None = None  # why output.log stopped being written
        self._log_size = 0
        self._log_lock = threading.Lock()
        self._term_lock = threading.Lock()  # pass-through writes and the monitor's lines, whole
        self._term_cond = threading.Condition(self._term_lock)  # a script's line completed
        self._streams: list[_Stream] = []
        self.listeners: list[OutputListener] = []
        self.active = False
        self._ended_midline = False  # stopped while the script's last line was open (see stop)
        self._fault_was_on = False

    def start(self) -> None:
        if self.log_path:
            try:
                self._log = open(self.log_path, "ab")
            except OSError as exc:
                self.log_error = f"{self.log_path}: {exc.strerror or exc}"
        _flush_all()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            try:
                st = _Stream(fd, name)
            except OSError:
                continue
            st.thread = threading.Thread(target=self._reader, args=(st,), name=f"tui_debug-{name}", daemon=True)
            st.thread.start()
            self._streams.append(st)
        try:
            term = os.fstat(self.terminal_fd)
            for st in self._streams:
                st.shares_terminal = os.path.samestat(os.fstat(st.saved), term)
        except OSError:
            pass
        self._fault_was_on = faulthandler.is_enabled()
        try:
            # A native crash (SIGSEGV, an abort in C++ code) kills the reader threads with the process,
            # and whatever the script's fd 2 got last with them. The crashing thread's Python stack
            # goes straight to the original stderr instead (plain Python prints nothing at all).
            faulthandler.enable(self.terminal_fd, all_threads=False)
        except (OSError, ValueError, RuntimeError):
            pass
        self.active = True

    @property
    def terminal_fd(self) -> int:
        """The original stderr (where the monitor's own lines go)."""
        for st in self._streams:
            if st.fd == 2:
                return st.saved
        return 2

    def original_fd(self, fd: int) -> int:
        for st in self._streams:
            if st.fd == fd:
                return st.saved
        return fd

    def _reader(self, st: _Stream) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                data = os.read(st.read_fd, 65536)
            except InterruptedError:
                continue
            except OSError:  # pty: EIO once every writer is gone
                data = b""
            if not data:
                break
            if self.passthrough and st.forward:
                with self._term_cond:
                    try:
                        _write_all(st.saved, data)
                        st.midline = not data.endswith(b"\n")
                    except BrokenPipeError:
                        # Its reader is gone (`| head`): as under plain Python, the script's next write
                        # to this stream fails with BrokenPipeError (our end of its pipe closes below),
                        # instead of the script blocking on a pipe nobody drains.
                        st.midline = False
                        self._term_cond.notify_all()
                        self._write_log(data)
                        break
                    except OSError:  # any other failure: stop forwarding, keep draining and logging
                        st.forward = st.midline = False
                    self._term_cond.notify_all()
            self._write_log(data)
            text = decoder.decode(data)
            if text:
                self.tail.feed(st.name, text)
                for listener in list(self.listeners):
                    try:
                        listener(st.name, text)
                    except Exception:
                        pass
        try:
            os.close(st.read_fd)
        except OSError:
            pass

    def _write_log(self, data: bytes) -> None:
        if self._log is None:
            return
        with self._log_lock:
            if self._log is None:
                return
            try:
                if self._log_size + len(data) > self.max_log_bytes and self.log_path:
                    self._log.close()
                    os.replace(self.log_path, self.log_path + ".1")
                    self._log = open(self.log_path, "ab")
                    self._log_size = 0
                self._log.write(data)
                self._log_size += len(data)
            except (OSError, ValueError) as exc:
                # A full disk or a deleted run folder: the log stops, never the reader (a dead reader
                # leaves the script blocked in its next write once the pipe fills).
                self.log_error = f"{self.log_path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
                log, self._log = self._log, None
                try:
                    log.close()
                except (OSError, ValueError):
                    pass
                self._say(f"tui_debug: the script's output is no longer written to {self.log_error} "
                          "(it still passes through, and the report keeps its tail)\n")

    def _say(self, text: str) -> None:
        """A monitor line at once, from a reader thread (which must not wait for a line to end)."""
        try:
            _write_all(self.terminal_fd if self.active else 2, text.encode("utf-8", "replace"))
        except OSError:
            pass

    def echo(self, text: str) -> None:
        """What the user typed for the script's stdin under the UI (see tui/stdin.py), after its prompt,
        as a terminal would show it: in the tail (the Output pane, the replay, the report) and the log."""
        self._write_log(text.encode("utf-8", "replace"))
        self.tail.feed("stdout", text)
        for listener in list(self.listeners):
            try:
                listener("stdout", text)
            except Exception:
                pass

    def write_monitor(self, text: str) -> None:
        """A line of the monitor's own, straight to the real stderr (not into the captured output)."""
        data = text.encode("utf-8", "replace")
        with self._term_cond:
            # Never in the middle of the script's line. A line written in pieces (Python prints a
            # traceback's last line as "RuntimeError: " and then the message) is waited for, briefly;
            # one that stays open (a tqdm bar) gets a new line started.
            if self.passthrough:
                self._term_cond.wait_for(self._line_ended, MIDLINE_WAIT_S)
            if self.passthrough and not self._line_ended():
                data = b"\n" + data
                for st in self._streams:
                    if st.shares_terminal:
                        st.midline = False
            elif self._ended_midline and not self.active:
                data = b"\n" + data
                self._ended_midline = False
            try:
                _write_all(self.terminal_fd if self.active else 2, data)
            except OSError:
                pass

    def _line_ended(self) -> bool:
        return not any(st.midline and st.shares_terminal for st in self._streams)

    def stop(self, timeout: float = 2.0) -> None:
        if not self.active:
            return
        self.active = False
        _flush_all()
        for st in self._streams:
            os.dup2(st.saved, st.fd)  # closes our write end held by fd 1/2
        try:  # before the fd it writes to is closed
            if self._fault_was_on:
                faulthandler.enable(2, all_threads=True)  # as -X faulthandler had it
            else:
                faulthandler.disable()
        except (OSError, ValueError, RuntimeError):
            pass
        for st in self._streams:
            if st.thread is not None:
                st.thread.join(timeout)  # a child that still holds the pipe must not hang us
        # The script's last line left open (a progress bar): the monitor's closing lines start a new one
        self._ended_midline = self.passthrough and not self._line_ended()
        for st in self._streams:
            os.close(st.saved)
        self._streams.clear()
        with self._log_lock:
            log, self._log = self._log, None
            if log is not None:
                try:
                    log.close()
                except (OSError, ValueError) as exc:  # its buffered tail could not be written
                    self.log_error = f"{self.log_path}: {exc}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (printf from extensions)
    except Exception:
        pass
