"""The design document's Python API: its usage sections as written, edge cases, recovery, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import SCRIPTS, describe, findings, load_report, run_td, td_env
from tui_debug import (DebugConfig, DebugLevel, Debugger, DebuggingInterface, ErrorCategory, ErrorInfo,
                       ErrorSeverity, ErrorTracker, ModelDebugger, RecoveryManager)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # debug.log, errors.log, debug_report.json land here
    torch.manual_seed(0)


def quiet(**kw) -> DebugConfig:
    kw.setdefault("enable_console_output", False)
    kw.setdefault("enable_file_output", False)
    return DebugConfig(**kw)


def regression(n=64, features=10, batch=8, scale=1.0):
    X = torch.randn(n, features) * scale
    y = X @ torch.randn(features, 1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)


def mlp(features=10):
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 1))


def finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def by_category(tracker: ErrorTracker, category: str) -> list[ErrorInfo]:
    return [e for e in tracker.snapshot() if e.category.value == category]


# -- the document's usage sections, as written ---------------------------------------------------------
def test_import_tui_debug_does_not_import_torch():
    code = ("import sys, tui_debug\nfrom tui_debug import DebugConfig, ErrorTracker\n"
            "assert 'torch' not in sys.modules\nassert 'Debugger' in dir(tui_debug)\n"
            "assert 'torch' not in sys.modules\nfrom tui_debug import Debugger\nprint(Debugger.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], env=td_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Debugger"


def test_basic_usage(tmp_path):
    model, optimizer, loss_fn, dataloader = mlp(), None, nn.MSELoss(), regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = DebugConfig(debug_level=DebugLevel.DETAILED, enable_profiling=True, enable_memory_tracking=True,
                         enable_gradient_tracking=True, enable_loss_tracking=True, enable_performance_tracking=True,
                         log_file="debug.log", error_file="errors.log", max_log_size=100 * 1024 * 1024,
                         backup_count=5, enable_console_output=True, enable_file_output=True)
    debug_interface = DebuggingInterface(config)
    debug_interface.debug_training_loop(model, optimizer, loss_fn, dataloader, num_epochs=1)
    report = debug_interface.generate_debug_report()
    debug_interface.close()

    assert set(report) >= {"timestamp", "debug_summary", "model_states", "recommendations"}
    on_disk = json.loads((tmp_path / "debug_report.json").read_text())
    assert on_disk == report
    assert report["recommendations"] == ["No problems found."]
    summary = report["debug_summary"]
    assert summary["error_summary"]["total_errors"] == 0
    assert summary["steps"] == 8
    assert summary["performance_metrics"]["training_batch"]["count"] == 8
    assert len(summary["debug_data"]["losses"]) == 1  # every 10th batch: batch 0
    assert summary["memory_snapshots"] and summary["memory_snapshots"][0]["memory_usage"] > 0
    (state,) = report["model_states"].values()
    assert set(state["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert finite(model)


def test_advanced_usage():
    config = quiet(debug_level=DebugLevel.DETAILED, enable_profiling=True)
    debugger = Debugger(config)
    model = mlp()
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    with debugger.debug_context("forward_pass", batch=0):
        loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    grads = debugger.track_gradients(model)
    assert set(grads) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    g = model[0].weight.grad
    assert grads["0.weight"]["norm"] == pytest.approx(float(g.norm()), rel=1e-5)
    assert set(grads["0.weight"]) == {"norm", "mean", "std", "min", "max"}
    assert debugger.track_loss(loss, step=0) == pytest.approx(float(loss.detach()))
    snap = debugger.track_memory()
    assert set(snap) == {"timestamp", "memory_usage", "gpu_memory", "gc_stats"}

    def work(n):
        return sum(i * i for i in range(n))

    assert debugger.profile_function(work, 1000) == work(1000)
    assert "work" in debugger.debug_data["profiling"]
    assert "test_advanced_usage.<locals>.work" in debugger.profile_stats

    with pytest.raises(ZeroDivisionError):
        with debugger.debug_context("outer"):
            with debugger.debug_context("inner", k=1):
                1 / 0
    summary = debugger.get_debug_summary()
    assert set(summary) >= {"error_summary", "performance_metrics", "memory_snapshots", "debug_data"}
    assert summary["error_summary"]["total_errors"] == 1  # tracked once, by the innermost context
    (err,) = debugger.error_tracker.snapshot()
    assert err.category is ErrorCategory.TRAINING_ERROR and err.context["context_name"] == "inner"
    assert "ZeroDivisionError" in err.traceback
    assert set(summary["performance_metrics"]) == {"forward_pass", "outer", "inner"}
    debugger.close()


def test_model_debugging():
    debugger = Debugger(quiet())
    model_debugger = ModelDebugger(debugger)
    model = mlp()
    x = torch.randn(4, 10)
    out = model_debugger.debug_model_forward(model, x, expected_output_shape=(4, 1))
    assert out.shape == (4, 1)
    assert debugger.error_tracker.snapshot() == []

    bad = x.clone()
    bad[1, 3] = float("nan")
    model_debugger.debug_model_forward(model, bad)
    (info,) = by_category(debugger.error_tracker, "input_validation")
    assert "nan" in info.message

    model_debugger.debug_model_forward(model, x, expected_output_shape=(4, 2))
    (info,) = by_category(debugger.error_tracker, "model_error")
    assert "shape mismatch" in info.message and info.context["got"] == [4, 1]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model[0].weight.detach().clone()
    loss = model_debugger.debug_training_step(model, optimizer, nn.MSELoss(), x, torch.randn(4, 1))
    assert isinstance(loss, float) and math.isfinite(loss)
    assert debugger.step == 1 and not torch.equal(before, model[0].weight)

    analysis = model_debugger.analyze_model_parameters(model)
    assert set(analysis["0.weight"]) == {"shape", "dtype", "requires_grad", "has_nan", "has_inf", "norm", "mean",
                                         "std", "min", "max"}
    w = model[0].weight.detach()
    assert analysis["0.weight"]["shape"] == [16, 10] and analysis["0.weight"]["dtype"] == "torch.float32"
    assert analysis["0.weight"]["norm"] == pytest.approx(float(w.norm()), rel=1e-5)
    assert analysis["0.weight"]["max"] == pytest.approx(float(w.max()))
    assert analysis["0.weight"]["has_nan"] is False
    assert len(model_debugger.model_states) == 1
    with torch.no_grad():
        model[2].bias.fill_(float("inf"))
    analysis = model_debugger.analyze_model_parameters(model)
    assert analysis["2.bias"]["has_inf"] and not analysis["2.bias"]["has_nan"]
    assert any("2.bias" in e.message for e in by_category(debugger.error_tracker, "model_error"))
    assert len(set(model_debugger.model_states)) == 2  # unique keys
    debugger.close()


def test_error_performance_and_memory_analysis():
    di = DebuggingInterface(quiet())
    model = mlp()
    di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), regression(n=120),
                           num_epochs=2)
    summary = di.debugger.get_debug_summary()
    # Error analysis
    errors = summary["error_summary"]
    assert errors["total_errors"] == 0 and errors["error_counts"] == {}
    # Performance analysis
    perf = summary["performance_metrics"]
    assert perf["training_step"]["count"] == 30
    assert 0 < perf["training_step"]["min"] <= perf["training_step"]["mean"] <= perf["training_step"]["max"]
    assert len(di.debugger.performance_metrics["training_batch"]) == 30
    # Memory analysis: batch 0 of each epoch, then bounded at 100
    assert len(di.debugger.memory_snapshots) == 2
    for _ in range(150):
        di.debugger.track_memory()
    assert len(di.debugger.memory_snapshots) == 100
    assert len(summary["memory_snapshots"]) <= 10
    di.close()


# -- edge cases ----------------------------------------------------------------------------------------------
def test_empty_dataloader():
    di = DebuggingInterface(quiet())
    model = mlp()
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 10), torch.zeros(0, 1)))
    result = di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), empty,
                                    num_epochs=2)
    assert result["steps"] == 0 and result["stopped"] is None
    (info,) = by_category(di.debugger.error_tracker, "data_error")
    assert info.severity is ErrorSeverity.WARNING and info.count == 2 and "no batches" in info.message
    assert info.recovery_action is None  # (it said "batch skipped; training went on": there was no batch)
    assert len(di.model_debugger.model_states) == 2
    di.close()


def test_a_data_finding_of_the_users_own_gets_no_recovery_it_did_not_have():
    di = DebuggingInterface(quiet())
    info = di.debugger.error_tracker.track_error("checksum mismatch in shard 7", ErrorSeverity.WARNING,
                                                 ErrorCategory.DATA_ERROR)
    assert info.recovery_action is None
    di.close()


def test_a_batch_that_raises_is_tracked_once_and_training_continues():
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            if i == 9:
                raise KeyError(f"sample {i} is corrupt")
            return torch.randn(10), torch.randn(1)

    class Picky(nn.Module):  # raises on one batch size (the last batch is smaller)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 1)

        def forward(self, x):
            if x.shape[0] != 8:
                raise RuntimeError(f"expected a batch of 8, got {x.shape[0]}")
            return self.lin(x)

    di = DebuggingInterface(quiet())
    model = Picky()
    loader = torch.utils.data.DataLoader(Data(), batch_size=8)
    data = list(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 10), torch.randn(20, 1)),
                                            batch_size=8))
    result = di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), loader)
    assert result["failed_batches"] == 1 and result["steps"] == 3
    result = di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), data)
    assert result["failed_batches"] == 1 and result["steps"] == 3 + 2
    tracker = di.debugger.error_tracker
    (data_error,) = by_category(tracker, "data_error")
    assert data_error.count == 1 and "sample 9 is corrupt" in data_error.message
    assert data_error.recovery_action
    (crash,) = by_category(tracker, "training_error")
    assert crash.count == 1 and "expected a batch of 8" in crash.message and crash.traceback
    assert crash.context["context_name"] == "training_step" and crash.context["exception_type"] == "RuntimeError"
    assert tracker.get_error_summary()["total_errors"] == 2
    di.close()


def test_nan_targets_skip_the_step():
    di = DebuggingInterface(quiet())
    model = mlp()
    X, y = torch.randn(16, 10), torch.randn(16, 1)
    y[3] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    result = di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), loader)
    assert result["steps"] == 1 and result["skipped_steps"] == 1
    (info,) = di.debugger.error_tracker.snapshot()  # the root cause only, not the NaN loss it caused
    assert info.category is ErrorCategory.INPUT_VALIDATION and "target" in info.message
    assert "skipped" in info.recovery_action
    assert finite(model)
    di.close()


def test_model_without_parameters():
    di = DebuggingInterface(quiet())
    model = nn.ReLU()
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    result = di.debug_training_loop(model, optimizer, nn.MSELoss(), regression(features=1, n=24),
                                    max_consecutive_failures=2)
    assert result["steps"] == 0 and result["stopped"]
    tracker = di.debugger.error_tracker
    (info,) = by_category(tracker, "training_error")[:1]
    assert "does not require grad" in info.message and "no trainable parameters" in info.message
    assert any(e.severity is ErrorSeverity.CRITICAL for e in tracker.snapshot())
    assert di.model_debugger.analyze_model_parameters(model) == {}
    di.close()


def test_loss_that_is_not_a_scalar():
    di = DebuggingInterface(quiet())
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    result = di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(reduction="none"),
                                    regression(n=40))
    assert result["steps"] == 0 and result["failed_batches"] == 5
    (info,) = di.debugger.error_tracker.snapshot()
    assert info.category is ErrorCategory.LOSS_ERROR and "not a scalar" in info.message and info.count == 5
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    di.close()


# -- debug levels ------------------------------------------------------------------------------------------
def test_debug_level_none_computes_nothing():
    di = DebuggingInterface(quiet(debug_level=DebugLevel.NONE, enable_profiling=True))
    model = mlp()
    result = di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), regression())
    dbg = di.debugger
    assert result["steps"] == 8
    assert dict(dbg.performance_metrics) == {} and dbg.memory_snapshots == [] and dbg.debug_data == {}
    assert dbg.track_memory() is None and dbg.track_gradients(model) is None
    assert dbg.profile_function(lambda: 42) == 42 and dbg.profile_stats == {}
    assert di.model_debugger.analyze_model_parameters(model) == {}
    di.close()


def test_profiling_level_adds_cprofile():
    dbg = Debugger(quiet(debug_level=DebugLevel.PROFILING, enable_profiling=False))
    assert dbg.profile_function(sorted, [3, 1, 2]) == [1, 2, 3]
    assert "sorted" in dbg.profile_stats
    plain = Debugger(quiet(debug_level=DebugLevel.DETAILED, enable_profiling=False))
    assert plain.profile_function(sorted, [2, 1]) == [1, 2] and plain.profile_stats == {}
    dbg.close()
    plain.close()


def test_nonfinite_gradient_is_one_finding():
    dbg = Debugger(quiet())
    model = mlp()
    nn.functional.mse_loss(model(torch.randn(4, 10)), torch.randn(4, 1)).backward()
    model[0].weight.grad[0, 0] = float("nan")
    model[2].weight.grad[0, 0] = float("inf")
    dbg.track_gradients(model)
    (info,) = dbg.error_tracker.snapshot()
    assert info.category is ErrorCategory.GRADIENT_ERROR
    assert info.context["parameters"] == ["0.weight", "2.weight"]
    dbg.close()


# -- recovery -------------------------------------------------------------------------------------------------
def test_custom_strategy_is_called_on_track_error():
    debugger = Debugger(quiet())
    rm = RecoveryManager(debugger)
    assert debugger.error_tracker.recovery_manager is rm
    assert set(rm.recovery_strategies) >= {ErrorCategory.MEMORY_ERROR, ErrorCategory.GRADIENT_ERROR,
                                           ErrorCategory.LOSS_ERROR, ErrorCategory.DATA_ERROR}
    seen = []

    def reload_shard(info):
        seen.append(info)
        return "reloaded the shard"

    previous = rm.register_strategy(ErrorCategory.DATA_ERROR, reload_shard)
    assert previous is not None
    info = debugger.error_tracker.track_error(IOError("shard 3 unreadable"), ErrorSeverity.ERROR,
                                              ErrorCategory.DATA_ERROR)
    assert seen == [info] and info.recovery_action == "reloaded the shard"
    rm.register_strategy("timeout_error", lambda i: seen.append(i.category))
    debugger.error_tracker.track_error("slow", ErrorSeverity.WARNING, ErrorCategory.TIMEOUT_ERROR)
    assert seen[-1] is ErrorCategory.TIMEOUT_ERROR
    debugger.close()

    off = Debugger(quiet(recover="off"))
    rm = RecoveryManager(off)
    rm.register_strategy(ErrorCategory.DATA_ERROR, lambda i: seen.append("off"))
    off.error_tracker.track_error("x", ErrorSeverity.ERROR, ErrorCategory.DATA_ERROR)
    assert "off" not in seen
    off.close()


def test_memory_error_strategy_clears_the_cache():
    debugger = Debugger(quiet())
    rm = RecoveryManager(debugger)
    info = debugger.error_tracker.track_error(MemoryError("out of memory"), ErrorSeverity.ERROR,
                                              ErrorCategory.MEMORY_ERROR)
    assert rm.actions_taken[-1]["action"] == "clear_cache" and "cleared cache" in info.recovery_action
    debugger.close()


def test_nan_run_is_recovered_by_rollback_and_lower_lr():
    # Inputs x100 and lr=1: the loss overflows to inf within five steps.
    di = DebuggingInterface(quiet(recover="auto", snapshot_interval=4))
    di.recovery_manager.max_lr_halvings = 20
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = di.debug_training_loop(model, optimizer, nn.MSELoss(), regression(n=256, features=8, batch=16,
                                                                                scale=100.0), num_epochs=8)
    tracker = di.debugger.error_tracker
    nonfinite = [e for e in by_category(tracker, "loss_error") if e.severity is ErrorSeverity.ERROR]
    assert nonfinite and ("is inf" in nonfinite[0].message or "is nan" in nonfinite[0].message)
    assert "rolled back" in nonfinite[0].recovery_action and "learning rate" in nonfinite[0].recovery_action
    done = {a["action"] for a in di.recovery_manager.actions_taken if a["ok"]}
    assert {"rollback", "lower_lr"} <= done
    assert result["skipped_steps"] >= 1
    assert finite(model)
    assert optimizer.param_groups[0]["lr"] < 1.0
    assert math.isfinite(result["last_loss"]) and result["last_loss"] < di.debugger.debug_data["losses"][0]["value"]
    report = di.generate_debug_report("report.json")
    assert report["recovery_actions"] and any("[loss_error]" in r for r in report["recommendations"])
    di.close()


def test_in_a_multi_process_run_findings_change_nothing_on_one_rank_alone(monkeypatch):
    """The same diverging run as one of 2 processes (torch.distributed): a rollback or a learning rate
    halved on this rank alone would make DDP's replicas diverge, so they are recorded, not applied."""
    from tui_debug import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    di = DebuggingInterface(quiet(recover="auto", snapshot_interval=4))
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    di.debug_training_loop(model, optimizer, nn.MSELoss(), regression(n=256, features=8, batch=16, scale=100.0),
                           num_epochs=2)
    refused = [a for a in di.recovery_manager.actions_taken if a["action"] in ("rollback", "lower_lr")]
    assert refused and all(not a["ok"] and "2 processes training together" in a["message"] for a in refused)
    assert optimizer.param_groups[0]["lr"] == 1.0
    di.close()


