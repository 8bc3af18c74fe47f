"""The Textual app: panes fed by the monitor's event queue, drained on a ~10 Hz timer.

The app talks to a *monitor-like* object (``tui_debug.monitor.Monitor`` in real runs, a fake in
tests) through: ``start(loop, queue)``, ``session``, ``tracker``, ``target.display``, ``config``,
``report_path``, ``request(name)``, ``pause()``, ``resume()``, ``paused``, ``dump_report()``,
``stop_training()``, ``capture.listeners`` and ``_terminate`` (a signal that must end the app).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input

from .errors_pane import ErrorsPane
from .gpu import GpuPoller, GpuSample
from .gpu_pane import GpuPane
from .gradients_pane import GradientsPane
from .loss_pane import LossPane
from .messages import GpuSampled, ShowFinding, StdinWanted
from .output_pane import OutputBuffer, OutputPane
from .screens import ConfirmQuit, FindingDetail, HelpScreen
from .status import StatusBar
from .stdin import UiStdin

TICK_S = 0.1  # at most ~10 repaints per second
# While batches come (the instrumentation hands them over as a backward starts, when the training
# thread runs without the GIL), the app works right after each one; the timer only when none came
# for this long (paused, ended, a slow step, data loading).
BATCH_QUIET_S = 0.5
BATCH_TICK_S = 0.05  # ... at most this often (a finding every step sends a batch every step)
MEMORY_S = 1.0
HEAVY_S = 0.5  # full repaints at most twice a second
HEAVY_MAX_S = 2.0  # ... and at least every 2 s
UI_BUDGET = 0.015  # share of one core the UI thread may use while training runs (it shares the GIL)
STDIN_PLACEHOLDER = "the script reads its input: type a line, Enter sends it (Ctrl+D: end of file, Esc: the panes, i: back here)"
ACTION_TEXT = {
    "clear_cache": "clear cache", "lower_lr": "lower LR x0.5", "raise_lr": "raise LR x2",
    "toggle_clipping": "toggle clipping", "rollback": "roll back", "checkpoint": "save checkpoint",
}


def system_memory() -> tuple[int | None, int | None]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:
        return None, None


class _BatchQueue(asyncio.Queue):  # type: ignore[type-arg]
    """The event queue, telling the app that a batch came."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self._on_put = on_put

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        self._on_put()


class StdinLine(Input):
    """The script's stdin while it reads one (see stdin.py): shown when it asks, hidden once answered."""

    BINDINGS = [
        Binding("ctrl+d", "eof", "end of file"),
        Binding("escape", "leave", "panes"),
    ]

    def action_eof(self) -> None:
        self.app.send_stdin(None)  # type: ignore[attr-defined]

    def action_leave(self) -> None:
        self.app.action_focus_pane("errors")  # type: ignore[attr-defined]


class TuiDebugApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "tui_debug"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("c", "act('clear_cache')", "cache", tooltip="gc.collect + torch.cuda.empty_cache"),
        Binding("r", "report", "report", tooltip="write the report now"),
        Binding("p", "pause", "pause", tooltip="pause / resume at a step boundary"),
        Binding("l", "act('lower_lr')", "lr/2", key_display="l"),
        Binding("L", "act('raise_lr')", "lr*2", key_display="L"),
        Binding("g", "act('toggle_clipping')", "clip"),
        Binding("b", "act('rollback')", "rollback"),
        Binding("s", "act('checkpoint')", "save"),
        Binding("q", "quit_app", "quit"),
        Binding("ctrl+c", "quit_app", "quit", show=False, priority=True),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("i", "focus_stdin", "input", show=False),
        Binding("1", "focus_pane('errors')", "errors", show=False),
        Binding("2", "focus_pane('gradients')", "grads", show=False),
        Binding("3", "focus_pane('loss')", "loss", show=False),
        Binding("4", "focus_pane('gpu')", "gpu", show=False),
        Binding("5", "focus_pane('output')", "output", show=False),
    ]

    def __init__(self, monitor: Any, exit_on_end: bool = False, gpu_poller: GpuPoller | None = None,
                 start_gpu: bool = True, sample_memory: bool = True,
                 elapsed: Callable[[], float] | None = None,
                 system_memory_fn: Callable[[], tuple[int | None, int | None]] = system_memory,
                 tick_s: float = TICK_S, heavy_s: float = HEAVY_S, **kw: Any) -> None:
        super().__init__(**kw)
        self.monitor = monitor
        self.session = monitor.session
        self.exit_on_end = exit_on_end
        self.gpu_poller = gpu_poller if gpu_poller is not None else GpuPoller(
            1.0, on_sample=lambda s: self.post_message(GpuSampled(s)))
        self._start_gpu = start_gpu
        self._sample_memory = sample_memory
        self._elapsed_fn = elapsed
        self._system_memory = system_memory_fn
        self._tick_s = tick_s
        self._heavy_s = heavy_s
        self.output_buffer = OutputBuffer()
        self.queue: asyncio.Queue[list[Any]] | None = None
        self.gpu_sample: GpuSample | None = None
        self.sys_mem: tuple[int | None, int | None] = (None, None)
        self._next_memory = 0.0
        self._next_heavy = 0.0
        self._interval = heavy_s  # adapted to what repainting costs on this machine (see _pace)
        self._cpu_mark = (time.monotonic(), time.thread_time())
        self._light: tuple[Any, ...] | None = None
        self._batch_at = float("-inf")  # when the last batch came (see BATCH_QUIET_S)
        self._tick_soon = False
        self._batch_tick_at = float("-inf")
        self.notice: Text | str | None = "starting the script…"
        self._pausing_notice: Text | None = None  # (replaced once the training thread holds at the boundary)
        self.stopping = False
        self.requests: dict[int, str] = {}
        self.frames = 0
        self._ended_seen = False
        # the script's sys.stdin (run_ui installs it): lines typed in the input line go there
        self.stdin = UiStdin(ask=lambda: self.post_message(StdinWanted()))
        self.stdin_wanted = False

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="row-top"):
            self.errors = ErrorsPane(id="errors", classes="pane")
            self.errors.border_title = "1 Errors"
            yield self.errors
            self.gradients = GradientsPane(id="gradients", classes="pane")
            self.gradients.border_title = "2 Gradients (log norm)"
            yield self.gradients
        with Horizontal(id="row-mid") as self.row_mid:
            self.loss = LossPane(id="loss", classes="pane")
            self.loss.border_title = "3 Loss"
            self.loss.can_focus = True
            yield self.loss
            self.gpu = GpuPane(id="gpu", classes="pane")
            self.gpu.border_title = "4 GPU / memory"
            self.gpu.can_focus = True
            yield self.gpu
        max_lines = int(getattr(getattr(self.monitor, "config", None), "output_tail_lines", 2000) or 2000)
        self.output = OutputPane(max_lines=max_lines, id="output", classes="pane")
        self.output.border_title = "5 Output (stderr in red)"
        yield self.output
        self.stdin_line = StdinLine(id="stdin-line", placeholder=STDIN_PLACEHOLDER)
        self.stdin_line.border_title = "the script's input"
        self.stdin_line.display = False
        yield self.stdin_line
        yield Footer(compact=True)

    def on_mount(self) -> None:
        import sys

        # Textual redirects sys.stdout/err to its print capture; the script must write to fds 1/2
        # (which the monitor's capture reads) like any other process would.
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        self.status_bar = self.query_one(StatusBar)
        self.session.action_listeners.append(self._on_action)
        capture = getattr(self.monitor, "capture", None)
        if capture is not None:
            capture.listeners.append(self.output_buffer.feed)
        self.queue = _BatchQueue(self._on_batch)
        self.monitor.start(asyncio.get_running_loop(), self.queue)
        if self._start_gpu:
            self.gpu_poller.start()
        self.errors.focus()
        self.set_interval(self._tick_s, self._on_timer)
        self.tick()
        self.call_after_refresh(self._relayout)  # widths are known after the first layout

    def on_unmount(self) -> None:
        self.gpu_poller.stop()
        self.stdin.detach_app()

    # -- the timer: drain, fold, repaint once ------------------------------------------------------
    def _on_batch(self) -> None:
        self._batch_at = time.monotonic()
        if not self._tick_soon:
            # through Textual's queue: the tick runs in the app's context, not in the one the
            # training thread's hand-over was scheduled in (a timer started there never fires)
            self._tick_soon = self.call_later(self._batch_tick)

    def _batch_tick(self) -> None:
        wait = self._batch_tick_at + BATCH_TICK_S - time.monotonic()
        if wait > 0:
            self.set_timer(wait, self._batch_tick)
            return
        self._tick_soon = False
        self._batch_tick_at = time.monotonic()
        self.tick()

    def _on_timer(self) -> None:
        if time.monotonic() - self._batch_at >= BATCH_QUIET_S or self.session.ended is not None:
            self.tick()

    def tick(self) -> None:
        q = self.queue
        while q is not None and not q.empty():
            self.session.handle(q.get_nowait())
        now = time.monotonic()
        if now >= self._next_memory:
            self._next_memory = now + MEMORY_S
            if self._sample_memory:
                try:
                    self.session.sample_memory()
                except Exception:
                    pass
            self.sys_mem = self._system_memory()
        if self.stdin_wanted:  # the script waits on its input: its prompt (and pdb's output) at once
            self.output.ingest(self.output_buffer.drain())
            if not self.stdin.waiting:  # it stopped waiting (interrupted): the line closes
                self._close_stdin_line()
        if self.notice == "starting the script…" and self.session.steps > 0:
            self.notice = None
        if self.notice is self._pausing_notice and getattr(self.monitor, "pause_held", False):
            self.notice = Text(f"paused at step {self.session.steps} (p resumes)", "yellow")
        # Findings and acknowledgements every tick (<= 100 ms + the 150 ms flush); the heavy panes
        # (gradients, loss, output, memory) at most every HEAVY_S: the UI's Python shares the GIL
        # with training, and a full repaint costs tens of ms on a small CPU.
        light = (len(self.monitor.tracker.errors), self.notice, self.state())
        if now >= self._next_heavy or (self.session.ended is not None and not self._ended_seen):
            self._next_heavy = now + self._pace(now)
            self._light = light
            self.refresh_panes()
        elif light != self._light:
            self._light = light
            self.refresh_light()
        ended = self.session.ended is not None
        if ended and not self._ended_seen:
            self._ended_seen = True
            try:  # on disk now, not only when the user quits: the app may stay open for hours
                self.monitor.dump_report()
            except Exception:
                pass
            s = self.session
            self.notice = Text.assemble(
                (f"script {s.status} (exit {s.exit_code}). ", "bold"),
                f"report: {self.monitor.report_path}  — q to quit")
            self.refresh_panes()
            if isinstance(self.screen, ConfirmQuit):  # "still running" no longer holds: the notice says what does
                self.screen.dismiss(False)
            if self.exit_on_end or self.stopping:
                self.exit(s.exit_code)
        if getattr(self.monitor, "_terminate", None) is not None:  # SIGTERM/SIGHUP: go at once
            self.exit(None)

    def _pace(self, now: float) -> float:
        """The next full repaint's delay: the UI thread's CPU time (parsing events, laying out,
        rendering) is kept near ``UI_BUDGET`` of wall time, because every millisecond of it holds the
        GIL that the training thread needs. A fast machine repaints every ``heavy_s``, a slow one
        less often (at most every HEAVY_MAX_S); findings are drawn every tick either way."""
        wall0, cpu0 = self._cpu_mark
        cpu = time.thread_time()
        self._cpu_mark = (now, cpu)
        if now - wall0 > 0 and self.session.ended is None:
            load = (cpu - cpu0) / (now - wall0)
            if load > UI_BUDGET:
                self._interval = min(HEAVY_MAX_S, self._interval * 1.5)
            elif load < UI_BUDGET / 2:
                self._interval = max(self._heavy_s, self._interval / 1.5)
        return self._interval

    def _show_status(self, findings: list) -> None:
        s = self.session
        self.status_bar.show(self.monitor.target.display, self.state(), s.steps, s.steps_per_second(),
                             self.elapsed(), getattr(self.monitor.config, "recover", "?"), s.exit_code,
                             len(findings), self.notice, checked=s.checked_steps)

    def refresh_light(self) -> None:
        """Status line and findings only."""
        s = self.session
        with self.batch_update():
            findings = self.monitor.tracker.snapshot()
            self._show_status(findings)
            self.errors.sync(findings)

    def refresh_panes(self) -> None:
        s = self.session
        with self.batch_update():
            self.frames += 1
            findings = self.monitor.tracker.snapshot()
            self._show_status(findings)
            self.errors.sync(findings)
            self.gradients.sync(s.grads, s.grads_in_model_order(), s.steps, redundant=s.redundant)
            self.loss.sync(list(s.losses.values()))
            total, avail = self.sys_mem
            self.gpu.sync(self.gpu_sample, s.rss_last, s.rss_peak, total, avail, s.cuda)
            self.output.ingest(self.output_buffer.drain())
            # Loss and GPU panes side by side, as tall as the taller content (bounded by the CSS).
            rows = max(self.loss.lines, self.gpu.lines) + 2
            if self.row_mid.styles.height is None or self.row_mid.styles.height.value != rows:
                self.row_mid.styles.height = rows

    def on_resize(self) -> None:
        self.call_after_refresh(self._relayout)

    def _relayout(self) -> None:
        for pane in (self.gradients, self.loss, self.gpu):
            pane._key = None
        self.refresh_panes()

    def state(self) -> str:
        s = self.session
        if s.ended is not None:
            return s.status
        if self.stopping:
            return "stopping"
        if getattr(self.monitor, "paused", False):
            return "paused" if getattr(self.monitor, "pause_held", True) else "pausing"
        return "running" if s.steps > 0 else "starting"

    def elapsed(self) -> float:
        if self._elapsed_fn is not None:
            return self._elapsed_fn()
        s = self.session
        if s.ended_at is not None:
            return s.ended_at - s.started_at
        return s.elapsed

    # -- messages -----------------------------------------------------------------------------
    def on_gpu_sampled(self, message: GpuSampled) -> None:
        self.gpu_sample = message.sample

    def on_stdin_wanted(self, message: StdinWanted) -> None:
        if self.stdin_wanted and self.stdin_line.display:
            return  # a waiting reader asking again: the line is open (and focus stays where the user put it)
        self.stdin_wanted = True
        self.stdin_line.display = True
        if not isinstance(self.screen, (HelpScreen, FindingDetail, ConfirmQuit)):
            self.stdin_line.focus()
        self.notice = Text("the script waits for its input (the line at the bottom)", "bold cyan")
        self.refresh_panes()  # its prompt, in the Output pane

    def on_input_submitted(self, message: Input.Submitted) -> None:
        if message.input is self.stdin_line:
            message.stop()
            self.send_stdin(message.value)

    def send_stdin(self, line: str | None) -> None:
        """A typed line (its prompt's echo in the Output pane, as a terminal shows it), or None: the end of file."""
        if not self.stdin_wanted:
            return
        self.stdin.feed("" if line is None else line + "\n")
        echo = "^D\n" if line is None else line + "\n"
        capture = getattr(self.monitor, "capture", None)
        if capture is not None and hasattr(capture, "echo"):
            capture.echo(echo)  # (its listeners include the Output pane's buffer)
        else:
            self.output_buffer.feed("stdout", echo)
        self._close_stdin_line()

    def _close_stdin_line(self) -> None:
        self.stdin_wanted = False
        self.stdin_line.value = ""
        self.stdin_line.display = False
        self.notice = None
        self.errors.focus()
        self.refresh_panes()

    def action_focus_stdin(self) -> None:
        if self.stdin_wanted:
            self.stdin_line.focus()

    def on_show_finding(self, message: ShowFinding) -> None:
        for info in self.monitor.tracker.snapshot():
            if info.error_id == message.error_id:
                self.push_screen(FindingDetail(info, list(self.session.actions)))
                return

    def _on_action(self, result: Any) -> None:
        """Session listener (UI thread, inside tick): an action's effect arrived."""
        self.requests.pop(result.request_id, None)
        style = "green" if result.ok else "yellow"
        self.notice = Text.assemble((f"{result.action}: ", f"bold {style}"), result.message)

    # -- actions ------------------------------------------------------------------------------
    def action_act(self, name: str) -> None:
        if self.session.ended is not None:
            self.notice = Text(f"{ACTION_TEXT.get(name, name)}: training has ended; nothing to apply", "yellow")
            self.refresh_panes()
            return
        rid = self.monitor.request(name)
        self.requests[rid] = name
        when = "now (paused)" if getattr(self.monitor, "paused", False) else "at the next step"
        self.notice = Text.assemble((f"{ACTION_TEXT.get(name, name)}", "bold cyan"), f": requested, applies {when}…")
        self.refresh_panes()

    def action_report(self) -> None:
        try:
            path = self.monitor.dump_report()
            self.notice = Text.assemble(("report written: ", "bold green"), str(path))
        except Exception as exc:
            self.notice = Text(f"could not write the report: {exc}", "bold red")
        self.refresh_panes()

    def action_pause(self) -> None:
        if self.session.ended is not None:
            self.notice = Text("training has ended", "yellow")
        elif getattr(self.monitor, "paused", False):
            self.monitor.resume()
            self.notice = Text("resumed", "green")
        else:
            self.monitor.pause()
            self.notice = self._pausing_notice = Text("pausing at the next step boundary (p resumes)", "yellow")
        self.refresh_panes()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_focus_pane(self, pane: str) -> None:
        widget = self.query_one(f"#{pane}")
        if not widget.focusable:
            widget = next((w for w in widget.query("*") if w.focusable), widget)
        widget.focus()

    def action_quit_app(self) -> None:
        if self.session.ended is not None:
            self.exit(self.session.exit_code)
            return
        if self.stopping:  # asked twice: stop at once (the report is still written)
            import signal

            self.monitor._terminate = signal.SIGINT
            self.exit(130)
            return

        if isinstance(self.screen, ConfirmQuit):  # Ctrl+C again while asked: yes (one dialog, never a stack)
            self.screen.dismiss(True)
            return

        def answered(yes: bool | None) -> None:
            if yes and self.session.ended is not None:  # it ended while asked: nothing left to stop
                self.exit(self.session.exit_code)
            elif yes:
                self.stop_training()

        self.push_screen(ConfirmQuit(), answered)

    def stop_training(self) -> None:
        self.stopping = True
        self.notice = Text("stopping training (KeyboardInterrupt at its next bytecode)… q again to force",
                           "bold yellow")
        if not self.monitor.stop_training():
            if self.session.ended is None:  # not running any more, and no end event: nothing to wait for
                self.exit(130)
        self.refresh_panes()
