"""What flows from the training thread to the sinks, and the bus that carries it.

The training thread never blocks here: ``EventBus.emit`` hands a batch to the consumer's event
loop with ``call_soon_threadsafe``; before a loop exists (or after it closed) events wait in a
bounded backlog whose overflow is counted, never silently lost for findings.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any


class GilYield:
    """Lets a training thread that waits for the GIL have it: the consumer calls ``begin()`` when
    it wakes and ``maybe()`` between units of its work (a step record folded, ~20-60 us).

    A CPU backward runs without the GIL but takes it back for a moment at most of its nodes (plain
    torch too: 28 times in the backward of 20 matrix products). A thread running Python then makes
    it wait until that thread blocks or its switch interval (5 ms) ends. The consumer's Python,
    handed its batch as a backward starts, was charged almost entirely to the training thread (~0.25%
    of the bench transformer's step). A short sleep drops the GIL long enough for the waiting thread
    to take it (the CPU backward of 20 matmul+tanh layers beside a thread spinning in Python: 126 ms
    instead of 4.9 ms; with a ``sleep(1e-6)`` every ~10 us of the spin, 4.9 ms). ``sleep(0)`` does
    not do it on Python 3.10 (0.9 us, no hand-over: 927 ms). A sleep lasts ~55 us (timer slack), so
    one comes at most every ``every_s`` of work: the consumer's throughput is at worst about halved,
    never stalled."""

    def __init__(self, every_s: float = 50e-6) -> None:
        self.every_s = every_s
        self._last = self._end = time.perf_counter()

    def begin(self) -> None:
        """A unit of the consumer's work starts: the clock restarts only if the consumer was idle
        since the last one (blocked, the GIL released), not between batches drained back to back."""
        now = time.perf_counter()
        if now - self._end > self.every_s:
            self._last = now

    def end(self) -> None:
        self._end = time.perf_counter()

    def maybe(self) -> None:
        if time.perf_counter() - self._last >= self.every_s:
            time.sleep(1e-6)
            self._last = time.perf_counter()


@dataclasses.dataclass(slots=True)
class StepRecord:
    """One optimizer step as the instrumentation saw it (plain Python values only)."""

    step: int
    time: float  # perf_counter at the step's end
    duration: float  # seconds since the previous step's end (0.0 for the first)
    optimizer: int  # index of the optimizer that stepped
    losses: list[tuple[int, float]]  # (loss site index, value)
    grad_names: list[str] | None  # parallel to grad_norms; the same list object while names are unchanged
    grad_norms: list[float] | None
    wait: float = 0.0  # seconds between the previous step's end and this step's first forward (data loading)
    act_stats: list[tuple[str, str, int, float]] | None = None  # sampled: (module, kind, samples, share)
    update_ratios: list[tuple[str, float]] | None = None  # sampled: (parameter, |update| / |weight|)
    # losses of earlier sampled-out GPU steps, read with this one: (step, loss site index, value)
    late_losses: list[tuple[int, int, float]] | None = None
    checked: bool = True  # False: a sampled-out step (its time only)


@dataclasses.dataclass(slots=True)
class ScalerSkips:
    """Iterations a GradScaler skipped since the last batch (non-finite scaled gradients: no step)."""

    count: int
    step: int  # the run's step count when they were sent


@dataclasses.dataclass(slots=True)
class LateLosses:
    """Losses of the last sampled-out steps, read at the run's end (no checked step came after them)."""

    losses: list[tuple[int, int, float]]  # (step, loss site index, value)


@dataclasses.dataclass(slots=True)
class StepSpan:
    """Consecutive sampled-out steps folded into one event (very fast steps): their count and times.

    The training thread keeps appending to it until its next flush, so that a run at thousands of
    steps per second costs the consumer one event per flush, not one per step.
    """

    first_step: int
    last_step: int
    time: float  # perf_counter at the last step's end
    optimizer: int
    durations: list[float]
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (site, value): CPU losses, finite


@dataclasses.dataclass(slots=True)
class FindingEvent:
    """A finding produced in the training thread (already classified)."""

    severity: str
    category: str
    message: str
    step: int | None
    key: str
    context: dict[str, Any]
    traceback: str | None = None
    recommendation: str | None = None
    recovery_action: str | None = None


@dataclasses.dataclass(slots=True)
class Resolved:
    """A finding of the training thread's (its key) stopped holding at ``step``."""

    key: str
    step: int


@dataclasses.dataclass(slots=True)
class LossSiteEvent:
    """A new loss call site was seen (``d_loss`` at ``train.py:42``)."""

    index: int
    name: str
    source: str


@dataclasses.dataclass(slots=True)
class ModelEvent:
    """A root model was found, or the set of models changed."""

    name: str
    cls: str
    parameters: int
    trainable: int
    devices: list[str]


@dataclasses.dataclass(slots=True)
class RedundantBias:
    """A bias that a training BatchNorm cancels: its module's output goes straight into the BatchNorm,
    which subtracts each channel's batch mean, so the bias never gets a gradient (not a vanishing one)."""

    parameter: str
    module: str
    norm: str
    step: int


@dataclasses.dataclass(slots=True)
class OptimizerEvent:
    index: int
    cls: str
    param_groups: int
    lr: list[float]


@dataclasses.dataclass(slots=True)
class ScriptEnded:
    """The script returned, exited or raised; ``exception`` is kept for classification."""

    status: str  # finished | crashed | exited | interrupted
    exit_code: int
    exception: BaseException | None = None
    failing_modules: list[str] | None = None
    step: int = 0
    evaluating: bool = False  # raised in a forward of an evaluation pass (no_grad or eval mode)


class EventBus:
    """Batches from any thread into an asyncio.Queue owned by the consumer loop."""

    def __init__(self, backlog: int = 10_000) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[list[Any]] | None = None
        self._lock = threading.Lock()
        self._backlog: collections.deque[list[Any]] = collections.deque()
        self._backlog_max = backlog
        self.dropped_events = 0

    def attach(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[Any]]) -> None:
        """Called by the consumer in its loop; replays what arrived before it existed."""
        with self._lock:
            self._loop, self._queue = loop, queue
            while self._backlog:
                queue.put_nowait(self._backlog.popleft())

    def detach(self) -> list[list[Any]]:
        """Stop delivering to the loop; returns nothing pending (later emits go to the backlog)."""
        with self._lock:
            self._loop = self._queue = None
            out = list(self._backlog)
            self._backlog.clear()
            return out

    def emit(self, batch: list[Any]) -> None:
        loop, q = self._loop, self._queue
        if loop is not None and q is not None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, batch)
                return
            except RuntimeError:  # loop closed between the check and the call
                pass
        with self._lock:
            if self._loop is not None and self._queue is not None:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, batch)
                return
            if len(self._backlog) >= self._backlog_max:
                # Keep findings: drop the oldest batch's step records only.
                old = self._backlog.popleft()
                kept = [e for e in old if not isinstance(e, StepRecord)]
                self.dropped_events += len(old) - len(kept)
                if kept:
                    self._backlog.appendleft(kept)
                    if len(self._backlog) > self._backlog_max * 2:
                        self._backlog.popleft()
                        self.dropped_events += len(kept)
            self._backlog.append(batch)

    def drain_backlog(self) -> list[list[Any]]:
        with self._lock:
            out = list(self._backlog)
            self._backlog.clear()
            return out
