"""ErrorTracker (ids, coalescing, tracebacks, bounded store, log files) and DebugConfig loading."""

from __future__ import annotations

import logging
import re
import os
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tui_debug.config import ConfigError, DebugConfig, DebugLevel, load_config
from tui_debug.errors import ErrorCategory, ErrorSeverity, ErrorTracker

from helpers import describe, load_report, nonempty_lines, run_td

W, E = ErrorSeverity.WARNING, ErrorSeverity.ERROR


@pytest.fixture
def make_tracker(tmp_path: Path) -> Iterator:
    made: list[ErrorTracker] = []

    def make(**config) -> ErrorTracker:
        config.setdefault("enable_console_output", False)
        tracker = ErrorTracker(DebugConfig(**config), log_dir=tmp_path / f"logs{len(made)}")
        made.append(tracker)
        return tracker

    yield make
    for tracker in made:
        tracker.stop()


def test_ids_are_unique_across_threads(make_tracker) -> None:
    tracker = make_tracker()
    n_threads, per_thread = 8, 250
    ids: list[list[str]] = [[] for _ in range(n_threads)]
    start = threading.Barrier(n_threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            ids[t].append(tracker.track_error(f"finding {t}-{i}", W, ErrorCategory.TRAINING_ERROR).error_id)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    all_ids = [i for chunk in ids for i in chunk]
    assert len(all_ids) == n_threads * per_thread
    assert len(set(all_ids)) == len(all_ids)
    assert len(tracker.snapshot()) == n_threads * per_thread
    assert tracker.get_error_summary()["total_errors"] == n_threads * per_thread


def test_concurrent_repeats_of_one_key_coalesce_exactly(make_tracker) -> None:
    tracker = make_tracker()
    n_threads, per_thread = 6, 200
    start = threading.Barrier(n_threads)

    def work() -> None:
        start.wait()
        for i in range(per_thread):
            tracker.track_error("loss is nan", E, ErrorCategory.LOSS_ERROR, key="nan", step=i)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    (info,) = tracker.snapshot()
    assert info.count == n_threads * per_thread


def test_repeats_coalesce_with_count_and_steps(make_tracker) -> None:
    tracker = make_tracker()
    first = tracker.track_error("loss 'loss' is nan", E, ErrorCategory.LOSS_ERROR, step=20, key="nan|loss",
                                context={"value": "nan"})
    for step in range(21, 31):
        again = tracker.track_error("loss 'loss' is nan", E, ErrorCategory.LOSS_ERROR, step=step, key="nan|loss")
        assert again is first
    other = tracker.track_error("something else", W, ErrorCategory.MODEL_ERROR, step=25)
    assert other.error_id != first.error_id
    assert first.count == 11
    assert first.first_step == 20
    assert first.last_step == 30
    assert first.step == 20
    assert len(tracker.snapshot()) == 2
    d = first.to_dict()
    assert (d["count"], d["first_step"], d["last_step"]) == (11, 20, 30)
    # Same message without an explicit key coalesces too (the key defaults to category + message).
    a = tracker.track_error("grad norm exploded", W, ErrorCategory.GRADIENT_ERROR, step=1)
    b = tracker.track_error("grad norm exploded", W, ErrorCategory.GRADIENT_ERROR, step=2)
    assert a is b and a.count == 2 and a.last_step == 2


def _raise_deep() -> None:
    def innermost() -> None:
        raise ValueError("deep failure")

    innermost()


def test_traceback_comes_from_the_exception_outside_an_except_block(make_tracker) -> None:
    tracker = make_tracker()
    try:
        _raise_deep()
    except ValueError as e:
        exc = e
    info = tracker.track_error(exc, E, ErrorCategory.TRAINING_ERROR)  # no exception being handled here
    assert info.message == "ValueError: deep failure"
    assert info.traceback is not None
    assert info.traceback.startswith("Traceback (most recent call last):")
    assert "in innermost" in info.traceback and "in _raise_deep" in info.traceback
    assert 'raise ValueError("deep failure")' in info.traceback
    assert info.traceback.rstrip().endswith("ValueError: deep failure")
    assert "NoneType: None" not in info.traceback


def test_error_summary(make_tracker) -> None:
    tracker = make_tracker()
    tracker.track_error("a", E, ErrorCategory.LOSS_ERROR, key="a")
    tracker.track_error("a", E, ErrorCategory.LOSS_ERROR, key="a")
    tracker.track_error("b", W, ErrorCategory.DATA_ERROR)
    summary = tracker.get_error_summary()
    assert summary["total_errors"] == 3
    assert summary["error_counts"] == {"loss_error": 2, "data_error": 1}
    assert isinstance(summary["recent_errors"], list) and len(summary["recent_errors"]) == 2
    assert [e["message"] for e in summary["recent_errors"]] == ["a", "b"]
    assert summary["recent_errors"][0]["count"] == 2


def test_bounded_store_keeps_errors_and_counts_drops(make_tracker) -> None:
    tracker = make_tracker(max_errors=3)
    errors = [tracker.track_error(f"error {i}", E, ErrorCategory.TRAINING_ERROR) for i in range(3)]
    for i in range(5):
        tracker.track_error(f"warning {i}", W, ErrorCategory.TRAINING_ERROR)
    kept = tracker.snapshot()
    assert [e.error_id for e in kept] == [e.error_id for e in errors]
    summary = tracker.get_error_summary()
    assert summary["dropped_errors"] == 5
    assert summary["total_errors"] == 8  # counts stay exact even for what was not kept
    assert summary["unique_errors"] == 3


def test_findings_taking_turns_in_a_small_store_are_each_new_once_and_counted(make_tracker) -> None:
    """20 warnings, 5 rounds, 2 places: the given-up ones were forgotten (4 x max_errors kept), so each
    repeat was new again: 68 new ones logged, counts of 1 on what was kept, 66 drops for 18 findings."""
    tracker = make_tracker(max_errors=2)
    new: list[bool] = []
    tracker.subscribe(lambda info, is_new: new.append(is_new))
    for _ in range(5):
        for k in range(20):
            tracker.track_error(f"finding {k}", W, ErrorCategory.DATA_ERROR)
    assert sum(new) == 20 and len(new) == 100
    assert [(e.message, e.count) for e in tracker.snapshot()] == [("finding 18", 5), ("finding 19", 5)]
    summary = tracker.get_error_summary()
    assert summary["dropped_errors"] == 18 and summary["total_errors"] == 100


def test_bounded_store_evicts_warnings_for_errors(make_tracker) -> None:
    tracker = make_tracker(max_errors=3)
    w0 = tracker.track_error("warning 0", W, ErrorCategory.TRAINING_ERROR)
    e0 = tracker.track_error("error 0", E, ErrorCategory.TRAINING_ERROR)
    w1 = tracker.track_error("warning 1", W, ErrorCategory.TRAINING_ERROR)
    e1 = tracker.track_error("error 1", E, ErrorCategory.TRAINING_ERROR)  # evicts the oldest warning
    kept = {e.error_id for e in tracker.snapshot()}
    assert kept == {e0.error_id, w1.error_id, e1.error_id}
    assert w0.error_id not in kept
    e2 = tracker.track_error("error 2", E, ErrorCategory.TRAINING_ERROR)  # evicts the other warning
    assert {e.error_id for e in tracker.snapshot()} == {e0.error_id, e1.error_id, e2.error_id}
    tracker.track_error("warning 2", W, ErrorCategory.TRAINING_ERROR)  # no room: dropped
    tracker.track_error("error 3", E, ErrorCategory.TRAINING_ERROR)  # no room either: dropped
    assert {e.error_id for e in tracker.snapshot()} == {e0.error_id, e1.error_id, e2.error_id}
    assert all(e.severity is E for e in tracker.snapshot())
    assert tracker.get_error_summary()["dropped_errors"] == 4


def test_a_full_store_of_errors_still_takes_a_critical_finding_and_coalesces_what_it_drops(make_tracker) -> None:
    tracker = make_tracker(max_errors=3)
    errors = [tracker.track_error(f"error {i}", E, ErrorCategory.TRAINING_ERROR, step=i) for i in range(3)]
    logged: list[str] = []
    tracker.logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: logged.append(r.getMessage())})())
    for step in range(5):
        tracker.track_error("NaN loss", ErrorSeverity.CRITICAL, ErrorCategory.LOSS_ERROR, step=step)
    kept = tracker.snapshot()
    assert [e.message for e in kept] == ["error 0", "error 1", "NaN loss"]  # the first errors (the cause) stay
    assert kept[-1].count == 5 and (kept[-1].first_step, kept[-1].last_step) == (0, 4)
    for step in range(5, 10):
        tracker.track_error("error 2", E, ErrorCategory.TRAINING_ERROR, step=step)  # the one it displaced
    assert errors[2].count == 6 and errors[2].last_step == 9  # repeats coalesce on the dropped entry
    assert len([m for m in logged if "error 2" in m]) == 0  # ... without a log line each
    summary = tracker.get_error_summary()
    assert summary["dropped_errors"] == 1 and summary["total_errors"] == 13


