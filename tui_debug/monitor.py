"""Wires one monitored run: runner -> instrumentation -> bus -> session -> sinks (and report).

The main thread owns the event loop (headless here; the Textual app's loop for the UI). The
training thread only emits batches and applies queued actions at step boundaries.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import itertools
import os
import queue
import signal
import sys
import threading
import time
from types import ModuleType
from typing import Any, Callable

from . import distributed
from .capture import OutputCapture
from .detectors.torch_warnings import TorchWarnings
from .config import DebugConfig
from .errors import ErrorCategory, ErrorSeverity, ErrorTracker
from .events import EventBus, FindingEvent, ScriptEnded
from .instrument.hooks import Instrumentation
from .instrument import naming
from .instrument.importhook import TorchImportWatcher
from .recovery import actions
from .recovery.actions import ActionResult, Snapshots
from .report import build_report, write_report
from .runner import ScriptRunner, Target
from .session import Session
from .signals import SignalForwarder
from .sinks.headless import HeadlessPrinter

MEMORY_SAMPLE_S = 1.0
SNAPSHOT_MIN_S = 1.0  # the last-good snapshot: every snapshot_interval steps, at most once a second
INTERRUPT_HINT_S = 1.0  # after a Ctrl+C the script has not acted on: say why

# The Monitor whose instrumentation is running in this process (set in ``start``, cleared in
# ``finish``). The Python API (tui_debug.api) reads it to route its findings into this run's
# tracker instead of counting them a second time.
ACTIVE_MONITOR: "Monitor | None" = None


class Monitor:
    def __init__(self, target: Target, config: DebugConfig, run_dir: str, report_path: str,
                 passthrough: bool = True, rank: int | None = None) -> None:
        self.target = target
        if target.path:
            naming.add_user_file(target.path)  # the user's code even inside an installed package
        self.config = config
        self.run_dir = run_dir
        self.report_path = report_path
        os.makedirs(run_dir, exist_ok=True)
        self.capture = OutputCapture(config.output_tail_lines, os.path.join(run_dir, "output.log"),
                                     passthrough=passthrough, max_log_bytes=config.max_log_size)
        self.tracker = ErrorTracker(config, log_dir=run_dir, logger_name=f"tui_debug.run.{id(self):x}")
        self.tracker.set_console_output(False)
        self.session = Session(config, self.tracker, script=target.path or target.name, argv=target.argv,
                               run_dir=run_dir, report_path=report_path)
        self.session.output_tail = self.capture.tail.tail
        self.bus = EventBus()
        self.session.dropped_events = lambda: self.bus.dropped_events
        self.actions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.instr = Instrumentation(config, self.bus.emit)
        self.torch_warnings = TorchWarnings(self.bus.emit, step=lambda: self.instr.step)
        self.instr.actions = self.actions
        self.watcher = TorchImportWatcher(self._on_torch_import)
        self.runner = ScriptRunner(target, on_end=self._on_script_end, before_exit=self.instr.finish,
                                   failing_modules=self.instr.failing_modules,
                                   in_evaluation=self.instr.raised_in_evaluation, step=lambda: self.instr.step)
        self.printer = HeadlessPrinter(self.capture.write_monitor,
                                       prefix="tui_debug" if rank is None else f"tui_debug[rank {rank}]")
        self.tracker.subscribe(self.printer.on_finding)
        self.session.action_listeners.append(lambda r: self.printer.on_action(r.message))
        self.snapshots = Snapshots(keep=1)
        self.runner.on_thread_start = self._on_thread_start
        self.instr.on_step_end = self._on_step_end
        self.instr.on_skip = self._on_skip
        self.session.auto_recover = self._auto_recover
        self._lr_halvings = 0
        self._request_ids = itertools.count(1)
        self.forwarder = SignalForwarder(self._schedule, self._on_default_signal, self._on_handler_exception,
                                         script_frame=self.runner.script_frame)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[list[Any]] | None = None
        self._terminate: int | None = None
        self._last_snapshot_step = -1
        self._snapshot_models = 0  # models registered (instr.models_made) at the last snapshot
        self._snapshots_ok = True  # taking one has not failed
        self._last_snapshot_time = 0.0
        self._sigints = 0
        self._stop_asked = False  # the UI's quit stopped the script (exit 130, not a death by SIGINT)
        self._finished = False

    # -- training-thread callbacks ------------------------------------------------------------
    def _on_torch_import(self, torch: ModuleType) -> None:
        try:
            self.instr.install(torch)
        except Exception as exc:  # the run goes on uninstrumented
            self.bus.emit([FindingEvent(
                severity="warning", category="system_error", step=None, key="install-failed",
                message=f"could not instrument torch {getattr(torch, '__version__', '?')}: {exc}; "
                        "the script runs unmonitored", context={})])
        if self.config.freeze_gc_at_import:
            # Importing torch leaves ~300K objects (its modules, functions, classes; and the UI's
            # widgets) for the cyclic GC to traverse. Their first full collection (~100 ms, the
            # GIL held) would land in the first seconds of training, sooner under the UI, whose
            # allocations drive young collections; every later one would traverse them again.
            # Collect once now and take what is left out of later collections: it lives as long
            # as the process.
            gc.collect()
            gc.freeze()

    def _on_thread_start(self) -> None:
        """The instrumentation watches the training thread (torch may have been imported elsewhere)."""
        self.instr._tid = threading.get_ident()

    def _on_script_end(self, ended: ScriptEnded) -> None:
        self.bus.emit([ended])

    def _on_step_end(self) -> None:
        """Training thread, after each optimizer step: the periodic last-good snapshot (safe/auto)."""
        interval = self.config.snapshot_interval
        instr = self.instr
        # Every `interval` steps counted from the last snapshot (sampled-out steps have no post-step
        # hook, so the exact multiple may never come by); only after a checked, finite step.
        fresh = instr.models_made != self._snapshot_models  # a new model (a new fold's) since the last
        if (self.config.recover != "off" and interval > 0 and instr.last_step_finite and instr.observed_last
                and self._snapshots_ok
                and (self._last_snapshot_step <= 0 or fresh or instr.step - self._last_snapshot_step >= interval)
                and distributed.world_size() == 1):  # (no rollback there: see distributed.py)
            # ... and at most one a second: a copy of every state_dict (~0.3 ms on the toy step, which
            # does 200 steps in 30 ms) would otherwise cost fast steps ~1%
            now = time.monotonic()
            if now - self._last_snapshot_time < SNAPSHOT_MIN_S and self._last_snapshot_step > 0 and not (
                    fresh and instr.step - self._last_snapshot_step >= 50):  # (a new fold's: not one per step)
                return
            self._last_snapshot_step, self._last_snapshot_time = instr.step, now
            self._snapshot_models = instr.models_made
            try:
                self.snapshots.take(instr)
            except Exception as exc:  # e.g. ZeroRedundancyOptimizer.state_dict() before consolidation
                # no snapshots from now on; the monitor goes on (it was switched off altogether)
                self._snapshots_ok = False
                instr._pending.append(FindingEvent(
                    severity="warning", category="system_error", step=instr.step, key="snapshot-failed",
                    message=f"last-good snapshots are off: taking one raised {type(exc).__name__}: {exc}",
                    context={"exception": type(exc).__name__},
                    recommendation="Rollback (b, --recover auto) needs them; the rest of the monitor is unaffected."))

    def _on_skip(self, consecutive: int) -> None:
        """Training thread, after a skipped step. In auto mode, two in a row mean the state itself is
        poisoned (e.g. BatchNorm statistics or optimizer moments): roll back and halve the LR."""
        if self.config.recover != "auto" or consecutive != 2:
            return
        if self.snapshots.latest() is None:
            return
        self.request("rollback")
        if self._lr_halvings < self.config.max_lr_halvings:
            self._lr_halvings += 1
            self.request("lower_lr")

    def _auto_recover(self, action: str, key: str) -> str | None:
        """Main thread, --recover auto: the recovery a trend finding calls for (bounded)."""
        world = distributed.world_size()
        if world > 1 and action in ("lower_lr", "enable_clipping"):
            return "not applied: " + distributed.why_not(world)
        if action == "lower_lr":
            if self._lr_halvings >= self.config.max_lr_halvings:
                return None
            self._lr_halvings += 1
            self.request("lower_lr")
            return f"learning rate halved (auto, {self._lr_halvings}/{self.config.max_lr_halvings})"
        if action == "enable_clipping":
            if self.instr.clip_norm is not None:
                return None
            self.request("enable_clipping")
            return "gradient clipping enabled at 2x the recent median norm (auto)"
        return None

    # -- actions (any thread; applied in the training thread at the next step boundary) ----------
    ACTIONS = ("clear_cache", "lower_lr", "raise_lr", "toggle_clipping", "enable_clipping", "rollback", "checkpoint")
    # the actions that change the training's math, left out of a distributed run (see distributed.py)
    CHANGE_THE_RUN = {"lower_lr": "lower_lr", "raise_lr": "raise_lr", "toggle_clipping": "clipping",
                      "enable_clipping": "clipping", "rollback": "rollback"}

    def request(self, name: str) -> int:
        """Queue a recovery action; its ActionResult comes back through the event stream."""
        fns: dict[str, Callable[[Instrumentation], ActionResult]] = {
            "clear_cache": actions.clear_cache,
            "lower_lr": lambda i: actions.scale_lr(i, 0.5),
            "raise_lr": lambda i: actions.scale_lr(i, 2.0),
            "toggle_clipping": actions.toggle_clipping,
            "enable_clipping": lambda i: actions.set_clipping(i, actions.default_clip_norm(i)),
            "rollback": lambda i: (actions.rollback(i, self.snapshots) if self.config.recover != "off" else
                                   actions.ActionResult("rollback", False, "no snapshots are taken with --recover "
                                                        "off: nothing to roll back to", i.step)),
            "checkpoint": lambda i: actions.save_checkpoint(i, self.run_dir),
        }
        if name not in fns:
            raise ValueError(f"unknown action {name!r}; one of {', '.join(fns)}")
        request_id = next(self._request_ids)
        fn = fns[name]

        def run() -> None:
            world = distributed.world_size() if name in self.CHANGE_THE_RUN else 1
            if world > 1:  # (decided here, at the step boundary: the script may start its process group late)
                result = ActionResult(self.CHANGE_THE_RUN[name], False, "not applied: " + distributed.why_not(world),
                                      self.instr.step)
            else:
                result = fn(self.instr)
            result.request_id = request_id
            self.instr._pending.append(result)
            self.instr.flush()

        self.actions.put(run)
        self.instr.wake = True  # sampled-out steps run no post-step hook until woken
        return request_id

    def pause(self) -> None:
        """Training waits at the next step boundary until ``resume``."""
        self.instr.resume_event.clear()
        self.instr.paused = True
        self.instr.wake = True

    def resume(self) -> None:
        self.instr.paused = False
        self.instr.resume_event.set()

    @property
    def paused(self) -> bool:
        return bool(self.instr.paused)

    @property
    def pause_held(self) -> bool:
        """The training thread has reached the step boundary and waits there."""
        return bool(self.instr.pause_held)

    def stop_training(self) -> bool:
        """Stop the script as Ctrl+C would (KeyboardInterrupt at its next bytecode, exit 130).

        False when the training thread is not running. A paused run is resumed so it can unwind.
        """
        self.runner.interrupted = True
        self._stop_asked = True
        ok = self.runner.inject(KeyboardInterrupt)
        if self.instr.paused:
            self.resume()
        return ok

    def run_ui(self, exit_on_end: bool = False) -> int:
        """The terminal UI (tui_debug.tui): construct the Monitor with ``passthrough=False``."""
        from .tui import run_ui

        return run_ui(self, exit_on_end=exit_on_end)

    # -- main-thread plumbing -----------------------------------------------------------------
    def _schedule(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)
        else:
            fn()

    def _on_default_signal(self, signum: int) -> None:
        if self.session.ended is not None:
            # The UI left open on the final state: a hangup (SSH dropped) or a kill closes it. The
            # process then dies by the signal; the report keeps the script's own status.
            self._terminate = signum
            return
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= 3 or not self.runner.inject(KeyboardInterrupt):
                self.printer.line("interrupted again: stopping now")
                self._terminate = signum
            else:
                self.runner.interrupted = True
                if self._sigints == 2:
                    self.printer.line("interrupt sent again; press Ctrl+C once more to stop at once")
                elif self._loop is not None:
                    self._loop.call_later(INTERRUPT_HINT_S, self._interrupt_hint)
            return
        self._terminate = signum

    def _interrupt_hint(self) -> None:
        """A Ctrl+C reaches the script at its next Python bytecode: say so when it has not yet."""
        if self._sigints == 1 and self.session.ended is None and self._terminate is None and self.runner.alive():
            self.printer.line("interrupt sent; the script is busy outside Python code (a sleep, a lock wait, "
                              "a long C call) and gets it when that returns; Ctrl+C twice more stops at once")

    def _on_handler_exception(self, exc: BaseException) -> None:
        self.runner.interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        if not self.runner.inject(exc):
            self._terminate = signal.SIGTERM

    # -- running ----------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[list[Any]]) -> None:
        global ACTIVE_MONITOR
        ACTIVE_MONITOR = self
        self._loop = loop
        self._queue = q
        self.bus.attach(loop, q)
        self.forwarder.install()
        self.capture.start()
        self.watcher.install()
        self.torch_warnings.install()
        self.runner.start()

    def run_headless(self) -> int:
        return asyncio.run(self._headless())

    async def _headless(self) -> int:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.printer.line(f"monitoring {self.target.display}; report: {self.report_path}")
        self.start(loop, q)
        next_progress = time.monotonic() + self.config.progress_interval_s
        next_memory = 0.0
        last_progress_step = -1
        while True:
            try:
                batch = await asyncio.wait_for(q.get(), timeout=0.25)
            except (asyncio.TimeoutError, TimeoutError):
                batch = None
            got = batch is not None
            while batch is not None:
                self.session.handle(batch)
                batch = q.get_nowait() if not q.empty() else None
            now = time.monotonic()
            # Periodic work right after a batch: batches come as a backward starts, when the
            # training thread runs without the GIL (see Instrumentation._slice_over). Without batches
            # (data loading, a stall) it runs anyway, one period late.
            late = 0.0 if got else MEMORY_SAMPLE_S
            if now >= next_memory + late and self.config.enable_memory_tracking:
                self.session.sample_memory()
                next_memory = now + MEMORY_SAMPLE_S
            if now >= next_progress + late:
                next_progress = now + self.config.progress_interval_s
                if self.session.steps != last_progress_step:
                    last_progress_step = self.session.steps
                    self.printer.line(self.session.progress_line())
            if self.session.ended is not None or self._terminate is not None:
                break
        await asyncio.sleep(0)  # let batches already handed to the loop reach the queue
        return self.finish()

    def dump_report(self) -> str:
        report = build_report(self.session)
        # Why fast steps were sampled, and how far: the training thread's figures, copied
        report["performance"]["sampler"] = self.instr.sampler_summary()
        # optimizer steps skipped for non-finite gradients (--recover safe/auto): the training thread's count
        report["performance"]["skipped_steps"] = self.instr.skipped_steps
        write_report(self.report_path, report)
        return self.report_path

    def finish(self) -> int:
        """Restore the process, write the report, say where it is; returns the exit status."""
        if self._finished:
            return self.session.exit_code or 0
        self._finished = True
        global ACTIVE_MONITOR
        if ACTIVE_MONITOR is self:
            ACTIVE_MONITOR = None
        self.watcher.uninstall()
        self.torch_warnings.uninstall()
        self.forwarder.uninstall()
        backlog = self.bus.detach()  # from now on emits wait in the backlog
        if self._terminate is not None and self.session.ended is None:  # (after the end: the script's own)
            self.session.mark_interrupted(self._terminate)
            self.instr.flush()  # steps the (idle or busy) training thread has not handed over yet
        q = self._queue
        while q is not None and not q.empty():
            self.session.handle(q.get_nowait())
        for batch in backlog + self.bus.drain_backlog():
            self.session.handle(batch)
        self.capture.stop()
        try:
            self.dump_report()
            where = f"report written to {self.report_path}"
        except Exception as exc:
            where = f"could not write the report to {self.report_path}: {exc}"
        findings = self.tracker.snapshot()
        by_sev: dict[str, int] = {}
        for info in findings:
            by_sev[info.severity.value] = by_sev.get(info.severity.value, 0) + 1
        counts = (f"{len(findings)} finding{'s' if len(findings) != 1 else ''} ("
                  + ", ".join(f"{n} {k}" for k, n in sorted(by_sev.items())) + ")") if findings else "no findings"
        steps, checked = self.session.steps, self.session.checked_steps
        sampled = ""
        sampler = self.instr.sampler_summary()
        if 0 < checked < steps:
            slow = any(d["kind"] == "hooks" for d in sampler["decisions"])
            sampled = f"; {checked} checked: " + (
                f"the monitor's hooks took over {self.config.max_overhead_slow * 100:g}% of a step, so checks "
                "are sampled" if slow else "fast steps are sampled")
        if any(d["kind"] == "forward" and d["every"] > 1 for d in sampler["decisions"]):
            sampled += f"; forwards observed on {sampler['forward_observed_steps']} of {checked} checked steps"
        replays = self.instr.replays
        if replays:
            sampled += f"; {replays} non-finite step{'s' if replays != 1 else ''} found by a replay of {'their' if replays != 1 else 'its'} forward"
        self.printer.line(f"{self.session.status} after {steps} steps "
                          f"(exit {self.session.exit_code}{sampled}); {counts}; {where}")
        self.tracker.stop()
        self.runner.restore_os_exit()
        if self.runner.os_exit is not None:  # the script called os._exit: no cleanup of its own runs
            sys.stdout.flush()
            sys.stderr.flush()
            self.runner.real_os_exit(self.runner.os_exit)
        if self._terminate is not None:
            _die_by(self._terminate)
        if (isinstance(self.runner.exception, KeyboardInterrupt) and not self._stop_asked
                and self.runner.target.kind != "callable"):  # (the API re-raises it to its caller)
            # Python's way out of an uncaught KeyboardInterrupt: its cleanup (atexit), then death by
            # SIGINT, which a shell's loop takes for Ctrl+C and stops at (an exit status of 130 does not)
            try:
                atexit._run_exitfuncs()
            except BaseException:
                pass
            _die_by(signal.SIGINT)
        return self.session.exit_code if self.session.exit_code is not None else 0


def _die_by(signum: int) -> None:
    """End the process by ``signum``'s default action, as the signal would have without us."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1)
    os._exit(128 + signum)

