"""Snapshot tests (pytest-textual-snapshot) of the main UI states, over the fake event source.

Update after an intended visual change: ``python -m pytest tests/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import math

import pytest

from tui_debug.events import FindingEvent
from tui_debug.recovery.actions import ActionResult
from tui_debug.tui.app import TuiDebugApp
from tui_debug.tui.fake import FakeMonitor
from tui_debug.tui.gpu import GpuDevice, GpuSample

pytest.importorskip("pytest_textual_snapshot")

NO_GPU = GpuSample(0.0, [], reason="no NVIDIA driver (NVML not found)")
GRADS = {"model.0.weight": 0.35, "model.0.bias": 0.08, "model.2.weight": 0.9, "model.3.weight": 0.52,
         "model.3.bias": 0.06}


def build(tmp_path, gpu=NO_GPU):
    mon = FakeMonitor(str(tmp_path), script="examples/digits.py")
    app = TuiDebugApp(mon, start_gpu=False, sample_memory=False, elapsed=lambda: 83.0,
                      system_memory_fn=lambda: (16 * 2**30, 11 * 2**30), tick_s=3600, heavy_s=0)
    app.gpu_sample = gpu
    mon.report_path = "tui_debug_runs/20260101-120000-digits/report.json"  # stable pictures
    mon.session.rss_last, mon.session.rss_peak = 412 * 2**20, 420 * 2**20
    return app, mon


def healthy(app, mon, n=240):
    mon.setup()
    mon.steps(1, n, lambda s: [2.3 * math.exp(-s / 60) + 0.1], lambda s: {k: v * (1 + 0.001 * s) for k, v in GRADS.items()})
    mon.output("stdout", "".join(f"epoch {e:3d}  train loss {2.3 * math.exp(-e * 12 / 60) + 0.1:.4f}\n" for e in range(1, 21)))
    mon.output("stderr", "UserWarning: this is stderr\n")
    mon.output("stdout", "\r 37%|███▋      | 84/227")


def nonfinite(app, mon):
    mon.setup()
    mon.steps(1, 119, lambda s: [2.3 * math.exp(-s / 60) + 0.1], GRADS)
    bad = dict(GRADS, **{"model.0.weight": math.nan, "model.0.bias": math.nan})
    mon.steps(120, 20, lambda s: [math.nan], bad)
    ctx = {"module": "model.2 (LogScale)", "input_finite": True, "output": "nan"}
    mon.emit(FindingEvent("error", "loss_error", "loss 'loss' is nan", 120, "loss|0", {"loss": "loss", "value": "nan"}),
             FindingEvent("error", "gradient_error", "non-finite gradient (nan) in model.0.weight and 1 more", 120,
                          "grad", {"parameters": ["model.0.weight", "model.0.bias"]}),
             FindingEvent("error", "model_error", "model.2 (LogScale) produced a non-finite output (nan) from a "
                          "finite input", 120, "model|model.2", ctx,
                          recommendation="check the operations in model.2's forward for log/sqrt/div of "
                                         "values that can become negative or zero"))


async def _tick(pilot):
    pilot.app.tick()
    await pilot.pause()


def test_running_80x24(snap_compare, tmp_path):
    app, mon = build(tmp_path)

    async def run_before(pilot):
        healthy(app, mon)
        await _tick(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_running_no_gpu_120x40(snap_compare, tmp_path):
    app, mon = build(tmp_path)

    async def run_before(pilot):
        healthy(app, mon)
        mon.emit(ActionResult("lower_lr", True, "learning rate x0.5: 0.001 -> 0.0005", 200, request_id=1))
        await _tick(pilot)

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_paused(snap_compare, tmp_path):
    app, mon = build(tmp_path)

    async def run_before(pilot):
        healthy(app, mon)
        await _tick(pilot)
        await pilot.press("p")
        mon.pause_held = True  # the training thread has reached the step boundary
        await _tick(pilot)

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


def test_nonfinite_error_selected(snap_compare, tmp_path):
    app, mon = build(tmp_path)

    async def run_before(pilot):
        nonfinite(app, mon)
        await _tick(pilot)
        await pilot.press("1", "end", "enter")

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


def test_finished_with_gpu(snap_compare, tmp_path):
    gpu = GpuSample(0.0, [GpuDevice(0, "NVIDIA H100 80GB HBM3", "GPU-aaa", 9 * 2**30, 80 * 2**30, 64,
                                    8 * 2**30, 0, 6 * 2**30, 7 * 2**30)])
    app, mon = build(tmp_path, gpu)

    async def run_before(pilot):
        healthy(app, mon)
        mon.end("finished", 0)
        await _tick(pilot)

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)
