"""The signal relay in-process: which disposition a signal gets when the script changes it between the
signal's arrival and its delivery on the monitor's loop (the end-to-end cases are in test_cli.py)."""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Iterator

import pytest

from tui_debug.signals import SignalForwarder


@pytest.fixture
def relay() -> Iterator[tuple[SignalForwarder, list[Callable[[], None]], list[int]]]:
    scheduled: list[Callable[[], None]] = []  # what the monitor's loop would run next
    defaults: list[int] = []  # signals given their default action (the report, then death)
    fw = SignalForwarder(scheduled.append, defaults.append, lambda exc: None)
    fw.install()
    try:
        yield fw, scheduled, defaults
    finally:
        fw.uninstall()


def run(scheduled: list[Callable[[], None]]) -> None:
    while scheduled:
        scheduled.pop(0)()


def test_a_handler_reset_after_its_signal_arrived_gets_nothing_not_the_default(relay: Any) -> None:
    """asyncio's remove_signal_handler right after its handler saw the signal (through the wakeup fd)
    reset it to SIG_DFL before the loop ran the delivery: the process was killed by a signal already
    handled. CPython drops such a delivery."""
    fw, scheduled, defaults = relay
    got: list[int] = []
    signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
    fw._deliver(signal.SIGUSR2, None)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    run(scheduled)
    assert defaults == [] and got == []


def test_a_signal_that_arrived_while_its_disposition_was_default_gets_the_default(relay: Any) -> None:
    fw, scheduled, defaults = relay
    got: list[int] = []
    fw._deliver(signal.SIGUSR2, None)
    signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))  # too late for this one
    run(scheduled)
    assert defaults == [signal.SIGUSR2] and got == []


def test_the_handler_set_when_the_signal_is_delivered_is_the_one_that_runs(relay: Any) -> None:
    fw, scheduled, defaults = relay
    got: list[str] = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append("first"))
    fw._deliver(signal.SIGUSR1, None)
    signal.signal(signal.SIGUSR1, lambda s, f: got.append("second"))
    run(scheduled)
    assert got == ["second"] and defaults == []


def test_the_scripts_wakeup_fd_gets_a_byte_only_for_a_signal_with_a_python_handler(relay: Any) -> None:
    fw, scheduled, defaults = relay
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        fw._wakeup_fd = w  # as set_wakeup_fd from the script's thread (asyncio) leaves it
        fw._deliver(signal.SIGUSR2, None)  # SIG_DFL: no Python handler, no byte (as CPython)
        with pytest.raises(BlockingIOError):
            os.read(r, 16)
        signal.signal(signal.SIGUSR2, lambda s, f: None)
        fw._deliver(signal.SIGUSR2, None)
        assert os.read(r, 16) == bytes([signal.SIGUSR2])
    finally:
        fw._wakeup_fd = -1
        os.close(r)
        os.close(w)
        scheduled.clear()