def test_no_console_and_no_file_output_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    config = DebugConfig(enable_console_output=False, enable_file_output=False)
    tracker = ErrorTracker(config)
    tracker.track_error("should be silent", E, ErrorCategory.TRAINING_ERROR)
    tracker.stop()
    out, err = capfd.readouterr()
    assert "should be silent" not in out + err


def test_log_files_rotate(tmp_path: Path) -> None:
    config = DebugConfig(max_log_size=400, backup_count=1, enable_console_output=False)
    tracker = ErrorTracker(config, log_dir=tmp_path)
    for i in range(40):
        tracker.track_error(f"finding number {i} with a message long enough to fill the log", E,
                            ErrorCategory.TRAINING_ERROR)
    tracker.stop()
    assert (tmp_path / "debug.log").is_file()
    assert (tmp_path / "debug.log.1").is_file()
    assert not (tmp_path / "debug.log.2").exists(), "backup_count=1 keeps one old file"
    assert (tmp_path / "errors.log").is_file()
    assert not (tmp_path / "errors.log.2").exists()
    text = (tmp_path / "debug.log").read_text(encoding="utf-8")
    assert "finding number 39" in text
    for name in ("debug.log", "debug.log.1"):
        assert (tmp_path / name).stat().st_size <= 400


def test_logs_go_to_log_dir_at_their_levels(tmp_path: Path) -> None:
    tracker = ErrorTracker(DebugConfig(enable_console_output=False), log_dir=tmp_path)
    tracker.track_error("just a warning", W, ErrorCategory.DATA_ERROR)
    tracker.track_error("an info", ErrorSeverity.INFO, ErrorCategory.DATA_ERROR)
    tracker.stop()
    debug = (tmp_path / "debug.log").read_text(encoding="utf-8")
    errors = (tmp_path / "errors.log").read_text(encoding="utf-8")
    assert "just a warning" in debug and "an info" in debug
    assert "just a warning" in errors and "an info" not in errors