def test_ui_true_runs_headless_without_a_ui():
    di = DebuggingInterface(quiet(), ui=True)
    model = mlp()
    result = di.debug_training_loop(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), regression())
    assert result["steps"] == 8 and not di.ui_active
    di.close()


# -- under python -m tui_debug --------------------------------------------------------------------------------
def test_api_script_under_the_cli_counts_each_finding_once(tmp_path):
    out = tmp_path / "run"
    proc = run_td("--out", out, SCRIPTS / "api_under_cli.py", tmp_path / "api.json", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "under monitor: True steps: 12 finite: True" in proc.stdout, describe(proc)
    report = load_report(out)
    messages = [(e["category"], e["message"]) for e in report["errors"]]
    assert len(messages) == len(set(messages))
    (nan_input,) = findings(report, "input_validation")  # the monitor's; the API's duplicate is skipped
    assert nan_input["count"] == 2  # one NaN batch per epoch, counted once each
    (data,) = findings(report, "data_error")  # only the API sees it (caught by debug_training_loop)
    assert data["count"] == 2 and "sample 45 is corrupt" in data["message"]
    assert report["summary"]["total_errors"] == sum(e["count"] for e in report["errors"])
    assert proc.stderr.count("sample 45 is corrupt") == 1  # printed once, by the monitor
    api = json.loads((tmp_path / "api.json").read_text())  # the API's own report reads the same store
    assert sorted(e["message"] for e in api["errors"]) == sorted(m for _, m in messages)


def test_a_skipped_steps_findings_all_carry_the_step_in_progress():
    """A NaN input after 3 good steps was filed at step 3 (the last one done) with context step 4, and a
    NaN loss in the same place at step 4."""
    dbg = Debugger(quiet())
    md = ModelDebugger(dbg)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(3):
        md.debug_training_step(model, opt, nn.MSELoss(), x, y)
    bad = x.clone()
    bad[0, 0] = float("nan")
    md.debug_training_step(model, opt, nn.MSELoss(), bad, y)
    md.debug_training_step(model, opt, lambda o, t: (o - t).pow(2).mean() * float("nan"), x, y)
    found = [(e.category.value, e.step, e.context.get("step")) for e in dbg.error_tracker.errors]
    assert found == [("input_validation", 4, 4), ("loss_error", 4, 4)], found


@pytest.mark.parametrize("name, category", [("data_loading", "data_error"), ("validation", "evaluation_error"),
                                            ("eval_epoch", "evaluation_error"), ("training_batch", "training_error"),
                                            ("load_latest_checkpoint", "training_error")])
def test_a_debug_contexts_name_says_what_failed_in_it(name, category):
    """An OSError in debug_context("data_loading") was a training_error."""
    dbg = Debugger(quiet())
    with pytest.raises(OSError):
        with dbg.debug_context(name):
            raise OSError("shard 7 unreadable")
    (info,) = dbg.error_tracker.errors
    assert info.category.value == category, info
