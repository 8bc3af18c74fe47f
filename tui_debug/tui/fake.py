"""A monitor-shaped object with no training thread: drives the app in tests, snapshots and demos.

It holds a real ``Session`` and ``ErrorTracker``; tests feed the same event objects the training
thread would (``emit``), and see what the app asked for in ``requests`` / ``paused`` / ``stopped``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import types
from typing import Any

from ..config import DebugConfig
from ..errors import ErrorTracker
from ..events import LossSiteEvent, ModelEvent, OptimizerEvent, ScriptEnded, StepRecord
from ..report import build_report, write_report
from ..session import Session


class FakeMonitor:
    def __init__(self, run_dir: str, script: str = "train.py", recover: str = "safe") -> None:
        self.config = DebugConfig(enable_file_output=False, enable_console_output=False, recover=recover)
        self.run_dir = run_dir
        self.report_path = os.path.join(run_dir, "report.json")
        self.tracker = ErrorTracker(self.config)
        self.session = Session(self.config, self.tracker, script=script, argv=[script], run_dir=run_dir,
                               report_path=self.report_path)
        self.session.sample_memory = lambda: None  # type: ignore[method-assign]  # deterministic pictures
        self.target = types.SimpleNamespace(display=os.path.basename(script))
        self.capture = types.SimpleNamespace(listeners=[])
        self.requests: list[str] = []
        self.paused = False
        self.pause_held = False  # (tests set it: the training thread reached the boundary)
        self.stopped = False
        self.reports = 0
        self._terminate: int | None = None
        self._ids = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[list[Any]] | None = None
        self._t = 1000.0

    # -- the monitor interface the app uses ----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[list[Any]]) -> None:
        self.loop, self.queue = loop, q

    def request(self, name: str) -> int:
        self.requests.append(name)
        return next(self._ids)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = self.pause_held = False

    def stop_training(self) -> bool:
        self.stopped = True
        return True

    def dump_report(self) -> str:
        os.makedirs(self.run_dir, exist_ok=True)
        write_report(self.report_path, build_report(self.session))
        self.reports += 1
        return self.report_path

    # -- feeding ----------------------------------------------------------------------------------
    def emit(self, *events: Any) -> None:
        assert self.queue is not None, "the app has not started the monitor yet"
        self.queue.put_nowait(list(events))

    def output(self, stream: str, text: str) -> None:
        for listener in self.capture.listeners:
            listener(stream, text)

    def setup(self, losses: tuple[str, ...] = ("loss",)) -> None:
        self.emit(ModelEvent("model", "Sequential", 8906, 8906, ["cpu"]),
                  OptimizerEvent(0, "Adam", 1, [0.001]),
                  *(LossSiteEvent(i, n, f"train.py:{40 + i}") for i, n in enumerate(losses)))

    def steps(self, start: int, n: int, losses: Any, grads: dict[str, Any] | None = None,
              dt: float = 0.01, checked_every: int = 1) -> None:
        """``losses(step) -> list of values`` (one per loss site); ``grads(step) -> {name: norm}``;
        with ``checked_every`` k > 1, only steps that are multiples of k are checked (fast steps sampled)."""
        batch = []
        for s in range(start, start + n):
            self._t += dt
            if s % checked_every:
                batch.append(StepRecord(step=s, time=self._t, duration=dt, optimizer=0, losses=[], grad_names=None,
                                        grad_norms=None, checked=False))
                continue
            g = grads(s) if callable(grads) else grads
            batch.append(StepRecord(step=s, time=self._t, duration=dt, optimizer=0,
                                    losses=list(enumerate(losses(s))),
                                    grad_names=list(g) if g else None, grad_norms=list(g.values()) if g else None))
        self.queue.put_nowait(batch)  # type: ignore[union-attr]

    def end(self, status: str = "finished", exit_code: int = 0, exception: BaseException | None = None) -> None:
        self.emit(ScriptEnded(status, exit_code, exception=exception, step=self.session.steps))