def test_stop_is_idempotent(tmp_path: Path) -> None:
    tracker = ErrorTracker(DebugConfig(enable_console_output=False), log_dir=tmp_path)
    tracker.track_error("before stop", E, ErrorCategory.TRAINING_ERROR)
    tracker.stop()
    tracker.stop()
    info = tracker.track_error("after stop", E, ErrorCategory.TRAINING_ERROR)  # still tracked, not logged
    assert info in tracker.snapshot()
    tracker.stop()
    assert "before stop" in (tmp_path / "debug.log").read_text(encoding="utf-8")


# -- DebugConfig ----------------------------------------------------------------------------------------

def test_load_config_from_a_toml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "debug.toml"
    cfg.write_text('max_errors = 50\nrecover = "off"\ndebug_level = "basic"\nmax-log-size = 1024\n'
                   'enable_memory_tracking = false\nprogress_interval_s = 2\n', encoding="utf-8")
    config = load_config(str(cfg), tmp_path)
    assert config.max_errors == 50
    assert config.recover == "off"
    assert config.debug_level is DebugLevel.BASIC
    assert config.max_log_size == 1024
    assert config.enable_memory_tracking is False
    assert config.progress_interval_s == 2.0
    assert config.backup_count == DebugConfig().backup_count


def test_load_config_from_pyproject_and_precedence(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src" / "deep").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.tui_debug]\nmax_errors = 7\nrecover = "auto"\nbackup_count = 2\n',
        encoding="utf-8")
    config = load_config(None, project / "src" / "deep")
    assert (config.max_errors, config.recover, config.backup_count) == (7, "auto", 2)

    cfg = tmp_path / "override.toml"
    cfg.write_text("[tool.tui_debug]\nmax_errors = 9\n", encoding="utf-8")
    config = load_config(str(cfg), project / "src", {"recover": "off"})
    assert config.max_errors == 9  # the file beats pyproject
    assert config.recover == "off"  # the command line beats both
    assert config.backup_count == 2  # pyproject beats the default


@pytest.mark.parametrize("content", [
    "no_such_setting = 1\n",
    "[tool.tui_debug]\nno_such_setting = 1\n",
])
def test_unknown_key_is_a_config_error(tmp_path: Path, content: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_config(str(cfg), tmp_path)


def test_unknown_key_in_pyproject_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.tui_debug]\nmax_errorz = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max_errorz"):
        load_config(None, tmp_path)


