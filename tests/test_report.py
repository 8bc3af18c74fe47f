"""The JSON report of real runs: a NaN mid-run, a healthy run, a crash inside a module."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import EXAMPLES, SCHEMA_FILE, SCRIPTS, describe, findings, load_report, run_td


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("nan_midrun")
    proc = run_td("--out", tmp / "run", EXAMPLES / "nan_midrun.py", "--steps", "40", "--break-at", "20", cwd=tmp)
    assert proc.returncode == 0, describe(proc)
    return load_report(tmp / "run")


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("crash")
    proc = run_td("--out", tmp / "run", SCRIPTS / "crash_in_forward.py", cwd=tmp)
    assert proc.returncode == 1, describe(proc)
    return load_report(tmp / "run")


def validate(report: dict[str, Any]) -> None:
    import jsonschema

    assert SCHEMA_FILE.is_file(), f"the report's JSON Schema {SCHEMA_FILE} does not exist"
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(report), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:20])


def test_nan_report_matches_the_schema(nan_run: dict[str, Any]) -> None:
    validate(nan_run)


def test_crash_report_matches_the_schema(crash_run: dict[str, Any]) -> None:
    validate(crash_run)


def test_nan_report_run_section(nan_run: dict[str, Any]) -> None:
    assert nan_run["schema_version"] == 1
    assert nan_run["run"]["status"] == "finished"
    assert nan_run["run"]["exit_code"] == 0
    assert nan_run["run"]["argv"][1:] == ["--steps", "40", "--break-at", "20"]
    assert nan_run["summary"]["steps"] == 40


def test_nan_report_names_the_module_the_loss_and_the_gradients(nan_run: dict[str, Any]) -> None:
    models = [e for e in findings(nan_run, "model_error") if "model.2 (LogScale)" in e["message"]]
    assert models, nan_run["errors"]
    assert models[0]["first_step"] == 20
    assert models[0]["context"]["module"] == "model.2 (LogScale)"
    # Nothing before step 20 is blamed.
    assert all(e["first_step"] >= 20 for e in nan_run["errors"]), nan_run["errors"]

    losses = [e for e in findings(nan_run, "loss_error") if "'loss'" in e["message"]]
    assert len(losses) == 1, nan_run["errors"]
    assert losses[0]["first_step"] == 20
    assert losses[0]["step"] == 20
    assert losses[0]["count"] == 21 and losses[0]["last_step"] == 40

    grads = findings(nan_run, "gradient_error")
    assert grads, nan_run["errors"]
    assert grads[0]["first_step"] == 20
    assert "model.0.weight" in grads[0]["context"]["parameters"]


def test_nan_report_loss_history_and_gradients(nan_run: dict[str, Any]) -> None:
    loss = nan_run["losses"]["loss"]
    assert loss["count"] == 40
    assert loss["nonfinite"] > 0
    history = loss["history"]
    assert isinstance(history, list) and history
    for point in history:
        assert isinstance(point, list) and len(point) == 2, point
        step, value = point
        assert isinstance(step, int)
        assert isinstance(value, float) or value in ("nan", "inf", "-inf"), point
    steps = [s for s, _ in history]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 40
    assert all(math.isfinite(v) for s, v in history if s < 20)
    assert all(v == "nan" for s, v in history if s >= 20)
    assert "model.0.weight" in nan_run["gradients"]
    assert nan_run["gradients"]["model.0.weight"]["count"] == 40
    assert nan_run["recommendations"], "a run with findings must come with recommendations"
    assert nan_run["models"] and nan_run["models"][0]["name"] == "model"


def test_healthy_run_has_no_findings(tmp_path: Path) -> None:
    proc = run_td("--out", tmp_path / "run", EXAMPLES / "digits.py", "--epochs", "1", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "finished"
    assert report["run"]["exit_code"] == 0
    assert report["errors"] == []
    assert report["summary"]["total_errors"] == 0
    assert report["summary"]["steps"] > 0
    assert report["losses"]["loss"]["nonfinite"] == 0


def test_crash_in_a_module_forward(crash_run: dict[str, Any]) -> None:
    assert crash_run["run"]["status"] == "crashed"
    assert crash_run["run"]["exit_code"] == 1
    training = findings(crash_run, "training_error")
    assert len(training) == 1, crash_run["errors"]
    finding = training[0]
    assert finding["context"]["module"] == "model.1 (Bad)"
    assert "Bad.forward failed on call 3" in finding["message"]
    assert "ValueError" in finding["message"]
    assert finding["traceback"] and "crash_in_forward.py" in finding["traceback"]
    assert crash_run["summary"]["steps"] == 2
    # the third iteration's forward raised: step 3, as a NaN found in that forward would be numbered
    assert finding["step"] == finding["first_step"] == 3


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="a CPU GradScaler is torch >= 2.3")
def test_gradscaler_skips_are_counted_not_stepped_and_advised_on(tmp_path: Path) -> None:
    """Iterations a GradScaler skips are no steps: the report counts them apart, keeps their losses out
    of the loss history, raises no error, and advises when they are a large share."""
    proc = run_td("--out", tmp_path / "run", SCRIPTS / "amp_scaler_skips.py", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    report = load_report(tmp_path / "run")
    validate(report)
    scale = float(proc.stdout.split("SCALE")[1])
    skipped = round(127 - math.log2(scale))  # each skip halves the scale (no growth within 2000 steps)
    assert report["performance"]["scaler_skipped_steps"] == skipped
    assert 20 <= skipped < 60 and report["summary"]["steps"] == 60 - skipped
    (loss,) = report["losses"].values()
    assert loss["count"] == 60 - skipped, loss
    assert not [e for e in report["errors"] if e["severity"] in ("error", "critical")], report["errors"]
    assert any(r.startswith("[amp] a GradScaler skipped") for r in report["recommendations"]), \
        report["recommendations"]


def test_page_faults_per_step_are_reported_and_advised_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run whose allocator re-faults megabytes every step (glibc trimming its heap) gets the
    figure in `performance` and a recommendation naming the fix; a quiet run or a GPU run does not."""
    from tui_debug import session as session_module
    from tui_debug.config import DebugConfig
    from tui_debug.errors import ErrorTracker
    from tui_debug.report import build_report, recommendations
    from tui_debug.session import Session

    def run(faults_per_step: int, cuda: bool) -> Session:
        config = DebugConfig()
        s = Session(config, ErrorTracker(config))
        for steps in (0, 10, 60, 110):
            ctx: dict[str, Any] = {"rss_bytes": 300 << 20, "minor_faults": 5_000 + steps * faults_per_step}
            if cuda:
                ctx["cuda_allocated_bytes"] = 1 << 30
            monkeypatch.setattr(session_module, "memory_context", lambda ctx=ctx: ctx)
            s.steps = steps
            s.sample_memory()
        return s

    noisy = run(3_000, cuda=False)
    assert build_report(noisy)["performance"]["page_faults_per_step"] == 3_000
    (advice,) = [r for r in recommendations(noisy, []) if r.startswith("[performance]")]
    assert "3,000 page faults per training step" in advice and "MALLOC_TRIM_THRESHOLD_" in advice
    for quiet in (run(20, cuda=False), run(3_000, cuda=True)):
        assert not [r for r in recommendations(quiet, []) if r.startswith("[performance]")]
    short = Session(DebugConfig(), ErrorTracker(DebugConfig()))
    assert build_report(short)["performance"]["page_faults_per_step"] is None


