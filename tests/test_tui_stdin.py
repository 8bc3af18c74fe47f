"""The script's stdin under the UI (tui_debug/tui/stdin.py): what ``input()``, pdb and ``for line in
sys.stdin`` get, in the script's thread, from lines the app feeds."""

from __future__ import annotations

import ctypes
import io
import sys
import threading
import time

import pytest

from tui_debug.tui.stdin import UiStdin


def reader(fn):
    """Run ``fn`` in a thread (as the script runs); its result or exception in ``box``."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_input_asks_the_app_and_returns_the_line_it_feeds(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = threading.Event()
    stdin = UiStdin(ask=asked.set)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", out)
    t, box = reader(lambda: input("run name? "))
    assert asked.wait(10)  # the script waits: the app is told
    assert t.is_alive() and out.getvalue() == "run name? "  # the prompt went to stdout (the Output pane)
    stdin.feed("my run\n")
    t.join(10)
    assert box == {"value": "my run"}


def test_end_of_file_ends_input_and_reading_all(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = UiStdin(ask=lambda: None)
    for text in ("a\n", "b\n", ""):  # typed ahead: no wait
        stdin.feed(text)
    assert stdin.read() == "a\nb\n"
    stdin.feed("")
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(EOFError):
        input()


def test_lines_iterate_and_sized_reads_keep_the_rest() -> None:
    stdin = UiStdin(ask=lambda: None)
    for text in ("hello\n", "x\n", ""):
        stdin.feed(text)
    assert stdin.readline(3) == "hel" and stdin.readline() == "lo\n"
    assert list(stdin) == ["x\n"]
    assert not stdin.isatty()
    with pytest.raises(io.UnsupportedOperation):
        stdin.fileno()  # (so input() takes the path that reads sys.stdin, not the terminal)


def test_a_reader_gets_the_end_of_file_once_the_app_is_gone() -> None:
    """The app ended (quit, or it failed) while the script waited: it must not wait for ever."""
    asked = threading.Event()
    stdin = UiStdin(ask=asked.set)
    t, box = reader(stdin.readline)
    assert asked.wait(10)  # waiting now
    stdin.detach_app()
    t.join(10)
    assert box == {"value": ""} and stdin.readline() == ""


def test_the_time_spent_waiting_is_reported_and_an_interrupt_reaches_the_reader() -> None:
    """q / Ctrl+C stop training with a KeyboardInterrupt in the script's thread: it must arrive while
    the script waits for a line (a plain blocking get would hold it until a line came)."""
    asked = threading.Event()
    waits: list[float] = []
    stdin = UiStdin(ask=asked.set, waited=waits.append)
    t, box = reader(stdin.readline)
    assert asked.wait(10)
    time.sleep(0.2)  # (a wait of a known length, not a wait for a result)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(KeyboardInterrupt))
    t.join(10)
    assert not t.is_alive() and isinstance(box.get("error"), KeyboardInterrupt)
    assert len(waits) == 1 and waits[0] >= 0.2


def test_a_zero_size_read_returns_at_once_and_a_waiting_reader_asks_again() -> None:
    """readline(0) is "" at once, as io's is (it waited for a whole line, then returned "", which reads
    as the end of file). Two threads reading at once: the app merges their asks and one line answers
    one reader, so a reader that still waits asks again."""
    asks = []
    stdin = UiStdin(ask=lambda: asks.append(time.monotonic()))
    assert stdin.readline(0) == "" and asks == []
    t1, box1 = reader(stdin.readline)
    t2, box2 = reader(stdin.readline)
    stdin.feed("one\n")
    deadline = time.monotonic() + 10
    while len(asks) < 3 and time.monotonic() < deadline:  # the second reader's ask again
        time.sleep(0.05)
    assert len(asks) >= 3 and stdin.waiting == 1
    stdin.feed("two\n")
    t1.join(10)
    t2.join(10)
    assert sorted([box1["value"], box2["value"]]) == ["one\n", "two\n"] and stdin.waiting == 0