@pytest.mark.parametrize("values, field", [
    ({"max_errors": "many"}, "max_errors"),
    ({"max_errors": 0}, "max_errors"),
    ({"recover": "sometimes"}, "recover"),
    ({"debug_level": "loud"}, "debug_level"),
    ({"enable_file_output": "yes"}, "enable_file_output"),
    ({"loss_window": 0}, "loss_window"),  # (switched its detector off with a traceback mid-run)
    ({"grad_warmup": -5}, "grad_warmup"),
    ({"loss_explosion_factor": -1.0}, "loss_explosion_factor"),  # (fired on every step)
    ({"plateau_steps": 0}, "plateau_steps"),
    ({"dead_fraction": 1.5}, "dead_fraction"),
    ({"max_overhead": float("nan")}, "max_overhead"),
    ({"max_overhead_slow": 1.0}, "max_overhead_slow"),
    ({"log_file": ""}, "log_file"),  # (IsADirectoryError from the log handler)
    ({"error_file": "logs/"}, "error_file"),
    ({"output_tail_lines": 10 ** 20}, "output_tail_lines"),  # (OverflowError from its deque)
])
def test_bad_values_are_config_errors(tmp_path: Path, values: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DebugConfig().updated(values, "test")
    with pytest.raises(ConfigError, match=field):  # made directly, as the API does: the same checks
        DebugConfig(**values)


@pytest.mark.parametrize("values", [{"max_errors": "5"}, {"debug_level": 3}, {"max_overhead": "0.1"},
                                    {"loss_window": None}, {"enable_file_output": "no"}, {"max_log_size": 1.5}])
def test_a_config_made_in_code_with_a_wrong_type_is_refused_at_once(values: dict) -> None:
    """max_errors="5" was accepted, and the first finding raised TypeError inside the tracker;
    enable_file_output="no" turned file output on."""
    with pytest.raises(ConfigError, match=next(iter(values))):
        DebugConfig(**values)


def test_numbers_and_paths_made_in_code_are_taken_as_their_fields_type() -> None:
    config = DebugConfig(max_overhead=0, log_file=Path("logs") / "run.log")
    assert config.max_overhead == 0.0 and isinstance(config.max_overhead, float)
    assert config.log_file == os.path.join("logs", "run.log")


def test_cli_config_with_unknown_key_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("max_errors = 5\nno_such_setting = true\n", encoding="utf-8")
    script = tmp_path / "script.py"
    script.write_text("print('the script ran')\n", encoding="utf-8")
    proc = run_td("--config", cfg, "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    lines = nonempty_lines(proc.stderr)
    assert len(lines) == 1, describe(proc)
    assert lines[0].startswith("tui_debug: error:")
    assert "no_such_setting" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_a_bad_value_in_pyproject_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.tui_debug]\nloss_window = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"pyproject\.toml: loss_window must be"):
        load_config(None, tmp_path)