TOY = """
import torch
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(8, 4), torch.randn(8, 1)
for _ in range(3000):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
"""


@pytest.mark.parametrize("sample", [True, False])
def test_the_report_says_how_many_steps_were_checked(tmp_path: Path, sample: bool) -> None:
    """Sub-millisecond steps are sampled: a user reading "no findings" must be told it covers only
    the checked steps."""
    (tmp_path / "toy.py").write_text(TOY)
    (tmp_path / "td.toml").write_text(f"sample_fast_steps = {str(sample).lower()}\n")
    proc = run_td("--headless", "--out", tmp_path / "run", "--config", tmp_path / "td.toml", "toy.py", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    report = load_report(tmp_path / "run")
    validate(report)
    steps, checked = report["summary"]["steps"], report["performance"]["checked_steps"]
    assert steps == 3000
    sampler = report["performance"]["sampler"]  # why: the decisions, with the step times they compared
    if sample:
        assert 32 <= checked < steps // 2, checked
        assert f"(exit 0; {checked} checked: fast steps are sampled)" in proc.stderr
        probe = sampler["decisions"][0]
        assert probe["kind"] == "probe" and 32 <= probe["step"] < steps and probe["every"] > 1, sampler
        assert probe["checked_s"] > probe["unchecked_s"] > 0, probe
    else:
        assert checked == steps
        assert "sampled" not in proc.stderr
        assert sampler["budget"] == 0 and sampler["every"] == 1 and not sampler["decisions"], sampler


SLOW_MANY_CALLS = """
import time, torch

class Wait(torch.nn.Module):
    def forward(self, x):
        time.sleep(0.006)  # every step slower than the 5 ms under which steps count as fast
        return x

model = torch.nn.Sequential(Wait(), *[torch.nn.Linear(16, 16) for _ in range(80)])
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(16, 16)
for _ in range(200):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
"""


def test_slow_steps_whose_checks_cost_over_the_slow_budget_are_sampled(tmp_path: Path) -> None:
    """Steps over 5 ms were all checked whatever that cost. With a 1% budget for them, 81 module
    calls' hooks (~1-2 ms) take far more than that of a step of 6 ms or more: its steps are sampled,
    and the user is told why fewer steps were checked."""
    (tmp_path / "slow.py").write_text(SLOW_MANY_CALLS)
    (tmp_path / "td.toml").write_text("max_overhead_slow = 0.01\n")
    proc = run_td("--headless", "--out", tmp_path / "run", "--config", tmp_path / "td.toml", "slow.py", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    report = load_report(tmp_path / "run")
    validate(report)
    steps, checked = report["summary"]["steps"], report["performance"]["checked_steps"]
    sampler = report["performance"]["sampler"]
    assert steps == 200 and 16 <= checked < steps, (checked, sampler)
    assert (f"(exit 0; {checked} checked: the monitor's hooks took over 1% of a step, so checks are sampled)"
            in proc.stderr)
    (decision, *_) = sampler["decisions"]
    assert decision["kind"] == "hooks" and sampler["slow_budget"] == 0.01 and decision["budget"] == 0.01, sampler
    assert decision["every"] > 1 and decision["hook_share"] > 0.01 and decision["checked_s"] > 0.006, decision


def test_step_times_folded_in_bulk_match_one_by_one() -> None:
    """A sampled-out span's step times go into the bounded buffer in one call; the percentiles,
    mean and count the report gives must be those of adding them one by one, ring wrap included."""
    import random

    from tui_debug.history import Reservoir

    rng = random.Random(0)
    for _ in range(500):
        cap = rng.randint(1, 30)
        one, bulk = Reservoir(cap), Reservoir(cap)
        for _ in range(rng.randint(1, 8)):
            values = [rng.random() for _ in range(rng.randint(0, 70))]
            for v in values:
                one.add(v)
            bulk.extend(values)
            assert sorted(one.values()) == sorted(bulk.values())
            assert (one.count, one.percentile(50), one.percentile(95)) == (bulk.count, bulk.percentile(50), bulk.percentile(95))
            assert abs(one.total - bulk.total) < 1e-9


@pytest.mark.parametrize("bad_at", [0, 1, 2999, 3000, 3001, 77777, 99999])
def test_the_loss_history_keeps_the_step_that_went_nan(bad_at: int) -> None:
    """100,000 points into 1,000: a fixed stride kept the NaN only when it fell on the stride
    (the report's nonfinite count said 1, its history showed none, and so did the UI's chart)."""
    from tui_debug.history import DownsampledHistory

    history = DownsampledHistory(1000)
    for step in range(100_000):
        history.add(step, float("nan") if step == bad_at else 1.0 / (step + 1))
    points = history.points()
    assert len(history) <= 1000 and points[0][0] == 0 and points[-1][0] == 99_999
    assert [s for s, v in points if v != v] == [bad_at]
    assert [s for s, _ in points] == sorted(s for s, _ in points)


def test_a_loss_history_of_nothing_but_nan_stays_bounded() -> None:
    from tui_debug.history import DownsampledHistory

    history = DownsampledHistory(1000)
    for step in range(50_000):
        history.add(step, float("nan"))
    assert len(history) <= 1000


def test_a_noisy_loss_at_its_optimum_is_not_said_to_end_higher_but_a_rising_one_is() -> None:
    """Mini-batch losses scatter: the first and the last of them said "ended higher than it started"
    of a healthy run (0.25 -> 1.26, while the medians went 0.86 -> 0.84)."""
    import random

    from tui_debug.config import DebugConfig
    from tui_debug.errors import ErrorTracker
    from tui_debug.events import LossSiteEvent, StepRecord
    from tui_debug.report import recommendations
    from tui_debug.session import Session

    rng = random.Random(0)
    for rising, expected in ((False, False), (True, True)):
        config = DebugConfig()
        session = Session(config, ErrorTracker(config))
        values = [0.85 * (1 + 3 * i / 400 if rising else 1) * rng.uniform(0.3, 1.7) for i in range(400)]
        values[0], values[-1] = 0.25, 1.26  # the first and last batches of the healthy run
        session.handle([LossSiteEvent(0, "loss", "train.py:9")] + [
            StepRecord(i + 1, float(i), 0.01, 0, [(0, v)], None, None) for i, v in enumerate(values)])
        said = [r for r in recommendations(session, []) if "ended higher" in r]
        assert bool(said) is expected, said


@pytest.mark.parametrize("backward", [False, True], ids=["inference", "backward-without-step"])
def test_a_script_that_never_steps_is_told_so_only_when_it_meant_to_train(tmp_path: Path, backward: bool) -> None:
    script = tmp_path / "run_model.py"
    script.write_text(
        "import torch, torch.nn as nn\n"
        "model = nn.Linear(4, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)  # made, never stepped\n"
        "for _ in range(5):\n"
        f"    out = model(torch.randn(8, 4)).pow(2).mean()\n"
        f"    {'out.backward()' if backward else 'print(round(float(out), 1) >= 0)'}\n", encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    said = load_report(tmp_path / "run")["recommendations"]
    if backward:
        assert any("no optimizer step was seen" in r for r in said), said
    else:
        assert said == ["No problems found."], said


def test_the_report_gets_the_permissions_of_its_sibling_files(tmp_path: Path) -> None:
    """It was 0600 (mkstemp's), its logs 0644: another user, or a CI step collecting artifacts, could not read it."""
    script = tmp_path / "s.py"
    script.write_text("print('ran')\n", encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    mode = lambda name: (tmp_path / "run" / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("report.json") == mode("output.log") and mode("report.json") & 0o044, oct(mode("report.json"))


def test_a_run_whose_steps_are_all_skipped_is_told_it_has_stopped_and_counts_them(tmp_path: Path) -> None:
    """examples/diverging.py under --recover safe: from step 28 on, every step was skipped (the parameters
    stayed finite, and frozen) with no word of it beyond the gradient finding's count."""
    proc = run_td("--out", tmp_path / "run", EXAMPLES / "diverging.py", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    report = load_report(tmp_path / "run")
    stuck = [e for e in report["errors"] if e["message"].startswith("training has stopped")]
    assert len(stuck) == 1 and stuck[0]["category"] == "optimization_error", report["errors"]
    skipped = report["performance"]["skipped_steps"]
    assert skipped >= 20 and stuck[0]["step"] >= 20, skipped
    assert any("Roll back" in r for r in report["recommendations"]), report["recommendations"]


def test_advice_from_thousands_of_findings_is_capped_and_says_how_many_more() -> None:
    from tui_debug.config import DebugConfig
    from tui_debug.errors import ErrorCategory, ErrorSeverity, ErrorTracker
    from tui_debug.report import MAX_FINDING_ADVICE, recommendations
    from tui_debug.session import Session

    config = DebugConfig(enable_file_output=False, enable_console_output=False)
    tracker = ErrorTracker(config)
    for i in range(300):
        tracker.track_error(f"head{i} produced nan", ErrorSeverity.ERROR, ErrorCategory.MODEL_ERROR, step=i,
                            recommendation=f"Check head{i}.")
    said = recommendations(Session(config, tracker), tracker.snapshot())
    assert len(said) == MAX_FINDING_ADVICE + 1 and said[0].startswith("[model_error] head0 produced nan")
    assert said[-1] == f"... and {300 - MAX_FINDING_ADVICE} more findings with advice of their own: see errors[].recommendation."
    tracker.stop()
