"""Signals for a script that runs in a worker thread.

Python delivers signals to the main thread only, and ``signal.signal`` raises there when called
from any other thread. The forwarder owns the real handlers in the main thread, lets the script
register its own from the training thread (``signal.signal``/``getsignal`` keep their contract),
and hands every delivery to the consumer's loop, where the script's handler runs, or, with none
registered, the monitor's default (interrupt the script, or write the report and die as Python would).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

_MAIN_THREAD = threading.main_thread()  # the process's (the script's threading.main_thread() is its own)
FORWARDED = tuple(s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2))


class SignalForwarder:
    def __init__(self, schedule: Callable[[Callable[[], None]], None],
                 on_default: Callable[[int], None], on_handler_exception: Callable[[BaseException], None],
                 script_frame: Callable[[], Any] = lambda: None) -> None:
        self._schedule = schedule
        self._script_frame = script_frame  # the frame a handler is given (see ScriptRunner.script_frame)
        self._on_default = on_default
        self._on_handler_exception = on_handler_exception
        self._script: dict[int, Any] = {}
        self._saved: dict[int, Any] = {}
        self._orig_signal = signal.signal
        self._orig_getsignal = signal.getsignal
        self._orig_set_wakeup_fd = signal.set_wakeup_fd
        self._wakeup_fd = -1  # the script's (an asyncio loop's self-pipe), see _set_wakeup_fd
        self._installed = False
        self._fork_hook = False  # os.register_at_fork done (it cannot be undone: the hook checks _installed)

    def install(self) -> None:
        """In the main thread, before the script starts."""
        for sig in FORWARDED:
            if self._orig_getsignal(sig) is signal.SIG_IGN:
                # Ignored by whoever started us (nohup, a shell's background job): it stays ignored,
                # as under plain Python, until the script installs a handler of its own
                self._script[sig] = signal.SIG_IGN
                continue
            self._saved[sig] = self._orig_signal(sig, self._deliver)
            self._script[sig] = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal = self._signal  # type: ignore[assignment]
        signal.getsignal = self._getsignal  # type: ignore[assignment]
        signal.set_wakeup_fd = self._set_wakeup_fd  # type: ignore[assignment]
        self._installed = True
        if not self._fork_hook:
            self._fork_hook = True
            os.register_at_fork(after_in_child=self._in_forked_child)

    def _in_forked_child(self) -> None:
        """A forked child (multiprocessing's workers) has no loop to deliver to: it gets the dispositions
        the script set, as under plain Python. Our relay swallowed the SIGTERM of Pool.terminate(), and
        the parent waited for that worker for ever."""
        if not self._give_module_back():
            return
        try:
            self._orig_set_wakeup_fd(-1)  # (the monitor's loop is the parent's)
        except (ValueError, OSError):
            pass
        for sig in FORWARDED:
            handler = self._script.get(sig)
            if handler is None:
                continue
            try:
                self._orig_signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass

    def _give_module_back(self) -> bool:
        """The signal module's own functions back; False when they were not ours to give back."""
        if not self._installed:
            return False
        self._installed = False
        signal.signal = self._orig_signal  # type: ignore[assignment]
        signal.getsignal = self._orig_getsignal  # type: ignore[assignment]
        signal.set_wakeup_fd = self._orig_set_wakeup_fd  # type: ignore[assignment]
        return True

    def uninstall(self) -> None:
        if not self._give_module_back():
            return
        self._wakeup_fd = -1
        for sig, old in self._saved.items():
            try:
                self._orig_signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass

    # -- the script's view ------------------------------------------------------------------------
    def _signal(self, signalnum: int, handler: Any) -> Any:
        sig = int(signalnum)
        if sig in self._script:
            if not (callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN)):
                raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
            previous = self._script[sig]
            self._script[sig] = handler
            if sig not in self._saved and handler is not signal.SIG_IGN:  # ignored until now: relay it
                self._own_now(sig)
            return previous
        if threading.current_thread() is _MAIN_THREAD:
            return self._orig_signal(signalnum, handler)
        # A signal we do not pre-own: record it and have the main thread install our relay.
        previous = self._orig_getsignal(signalnum)
        self._script[sig] = handler
        self._own_now(sig)
        return previous

    def _own_now(self, sig: int) -> None:
        """Our relay for ``sig``, installed by the main thread before ``signal.signal`` returns, as a
        script that signals itself right after expects (briefly waited for; never for long)."""
        if threading.current_thread() is _MAIN_THREAD:
            self._own(sig)
            return
        done = threading.Event()

        def own() -> None:
            try:
                self._own(sig)
            finally:
                done.set()

        self._schedule(own)
        done.wait(2.0)

    def _own(self, sig: int) -> None:
        try:
            self._saved.setdefault(sig, self._orig_signal(sig, self._deliver))
        except (ValueError, OSError):
            pass

    def _set_wakeup_fd(self, fd: int, *, warn_on_full_buffer: bool = True) -> int:
        """From the script's thread (asyncio's ``loop.add_signal_handler``): the relay writes each
        signal's number to ``fd`` as Python's own wakeup fd would (the real one is the main
        thread's only)."""
        if threading.current_thread() is _MAIN_THREAD:
            return self._orig_set_wakeup_fd(fd, warn_on_full_buffer=warn_on_full_buffer)
        previous, self._wakeup_fd = self._wakeup_fd, int(fd)
        return previous

    def _getsignal(self, signalnum: int) -> Any:
        sig = int(signalnum)
        if sig in self._script:
            return self._script[sig]
        return self._orig_getsignal(signalnum)

    # -- delivery ---------------------------------------------------------------------------------
    def _deliver(self, signum: int, frame: Any) -> None:
        """The real handler: only schedules work, so it never interrupts the monitor mid-update."""
        at_arrival = self._script.get(signum, signal.SIG_DFL)
        fd = self._wakeup_fd
        if fd >= 0 and at_arrival not in (signal.SIG_DFL, signal.SIG_IGN, None):  # (Python's writes for its handlers)
            try:
                os.write(fd, bytes([signum]))
            except OSError:  # full or closed: as Python's own, never an error here
                pass
        self._schedule(lambda: self._dispatch(signum, at_arrival))

    def _dispatch(self, signum: int, at_arrival: Any = None) -> None:
        """The default action is the disposition's when the signal arrived (the kernel's moment). A
        Python handler is the one set now, as CPython's; one reset to SIG_DFL or SIG_IGN since the
        signal arrived gets nothing, as in CPython (asyncio's remove_signal_handler right after its
        handler ran had the process killed by a signal already handled)."""
        handler = self._script.get(signum, signal.SIG_DFL)
        if at_arrival is None:
            at_arrival = handler
        if at_arrival is signal.SIG_IGN:
            return
        if at_arrival is signal.SIG_DFL:
            self._on_default(signum)
            return
        if handler is signal.SIG_DFL or handler is signal.SIG_IGN or handler is None:
            return
        if handler is signal.default_int_handler:
            self._on_default(signum)
            return
        try:
            frame = self._script_frame()
        except Exception:
            frame = None
        try:
            handler(signum, frame)
        except BaseException as exc:  # e.g. a handler that raises KeyboardInterrupt or calls sys.exit
            self._on_handler_exception(exc)