@pytest.mark.parametrize("case", ["not_toml", "not_utf8"])
def test_a_pyproject_that_cannot_be_read_is_said_and_skipped(tmp_path: Path, case: str) -> None:
    """The project's own file, which plain Python never reads: a warning, and the run goes on."""
    project = tmp_path / "project"
    project.mkdir()
    content = b"[project\nname = 1\n" if case == "not_toml" else b"[project]\nname = '\xe9t\xe9'\n"
    (project / "pyproject.toml").write_bytes(content)
    script = project / "script.py"
    script.write_text("print('the script ran')\n", encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "the script ran\n"
    warning = [line for line in nonempty_lines(proc.stderr) if "warning" in line]
    assert len(warning) == 1 and "pyproject.toml" in warning[0] and "not applied" in warning[0], describe(proc)
    assert "Traceback" not in proc.stderr


def test_a_config_file_that_is_not_utf8_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_bytes(b"max_errors = 5 # \xff\xfe\n")
    script = tmp_path / "script.py"
    script.write_text("print('the script ran')\n", encoding="utf-8")
    proc = run_td("--config", cfg, "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    lines = nonempty_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("tui_debug: error:") and "UTF-8" in lines[0], describe(proc)
    assert proc.stdout == ""


def test_an_infinite_threshold_turns_its_detector_off_and_the_report_is_still_written(tmp_path: Path) -> None:
    cfg = tmp_path / "td.toml"
    cfg.write_text("loss_explosion_factor = inf\nprogress_interval_s = inf\n", encoding="utf-8")
    script = tmp_path / "script.py"
    script.write_text("print('ran')\n", encoding="utf-8")
    proc = run_td("--config", cfg, "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    config = load_report(tmp_path / "run")["config"]
    assert config["loss_explosion_factor"] == "inf" and config["progress_interval_s"] == "inf"


@pytest.mark.parametrize("case", ["missing", "not_toml", "bad_value", "pyproject"])
def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    script = project / "script.py"
    script.write_text("print('the script ran')\n", encoding="utf-8")
    options: list = []
    if case == "missing":
        options = ["--config", tmp_path / "nowhere.toml"]
    elif case == "not_toml":
        (tmp_path / "bad.toml").write_text("max_errors = = 3\n", encoding="utf-8")
        options = ["--config", tmp_path / "bad.toml"]
    elif case == "bad_value":
        (tmp_path / "bad.toml").write_text('max_errors = "lots"\n', encoding="utf-8")
        options = ["--config", tmp_path / "bad.toml"]
    else:  # the nearest pyproject.toml above the script has a bad [tool.tui_debug]
        (project / "pyproject.toml").write_text("[tool.tui_debug]\nno_such_setting = 1\n", encoding="utf-8")
    proc = run_td(*options, "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    lines = nonempty_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("tui_debug: error:"), describe(proc)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_config_file_is_applied(tmp_path: Path) -> None:
    cfg = tmp_path / "good.toml"
    cfg.write_text('max_errors = 5\nrecover = "off"\n', encoding="utf-8")
    script = tmp_path / "script.py"
    script.write_text("print('ran')\n", encoding="utf-8")
    proc = run_td("--config", cfg, "--debug-level", "basic", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    from helpers import load_report

    config = load_report(tmp_path / "run")["config"]
    assert config["max_errors"] == 5
    assert config["recover"] == "off"
    assert config["debug_level"] == "basic"


def test_a_new_tracker_never_logs_through_a_dropped_trackers_handlers(tmp_path: Path) -> None:
    """A tracker dropped without stop() keeps its log handlers on its logger; a later tracker (which
    may get the same memory address) must log through its own handlers only, never into the first
    one's files."""
    import gc

    config = DebugConfig(enable_console_output=False)
    for i in range(20):
        ErrorTracker(config, log_dir=tmp_path / f"dropped{i}")  # never stopped
    gc.collect()
    for i in range(20):
        t = ErrorTracker(config, log_dir=tmp_path / f"later{i}")
        try:
            assert len(t.logger.handlers) == 1, "a dropped tracker's handlers are attached too"
        finally:
            t.stop()


def test_two_trackers_on_one_log_file_rotate_it_together(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The API's DebuggingInterface and Debugger each make a tracker on ./debug.log: two handlers renamed
    the file under each other at rotation (FileNotFoundError tracebacks on stderr, lines lost)."""
    config = DebugConfig(enable_console_output=False, max_log_size=2000, backup_count=2,
                         log_file=str(tmp_path / "debug.log"), error_file=str(tmp_path / "errors.log"))
    first, second = ErrorTracker(config), ErrorTracker(config)
    for i in range(300):
        (first if i % 2 else second).track_error(f"finding {i} " + "x" * 50, E, ErrorCategory.DATA_ERROR)
    first.stop()
    second.track_error("after the first stopped", E, ErrorCategory.DATA_ERROR)
    second.stop()
    assert "Logging error" not in capfd.readouterr().err
    files = sorted(p.name for p in tmp_path.glob("debug.log*"))
    assert files == ["debug.log", "debug.log.1", "debug.log.2"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    assert "after the first stopped" in (tmp_path / "debug.log").read_text(encoding="utf-8")


def test_backup_count_0_keeps_the_log_within_its_size(tmp_path: Path) -> None:
    """Python's rotating handler never rolls over without a backup: the file grew without bound."""
    config = DebugConfig(enable_console_output=False, max_log_size=2000, backup_count=0,
                         log_file=str(tmp_path / "debug.log"), error_file=str(tmp_path / "errors.log"))
    tracker = ErrorTracker(config)
    for i in range(300):
        tracker.track_error(f"finding {i} " + "x" * 50, E, ErrorCategory.DATA_ERROR)
    tracker.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debug.log", "errors.log"]
    assert 0 < (tmp_path / "debug.log").stat().st_size <= 2000


@pytest.mark.parametrize("content, says", [
    ('[build-system]\nrequires = ["setuptools"]\n[tool.black]\nline-length = 100\n', "no [tool.tui_debug]"),
    ('recover = "auto"\n[tool.tui_debug]\nrecover = "off"\n', "put the settings in one place"),
])
def test_a_config_file_shaped_like_a_pyproject_is_read_from_its_tool_table_only(
        tmp_path: Path, content: str, says: str) -> None:
    """--config pyproject.toml without [tool.tui_debug] said "unknown setting 'build_system'" (a key the
    file does not have); top-level keys beside the table were silently ignored."""
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(str(cfg), tmp_path / "elsewhere")
