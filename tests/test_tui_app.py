"""Pilot tests of the terminal UI over a fake event source (no training thread)."""

from __future__ import annotations

import asyncio
import functools
import math
import time

import pytest

from tui_debug.events import FindingEvent, RedundantBias
from tui_debug.recovery.actions import ActionResult
from tui_debug.tui.app import TuiDebugApp
from tui_debug.tui.fake import FakeMonitor
from tui_debug.tui.fmt import sparkline
from tui_debug.tui.gpu import GpuDevice, GpuPoller, GpuSample, visible_map
from tui_debug.tui.output_pane import LineAssembler
from tui_debug.tui.screens import ConfirmQuit, FindingDetail, HelpScreen

GRADS = {"model.0.weight": 0.35, "model.0.bias": 0.08, "model.3.weight": 0.52, "model.3.bias": 0.06}


def aio(fn):
    """Run an async test with asyncio.run (no asyncio plugin needed); fixtures still apply."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


NO_GPU = GpuSample(0.0, [], reason="no NVIDIA driver (NVML not found)")


def make_app(tmp_path, **kw) -> tuple[TuiDebugApp, FakeMonitor]:
    mon = FakeMonitor(str(tmp_path), script="examples/train.py")
    app = TuiDebugApp(mon, start_gpu=False, sample_memory=False, elapsed=lambda: 42.0,
                      system_memory_fn=lambda: (16 * 2**30, 12 * 2**30), tick_s=3600, heavy_s=0, **kw)
    return app, mon


async def settle(app, pilot) -> None:
    """Fold what was emitted and repaint, then let Textual process the resulting messages."""
    app.tick()
    await pilot.pause()


def text_of(widget) -> str:
    r = widget.render()
    return getattr(r, "plain", str(r))


@aio
async def test_panes_show_steps_losses_gradients_and_memory(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        mon.setup(("d_loss", "g_loss"))
        mon.steps(1, 50, lambda s: [1.0 / s, 2.0 - s / 100], GRADS)
        app.gpu_sample = NO_GPU
        mon.session.rss_last = mon.session.rss_peak = 300 * 2**20
        await settle(app, pilot)
        status = text_of(app.status_bar)
        assert "train.py" in status and "RUNNING" in status and "step 50" in status and "100/s" in status
        assert "recover:safe" in status
        loss = text_of(app.loss)
        assert "d_loss" in loss and "g_loss" in loss and "0.02" in loss  # last of d_loss = 1/50
        grads = text_of(app.gradients.body)
        assert [ln.split()[0] for ln in grads.splitlines()[1:]] == list(GRADS)  # model order
        assert "all finite" in grads
        gpu = text_of(app.gpu)
        assert "no NVIDIA driver" in gpu and "CPU RSS 300.0 MiB" in gpu and "sys mem" in gpu


@aio
async def test_status_says_how_often_sampled_fast_steps_are_checked(tmp_path):
    """"No findings" on a sampled run covers the checked steps only: the header says how many."""
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        mon.setup(("loss",))
        mon.steps(1, 50, lambda s: [1.0], GRADS)
        await settle(app, pilot)
        assert "checks 1 step" not in text_of(app.status_bar)  # every step checked so far
        mon.steps(51, 1900, lambda s: [1.0], GRADS, checked_every=19)
        await settle(app, pilot)
        assert mon.session.checked_steps == 50 + 100
        assert "checks 1 step in 13" in text_of(app.status_bar)  # 1950 steps, 150 checked


@aio
async def test_nonfinite_loss_and_gradient_are_flagged(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        mon.setup()
        grads = dict(GRADS, **{"model.0.weight": math.nan, "model.3.bias": 1e-12, "model.3.weight": 5e4})
        mon.steps(1, 10, lambda s: [math.nan if s == 5 else 1.0], grads)
        await settle(app, pilot)
        body = text_of(app.gradients.body)
        assert "NaN 1" in body and "vanish 1" in body and "explode 1" in body
        line = next(ln for ln in body.splitlines() if ln.startswith("model.0.weight"))
        assert "nan" in line and "NaN" in line
        loss = text_of(app.loss)
        assert "×" in loss and "✗1" in loss  # the NaN point is drawn, and counted
        await pilot.press("2", "o")  # relevant first: flagged parameters lead
        body = text_of(app.gradients.body)
        assert body.splitlines()[1].startswith(("model.0.weight", "model.3.weight", "model.3.bias"))
        assert not body.splitlines()[-1].startswith(("model.0.weight",))


@aio
async def test_a_redundant_bias_is_marked_as_such_not_as_vanishing(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        mon.setup()
        mon.emit(RedundantBias("model.0.bias", "model.0 (Conv2d)", "model.1 (BatchNorm2d)", 1))
        mon.steps(1, 5, lambda s: [1.0], dict(GRADS, **{"model.0.bias": 3e-10}))
        await settle(app, pilot)
        body = text_of(app.gradients.body)
        assert "all finite (1 redundant bias)" in body.splitlines()[0] and "vanish" not in body
        line = next(ln for ln in body.splitlines() if ln.startswith("model.0.bias"))
        assert line.rstrip().endswith("redundant")
        prompts = [str(app.errors.get_option_at_index(i).prompt) for i in range(app.errors.option_count)]
        assert any("model.0.bias does nothing" in p for p in prompts), prompts


@aio
async def test_many_layers_scroll(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        mon.setup()
        grads = {f"layers.{i}.weight": 0.1 * (i + 1) for i in range(300)}
        mon.steps(1, 2, lambda s: [1.0], grads)
        await settle(app, pilot)
        assert len(text_of(app.gradients.body).splitlines()) == 301
        await pilot.press("2", "end")
        await pilot.pause()
        assert app.gradients.scroll_y > 250


@aio
async def test_errors_pane_counts_repeats_and_opens_detail(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        mon.setup()
        ctx = {"module": "model.2 (LogScale)", "value": "nan"}
        for step in (120, 121, 122):
            mon.emit(FindingEvent("error", "model_error", "model.2 (LogScale) produced a non-finite output",
                                  step, "model|model.2", ctx, recommendation="check the layer's input range"))
        mon.emit(FindingEvent("warning", "loss_error", "loss spiked", 130, "spike", {}))
        await settle(app, pilot)
        assert app.errors.option_count == 2
        first = str(app.errors.get_option_at_index(0).prompt)
        assert "ERR" in first and "model" in first and "@120" in first and "x3" in first
        assert "1 finding" not in text_of(app.status_bar) and "2 findings" in text_of(app.status_bar)
        await pilot.press("1", "home", "enter")
        await pilot.pause()
        assert isinstance(app.screen, FindingDetail)
        detail = text_of(app.screen.query_one("#detail-body"))
        assert "model.2 (LogScale)" in detail and "steps 120-122" in detail and "check the layer" in detail
        await pilot.press("escape")
        assert not isinstance(app.screen, FindingDetail)


@aio
@pytest.mark.parametrize("key,action", [("c", "clear_cache"), ("l", "lower_lr"), ("L", "raise_lr"),
                                        ("g", "toggle_clipping"), ("b", "rollback"), ("s", "checkpoint")])
async def test_action_keys_request_and_show_result(tmp_path, key, action):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        mon.setup()
        mon.steps(1, 3, lambda s: [1.0], GRADS)
        await settle(app, pilot)
        await pilot.press(key)
        assert mon.requests == [action]
        assert "requested" in text_of(app.status_bar)  # acknowledged at once
        mon.emit(ActionResult(action, True, f"{action} did its thing", 3, request_id=1))
        await settle(app, pilot)
        assert f"{action} did its thing" in text_of(app.status_bar)
        assert mon.session.actions[-1]["action"] == action


@aio
async def test_pause_report_help_and_focus_keys(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        mon.setup()
        mon.steps(1, 3, lambda s: [1.0], GRADS)
        await settle(app, pilot)
        await pilot.press("p")
        assert mon.paused and "PAUSING" in text_of(app.status_bar)
        mon.pause_held = True  # the training thread reached the step boundary
        await settle(app, pilot)
        status = text_of(app.status_bar)
        assert "PAUSED" in status and "paused at step 3 (p resumes)" in status and "pausing at" not in status
        assert "/s" not in status.split("\n")[0]  # no steps/s while nothing steps
        await pilot.press("p")
        assert not mon.paused and "RUNNING" in text_of(app.status_bar)
        await pilot.press("r")
        assert mon.reports == 1 and "report.json" in text_of(app.status_bar)
        for key, pane in (("1", "errors"), ("2", "gradients"), ("3", "loss"), ("4", "gpu"), ("5", "output")):
            await pilot.press(key)
            assert app.focused is not None and (app.focused.id == pane or pane in
                                                [a.id for a in app.focused.ancestors_with_self])
        await pilot.press("tab")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


@aio
async def test_output_pane_streams_and_progress_bars(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        mon.output("stdout", "epoch 1 done\n")
        mon.output("stderr", "warning: something\n")
        mon.output("stdout", "\r 10%|#    |\r 50%|###  |")
        await settle(app, pilot)
        lines = [str(s.text) for s in app.output.log_view.lines]
        assert lines == ["epoch 1 done", "warning: something"]
        assert "50%" in text_of(app.output.live_line) and "10%" not in text_of(app.output.live_line)
        mon.output("stdout", "\r100%|#####|\n")
        await settle(app, pilot)
        assert [str(s.text) for s in app.output.log_view.lines][-1] == "100%|#####|"
        assert not app.output.live_line.display
        styles = [str(seg.style) for strip in app.output.log_view.lines[1:2] for seg in strip]
        assert any("red" in s for s in styles)  # stderr is told apart


@aio
async def test_quit_asks_while_running_then_stops_training(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        mon.setup()
        await settle(app, pilot)
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmQuit)
        await pilot.press("n")
        assert not mon.stopped and app.is_running
        await pilot.press("q", "y")
        assert mon.stopped and "STOPPING" in text_of(app.status_bar)
        mon.end("interrupted", 130, KeyboardInterrupt())
        await settle(app, pilot)
    assert app.return_value == 130


@aio
async def test_ctrl_c_while_asked_confirms_instead_of_stacking_another_dialog(tmp_path):
    """Each Ctrl+C pushed one more "Quit?" dialog and none stopped the run."""
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        mon.setup()
        await settle(app, pilot)
        await pilot.press("ctrl+c")
        assert isinstance(app.screen, ConfirmQuit)
        await pilot.press("ctrl+c")
        await settle(app, pilot)
        assert not isinstance(app.screen, ConfirmQuit) and mon.stopped
        assert len([s for s in app.screen_stack if isinstance(s, ConfirmQuit)]) == 0
        mon.end("interrupted", 130, KeyboardInterrupt())
        await settle(app, pilot)
    assert app.return_value == 130


@aio
async def test_app_stays_open_after_the_end_until_q(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        mon.setup()
        mon.steps(1, 5, lambda s: [1.0], GRADS)
        mon.end("crashed", 1, RuntimeError("boom"))
        await settle(app, pilot)
        assert app.is_running
        status = text_of(app.status_bar)
        assert "CRASHED" in status and "exit 1" in status and "report.json" in status
        assert app.errors.option_count == 1  # the exception became a finding
        await pilot.press("l")
        assert mon.requests == []  # nothing to apply any more
        await pilot.press("q")  # no confirmation once ended
    assert app.return_value == 1


@aio
async def test_exit_on_end(tmp_path):
    app, mon = make_app(tmp_path, exit_on_end=True)
    async with app.run_test(size=(80, 24)) as pilot:
        mon.end("finished", 0)
        await settle(app, pilot)
    assert app.return_value == 0


def test_sparkline_keeps_nonfinite_points():
    t = sparkline([1.0, 2.0, math.nan, 3.0, math.inf], 5).plain
    assert t[2] == "×" and t[4] == "↑" and len(t) == 5
    squeezed = sparkline([1.0] * 50 + [math.nan] + [1.0] * 49, 10).plain
    assert "×" in squeezed and len(squeezed) == 10


def test_line_assembler_carriage_returns():
    a = LineAssembler()
    assert a.feed("stdout", "a\rb\n") == [("stdout", "b")]
    assert a.feed("stdout", "x 1%\rx 2%\r") == []
    assert a.live() == [("stdout", "x 2%")]


def test_visible_map_by_index_and_uuid():
    uuids = ["GPU-aaa", "GPU-bbb", "GPU-ccc"]
    assert visible_map(uuids, None) == {0: 0, 1: 1, 2: 2}
    assert visible_map(uuids, "2,0") == {2: 0, 0: 1}
    assert visible_map(uuids, "GPU-bbb") == {1: 0}
    assert visible_map(uuids, "bb,7") == {1: 0}


class _FakeNvml:
    class NVMLError_LibraryNotFound(Exception):
        pass

    def __init__(self, fail=None):
        self.fail = fail

    def nvmlInit(self):
        if self.fail:
            raise self.fail

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlSystemGetDriverVersion(self):
        return "550.1"

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100"

    def nvmlDeviceGetUUID(self, h):
        return "GPU-aaa"

    def nvmlDeviceGetMemoryInfo(self, h):
        import types
        return types.SimpleNamespace(used=2 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        import types
        return types.SimpleNamespace(gpu=37)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        raise RuntimeError("not supported")  # wrapped: the pane still shows the rest


def test_gpu_poller_no_driver_and_device(tmp_path):
    p = GpuPoller(nvml=_FakeNvml(fail=_FakeNvml.NVMLError_LibraryNotFound()))
    p._loop()
    assert p.latest is not None and p.latest.reason == "no NVIDIA driver (NVML not found)"
    p = GpuPoller(nvml=_FakeNvml())
    sample = p.sample(_FakeNvml(), 1, "550.1")
    d = sample.devices[0]
    assert (d.name, d.mem_used, d.mem_total, d.util_gpu, d.process_mem) == ("NVIDIA H100", 2 * 2**30, 80 * 2**30, 37, None)


@aio
async def test_gpu_pane_shows_devices(tmp_path):
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        app.gpu_sample = GpuSample(0.0, [GpuDevice(0, "NVIDIA H100", "GPU-aaa", 2 * 2**30, 80 * 2**30, 37,
                                                   1 * 2**30, 0, 512 * 2**20, 768 * 2**20)])
        await settle(app, pilot)
        gpu = text_of(app.gpu)
        assert "cuda:0" in gpu and "H100" in gpu and "2.0 GiB/80.0 GiB" in gpu and "util 37%" in gpu
        assert "process 1.0 GiB" in gpu and "alloc 512.0 MiB" in gpu and "resv 768.0 MiB" in gpu


@aio
async def test_a_batch_is_drawn_when_it_comes_and_the_timer_waits_while_batches_flow(tmp_path):
    """Batches come as a backward starts, when training runs without the GIL: the app folds and
    draws each at once (no timer tick here: tick_s is an hour), and its timer does nothing while
    they flow, so the UI's Python does not land between two of the training thread's kernels."""
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        mon.setup()
        before = time.monotonic()
        mon.steps(1, 20, lambda s: [1.0 / s], GRADS)
        await pilot.pause()
        assert "step 20" in text_of(app.status_bar)
        assert before <= app._batch_at <= time.monotonic()  # the batch's arrival is noted
        ticks = []
        real_tick = app.tick
        app.tick = lambda: (ticks.append(1), real_tick())  # type: ignore[method-assign]
        # (as if the batch had just come: on a loaded machine the steps above may take longer than
        # BATCH_QUIET_S, which would make this test depend on the machine's speed)
        app._batch_at = time.monotonic()
        app._on_timer()
        assert ticks == []  # a batch came less than BATCH_QUIET_S ago: the timer leaves it to them
        app._batch_at -= 10
        app._on_timer()
        assert ticks == [1]  # none for a while (paused, a slow step): the timer ticks


@aio
async def test_the_scripts_input_is_typed_in_the_input_line_not_taken_for_keys(tmp_path):
    """The script reads its stdin (input(), a breakpoint()'s pdb): Textual owns the terminal, so the
    app shows an input line and feeds what is typed there to the script's sys.stdin. Keys typed
    there are text, not the panes' actions; Ctrl+D is the end of file; a reader that stops waiting
    (interrupted) closes the line."""
    import threading

    from tui_debug.tui.messages import StdinWanted

    app, mon = make_app(tmp_path)
    requested: list[str] = []
    mon.request = lambda name: requested.append(name) or 1

    def read_in_thread() -> tuple[threading.Thread, list[str]]:
        got: list[str] = []
        t = threading.Thread(target=lambda: got.append(app.stdin.readline()), daemon=True)
        t.start()
        return t, got

    async def until(cond) -> None:
        for _ in range(200):
            if cond():
                return
            await settle(app, pilot)
            await asyncio.sleep(0.01)
        raise AssertionError("never")

    async with app.run_test(size=(120, 40)) as pilot:
        mon.setup(("loss",))
        await settle(app, pilot)
        assert not app.stdin_line.display
        mon.capture.listeners[0]("stdout", "run name? ")  # input()'s prompt, through the capture
        reader, got = read_in_thread()  # the script's thread asks the app for a line
        await until(lambda: app.stdin_line.display)
        assert app.focused is app.stdin_line
        await pilot.press("c", "l", "b", "space", "1", "enter")  # (keys of actions, elsewhere)
        reader.join(10)
        assert got == ["clb 1\n"] and requested == []
        await settle(app, pilot)
        assert not app.stdin_line.display and app.focused is not app.stdin_line
        lines = [str(strip.text) for strip in app.output.log_view.lines]
        assert any(line.startswith("run name? clb 1") for line in lines), lines  # echoed after its prompt
        reader, got = read_in_thread()
        await until(lambda: app.stdin_line.display)
        await pilot.press("escape")  # back to the panes: keys are actions again
        assert app.focused is not app.stdin_line and app.stdin_line.display
        app.post_message(StdinWanted())  # the waiting reader asks again (every second): focus stays
        await settle(app, pilot)
        assert app.focused is not app.stdin_line and app.stdin_line.display
        await pilot.press("l")
        assert requested == ["lower_lr"]
        await pilot.press("i", "ctrl+d")  # back to the input line; end of file
        reader.join(10)
        assert got == [""]
        await until(lambda: not app.stdin_line.display)
        reader, got = read_in_thread()
        await until(lambda: app.stdin_line.display)
        app.stdin.feed("from elsewhere\n")  # the reader is done without the line (as when interrupted)
        reader.join(10)
        await until(lambda: not app.stdin_line.display)  # the line closes by itself


@aio
async def test_a_quit_dialog_open_when_the_script_ends_goes_away_and_quit_gives_the_scripts_status(tmp_path):
    """It said "still running" over a finished run, and its yes sent a KeyboardInterrupt to nothing: the
    app stayed open."""
    app, mon = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        mon.setup()
        await settle(app, pilot)
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmQuit)
        mon.end("finished", 0, None)
        await settle(app, pilot)
        assert not isinstance(app.screen, ConfirmQuit) and not mon.stopped
        await pilot.press("q")
        await settle(app, pilot)
    assert app.return_value == 0


def test_terminal_title_and_hyperlink_sequences_do_not_show_as_text():
    """Text.from_ansi keeps an OSC's text: "\\x1b]0;title\\x07" showed as "0;title" in the Output pane."""
    from tui_debug.tui.output_pane import styled

    assert styled("stdout", "osc:\x1b]0;title\x07 after").plain == "osc: after"
    line = styled("stdout", "link \x1b]8;;http://x\x1b\\label\x1b]8;;\x1b\\ end \x1b[31mred\x1b[0m")
    assert line.plain == "link label end red" and [(s.start, s.end) for s in line.spans] == [(15, 18)]  # red kept
