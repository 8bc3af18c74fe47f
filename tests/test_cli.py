"""End to end: ``python -m tui_debug [OPTIONS] SCRIPT ARGS`` behaves like ``python SCRIPT ARGS``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import (PACKAGE_DIR, RUN_TIMEOUT, SCRIPTS, describe, load_report, nonempty_lines, run_td,
                     script_stderr, td_cmd, td_env)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """Bad input: exit 2, exactly one line on stderr, ``tui_debug: error: ...``, no traceback."""
    assert proc.returncode == 2, describe(proc)
    lines = nonempty_lines(proc.stderr)
    assert len(lines) == 1, describe(proc)
    assert lines[0].startswith("tui_debug: error:"), describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    return lines[0]


# -- exit status ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, code, status", [
    ("print('done')\n", 0, "finished"),
    ("import sys\nsys.exit()\n", 0, "finished"),
    ("import sys\nsys.exit(0)\n", 0, "finished"),
    ("import sys\nsys.exit(3)\n", 3, "exited"),
])
def test_exit_status_is_the_scripts(tmp_path: Path, source: str, code: int, status: str) -> None:
    script = write(tmp_path / "script.py", source)
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == code, describe(proc)
    report = load_report(tmp_path / "run")
    assert report["run"]["exit_code"] == code
    assert report["run"]["status"] == status


def test_sys_exit_with_a_message_exits_1_and_prints_it(tmp_path: Path) -> None:
    script = write(tmp_path / "script.py", "import sys\nsys.exit('bye')\n")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert "bye" in script_stderr(proc.stderr), describe(proc)
    assert proc.stdout == ""
    assert load_report(tmp_path / "run")["run"]["exit_code"] == 1


def _traceback_block(stderr: str) -> list[str]:
    lines = script_stderr(stderr)
    assert lines, stderr
    assert lines[0] == "Traceback (most recent call last):", stderr
    return lines


def test_uncaught_exception_prints_pythons_traceback_without_our_frames(tmp_path: Path) -> None:
    script = write(tmp_path / "script.py", """\
        def inner():
            raise ValueError("boom")


        def outer():
            inner()


        outer()
    """)
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    lines = _traceback_block(proc.stderr)
    assert lines[-1] == "ValueError: boom", describe(proc)
    assert f'File "{script}", line 9, in <module>' in proc.stderr
    assert f'File "{script}", line 2, in inner' in proc.stderr
    assert str(PACKAGE_DIR) not in "\n".join(lines), describe(proc)
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "crashed"
    assert report["run"]["exit_code"] == 1
    tracebacks = [e["traceback"] for e in report["errors"] if e["traceback"]]
    assert tracebacks, report["errors"]
    assert all(str(PACKAGE_DIR) not in tb for tb in tracebacks), tracebacks


def test_traceback_through_backward_has_no_frame_of_ours(tmp_path: Path) -> None:
    """loss.backward() goes through the instrumentation's patch; the traceback must not show it."""
    script = SCRIPTS / "backward_error.py"
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    lines = _traceback_block(proc.stderr)
    assert lines[-1].startswith("RuntimeError: Trying to backward through the graph a second time"), describe(proc)
    assert f'File "{script}", line 10, in train_step' in proc.stderr
    assert str(PACKAGE_DIR) not in "\n".join(lines), describe(proc)
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "crashed"
    assert all(str(PACKAGE_DIR) not in (e["traceback"] or "") for e in report["errors"])


# -- bad input ----------------------------------------------------------------------------------------

def test_missing_script_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_td("--out", tmp_path / "run", "no_such_script.py", cwd=tmp_path)
    line = assert_one_error_line(proc)
    assert "no_such_script.py" in line
    assert proc.stdout == ""


@pytest.mark.parametrize("options", [
    ["--recover", "bogus"],
    ["--debug-level", "loud"],
    ["--no-such-option"],
])
def test_bad_option_is_one_line_and_exit_2(tmp_path: Path, options: list[str]) -> None:
    script = write(tmp_path / "script.py", "print('the script ran')\n")
    proc = run_td("--out", tmp_path / "run", *options, script, cwd=tmp_path)
    assert_one_error_line(proc)
    assert proc.stdout == "", "the script must not run when the command line is bad"


@pytest.mark.parametrize("argv", [[], ["--headless"], ["--out"], ["-m"]], ids=["nothing", "no-script", "no-value", "no-module"])
def test_missing_script_or_value_is_one_line_and_exit_2(tmp_path: Path, argv: list[str]) -> None:
    proc = run_td(*argv, cwd=tmp_path)
    assert_one_error_line(proc)
    assert proc.stdout == ""


def test_missing_module_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_td("--out", tmp_path / "run", "-m", "no_such_module_xyz", cwd=tmp_path)
    line = assert_one_error_line(proc)
    assert "no_such_module_xyz" in line


def test_syntax_error_in_script_exits_1(tmp_path: Path) -> None:
    script = write(tmp_path / "broken.py", "print('fine')\ndef f(:\n    pass\n")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert "SyntaxError" in proc.stderr, describe(proc)
    assert "broken.py" in proc.stderr
    assert "fine" not in proc.stdout
    assert str(PACKAGE_DIR) not in proc.stderr, describe(proc)


# -- what the script sees ---------------------------------------------------------------------------

SEMANTICS = """\
    import json
    import os
    import sys
    import threading

    import sibling_helper

    print("SEM" + json.dumps({
        "name": __name__,
        "file": __file__,
        "argv": sys.argv,
        "path0": sys.path[0],
        "sibling": sibling_helper.VALUE,
        "thread": threading.Thread(target=print).name,  # (numbered from 1, as no thread of ours is unnamed)
    }), flush=True)
"""


def _semantics(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.startswith("SEM")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][3:])


def test_script_semantics_match_python(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write(real / "train.py", SEMANTICS)
    write(real / "sibling_helper.py", "VALUE = 42\n")
    (tmp_path / "link").mkdir()
    os.symlink(real / "train.py", tmp_path / "link" / "train.py")
    args = ["--out", "x", "--headless", "--recover", "bogus", "-m", "mod", "-v"]
    proc = run_td("--out", tmp_path / "run", "link/train.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    sem = _semantics(proc.stdout)
    assert sem["name"] == "__main__"
    assert os.path.isabs(sem["file"])
    assert sem["file"] == os.path.join(os.path.realpath(tmp_path), "link", "train.py")
    assert sem["argv"] == ["link/train.py", *args]
    assert sem["path0"] == os.path.realpath(real)
    assert sem["sibling"] == 42
    assert sem["thread"] == "Thread-1 (print)"
    assert not (tmp_path / "x").exists(), "the script's --out must not be taken as ours"


def test_main_builtins_is_the_builtins_module(tmp_path: Path) -> None:
    """In ``python script.py``, ``__main__.__builtins__`` is the builtins module, not its dict."""
    script = write(tmp_path / "script.py", """\
        import builtins
        print("builtins is module:", __builtins__ is builtins, flush=True)
        print(__builtins__.len("abc"), flush=True)
    """)
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "builtins is module: True\n3\n", describe(proc)


MODULE_SOURCE = """\
    import json
    import sys

    print("MOD" + json.dumps({"name": __name__, "spec": __spec__.name, "argv": sys.argv}), flush=True)

    if __name__ == "__main__":
        sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
"""


@pytest.mark.parametrize("where", ["cwd", "pythonpath"])
def test_module_mode_runs_the_module_with_its_args(tmp_path: Path, where: str) -> None:
    moddir = tmp_path / "mods"
    mod = write(moddir / "mytrainer.py", MODULE_SOURCE)
    workdir = tmp_path / "work"
    workdir.mkdir()
    cwd, extra = (moddir, ()) if where == "cwd" else (workdir, (moddir,))
    proc = run_td("--out", tmp_path / "run", "-m", "mytrainer", "7", "--out", "y", "--headless",
                  cwd=cwd, extra_path=extra)
    assert proc.returncode == 7, describe(proc)
    line = [l for l in proc.stdout.splitlines() if l.startswith("MOD")]
    assert len(line) == 1, describe(proc)
    seen = json.loads(line[0][3:])
    assert seen["name"] == "__main__"
    assert seen["spec"] == "mytrainer"
    assert seen["argv"] == [str(mod), "7", "--out", "y", "--headless"]
    assert load_report(tmp_path / "run")["run"]["exit_code"] == 7


def test_pickle_and_spawn_dataloader_over_classes_defined_in_the_script(tmp_path: Path) -> None:
    proc = run_td("--out", tmp_path / "run", SCRIPTS / "spawn_pickle.py", cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, describe(proc)
    assert "pickled __main__.Point x=5" in proc.stdout, describe(proc)
    assert "total 140" in proc.stdout, describe(proc)
    assert load_report(tmp_path / "run")["run"]["status"] == "finished"


PROFILER_SCRIPT = """
import torch, torch.nn as nn
from torch.profiler import profile, ProfilerActivity
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with profile(activities=[ProfilerActivity.CPU], with_stack=True, with_modules=True) as prof:
    for _ in range(4):
        opt.zero_grad(); model(torch.randn(4, 8)).pow(2).mean().backward(); opt.step()
print("PROFILED", sum(1 for e in prof.events() if e.name == "aten::addmm") > 0)
"""


def test_torch_profiler_with_python_stacks_runs_under_the_monitor(tmp_path: Path) -> None:
    """torch.profiler(with_stack=True) takes the module-call wrapper for Module.__call__ and reads its
    frame's ``self``: a wrapper naming it otherwise killed the run with SIGSEGV. And the module torch
    imports in its first record_function is imported before: its freed code gave garbage event names."""
    write(tmp_path / "train.py", PROFILER_SCRIPT)
    proc = run_td("--headless", "--out", tmp_path / "run", "train.py", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "PROFILED True" in proc.stdout, describe(proc)
    report = load_report(tmp_path / "run")
    assert report["summary"]["steps"] == 4 and report["summary"]["total_errors"] == 0


RANKED_SCRIPT = """
import torch
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
"""


def test_ranks_of_one_launch_get_their_own_run_folders_and_say_which_rank_speaks(tmp_path: Path) -> None:
    """torchrun starts every rank in the same second with the same script: each default run folder is
    made atomically (never shared) and named by its rank, and each rank's lines on the shared
    terminal say whose they are."""
    write(tmp_path / "train.py", RANKED_SCRIPT)
    procs = []
    for rank in (0, 1):
        env = td_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(td_cmd("train.py"), cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=RUN_TIMEOUT) for p in procs]
    for rank, (proc, (_, err)) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, err
        ours = [line for line in err.splitlines() if line.startswith("tui_debug")]
        assert ours and all(line.startswith(f"tui_debug[rank {rank}]: ") for line in ours), err
    # (by rank: the two ranks' time stamps may fall either side of a second)
    folders = sorted((p.name for p in (tmp_path / "tui_debug_runs").iterdir()), key=lambda n: n.rsplit("-", 1)[-1])
    assert len(folders) == 2 and folders[0].endswith("-train-rank0") and folders[1].endswith("-train-rank1")
    for folder in folders:
        assert load_report(tmp_path / "tui_debug_runs" / folder)["summary"]["steps"] == 3


def test_one_out_folder_for_a_launch_gets_a_folder_per_rank(tmp_path: Path) -> None:
    """torchrun ... -m tui_debug --out runs/x: every rank wrote runs/x/report.json, the last one's over
    the others'."""
    write(tmp_path / "train.py", RANKED_SCRIPT)
    procs = []
    for rank in (0, 1):
        env = td_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(td_cmd("--out", "runs/x", "--report", "reports/r.json", "train.py"),
                                      cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, err
    assert sorted(p.name for p in (tmp_path / "runs" / "x").iterdir()) == ["rank0", "rank1"]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["r.rank0.json", "r.rank1.json"]


DDP_SCRIPT = """
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
torch.manual_seed(rank)
for step in range(80):
    if step == 5 and rank == 0:
        from tui_debug import monitor
        monitor.ACTIVE_MONITOR.request("lower_lr")  # as the UI's key does, on rank 0 only
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    if step == 40 and rank == 1:
        x[0, 0] = float("inf")  # one rank's bad batch: DDP averages its NaN gradients into every rank's
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
print("PARAMS", repr(sum(p.detach().double().sum().item() for p in model.parameters())),
      "LR", opt.param_groups[0]["lr"], flush=True)
dist.destroy_process_group()
"""


def test_ranks_of_a_ddp_run_never_recover_alone_and_stay_replicas(tmp_path: Path) -> None:
    """Each rank's monitor decides alone (its own sampled steps, the UI on rank 0). A step skipped,
    or a learning rate lowered, on one rank only left the replicas different: under torchrun, rank 1
    skipped its NaN step and kept finite parameters while rank 0 applied it. Such changes are now
    reported as not applied, and the ranks end with the same parameters, as without the monitor."""
    import socket

    write(tmp_path / "train.py", DDP_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = td_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(td_cmd("--out", "runs", "train.py"), cwd=tmp_path, env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=RUN_TIMEOUT) for p in procs]
    ends = []
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        ends.append([line for line in out.splitlines() if line.startswith("PARAMS")])
    assert ends[0] and ends[0] == ends[1], ends  # the same parameters (NaN on both, as plain DDP leaves them)
    assert ends[0][0].endswith("LR 0.01"), ends
    rank0 = load_report(tmp_path / "runs" / "rank0")
    rank1 = load_report(tmp_path / "runs" / "rank1")
    [lowered] = [a for a in rank0["actions"] if a["action"] == "lower_lr"]
    assert not lowered["ok"] and "torch.distributed" in lowered["message"], lowered
    grads = [e for e in rank1["errors"] if e["category"] == "gradient_error"]
    assert grads and grads[0]["step"] == 41, rank1["errors"]
    assert grads[0]["recovery_action"].startswith("step not skipped: one of 2 processes"), grads[0]


def test_a_default_run_folder_is_never_one_that_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tui_debug import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20260101-000000")
    made = [cli.default_run_dir("train.py") for _ in range(3)]
    assert made == [os.path.join("tui_debug_runs", name) for name in
                    ("20260101-000000-train", "20260101-000000-train-2", "20260101-000000-train-3")]
    assert all(os.path.isdir(path) for path in made)


# -- output -------------------------------------------------------------------------------------------

def test_output_passes_through_unchanged_and_is_captured(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    raw = subprocess.run(td_cmd("--out", run_dir, SCRIPTS / "passthrough.py"), cwd=tmp_path, env=td_env(),
                         capture_output=True, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
    # Bytes, decoded without newline translation (a text-mode pipe would turn "\r" into "\n").
    proc = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode("utf-8"),
                                       raw.stderr.decode("utf-8"))
    assert proc.returncode == 0, describe(proc)
    expected_stdout = "".join(f"bulk {i}\n" for i in range(150)) + (
        "line one\n"
        "unicode: h\u00e9llo \u2713 \u65e5\u672c\n"
        "progress 10%\rprogress 100%\n"
        "raw fd1 line\n"
        "no newline at end"
    )
    assert proc.stdout == expected_stdout, "stdout must pass through byte for byte"
    assert script_stderr(proc.stderr) == ["to stderr", "raw fd2 line"], describe(proc)
    assert "tui_debug:" not in proc.stdout, "the monitor's lines go to stderr only"

    # output.log merges the two streams as their chunks arrive: it must be an interleaving of
    # exactly the script's stdout and stderr bytes (nothing lost, nothing added, each in order).
    log = (run_dir / "output.log").read_bytes()
    assert b"tui_debug:" not in log
    assert is_interleaving(log, raw.stdout, b"to stderr\nraw fd2 line\n"), log[-400:]

    # The report keeps the last 200 lines; the script writes fewer, so every line must be there
    # (stdout and stderr are read independently, so only per-stream order is defined).
    tail = load_report(run_dir)["output_tail"]
    assert [t["text"] for t in tail if t["text"].startswith("bulk ")] == [f"bulk {i}" for i in range(150)]
    assert {"stream": "stdout", "text": "line one"} in tail
    assert {"stream": "stdout", "text": "unicode: h\u00e9llo \u2713 \u65e5\u672c"} in tail
    assert {"stream": "stdout", "text": "progress 100%"} in tail
    assert {"stream": "stdout", "text": "raw fd1 line"} in tail
    assert {"stream": "stderr", "text": "to stderr"} in tail
    assert {"stream": "stderr", "text": "raw fd2 line"} in tail
    assert {"stream": "stdout", "text": "no newline at end"} in tail
    assert {"stream": "stdout", "text": "bulk 149"} in tail


def is_interleaving(merged: bytes, a: bytes, b: bytes) -> bool:
    """Whether ``merged`` is ``a`` and ``b`` shuffled together, each keeping its order (``b`` short)."""
    if len(merged) != len(a) + len(b):
        return False
    # reachable[j]: merged[:i + j] can be a[:i] interleaved with b[:j], for the current i.
    reachable = [True] * (len(b) + 1)
    for j in range(1, len(b) + 1):
        reachable[j] = reachable[j - 1] and merged[j - 1] == b[j - 1]
    for i in range(1, len(a) + 1):
        reachable[0] = reachable[0] and merged[i - 1] == a[i - 1]
        for j in range(1, len(b) + 1):
            k = i + j - 1
            reachable[j] = (reachable[j] and merged[k] == a[i - 1]) or (reachable[j - 1] and merged[k] == b[j - 1])
        if not any(reachable):
            return False
    return reachable[len(b)]


# -- signals ------------------------------------------------------------------------------------------

def test_script_can_install_a_signal_handler(tmp_path: Path) -> None:
    proc = run_td("--out", tmp_path / "run", SCRIPTS / "signal_usr1.py", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == (
        "previous handler is SIG_DFL: True\n"
        "getsignal returns the handler: True\n"
        f"handler ran for signal {int(signal.SIGUSR1)}\n"
        "after handler\n"
    ), describe(proc)


def _start_until_ready(tmp_path: Path, *script_args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(td_cmd("--out", tmp_path / "run", SCRIPTS / "loop_forever.py", *script_args),
                            cwd=tmp_path,
                            env=td_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "READY":
            return proc
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    pytest.fail(f"the script ended before READY (exit {proc.returncode}):\n{out}\n{err}")


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run did not end after the signal:\n{out}\n{err}")


def test_sigint_interrupts_the_script_and_dies_by_sigint(tmp_path: Path) -> None:
    """As plain Python after an uncaught KeyboardInterrupt: killed by SIGINT (130 in a shell, whose
    loops stop there; an exit status of 130 would let a sweep run on), after the report is written."""
    proc = _start_until_ready(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = _finish(proc)
    assert proc.returncode == -signal.SIGINT, err
    assert str(PACKAGE_DIR) not in err, "the KeyboardInterrupt traceback must not show tui_debug's frames"
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "interrupted"
    assert report["run"]["exit_code"] == 130
    assert report["summary"]["steps"] >= 3


def test_sigterm_writes_the_report_and_dies_by_sigterm(tmp_path: Path) -> None:
    proc = _start_until_ready(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = _finish(proc)
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), err
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "interrupted"
    assert report["run"]["exit_code"] == 128 + signal.SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_report_after_a_signal_has_every_step_done_before_it(tmp_path: Path, sig: int) -> None:
    """The script does 3 steps, prints READY and idles: the report must count those 3 steps."""
    proc = _start_until_ready(tmp_path, "--idle")
    proc.send_signal(sig)
    _, err = _finish(proc)
    assert proc.returncode in (130, -sig, 128 + sig), err
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "interrupted"
    assert report["summary"]["steps"] == 3, err
    assert report["losses"]["loss"]["count"] == 3
    assert report["gradients"]["model.weight"]["count"] == 3


def test_a_monitor_line_waits_for_a_line_the_script_is_finishing(tmp_path: Path) -> None:
    """Python prints a traceback's last line in two writes ("RuntimeError: ", then the message); a
    finding due at that moment waits for the line to end instead of splitting it."""
    program = textwrap.dedent("""
        import os, threading
        from tui_debug import capture

        capture.MIDLINE_WAIT_S = 60  # the line does end while it waits, however slow the machine
        cap = capture.OutputCapture()
        cap.start()
        os.write(2, b"RuntimeError: ")
        while not any("RuntimeError: " in text for _, text in cap.tail.tail()):  # passed through
            pass
        waiting = threading.Event()
        wait_for = cap._term_cond.wait_for

        def waiting_for(predicate, timeout):
            waiting.set()
            return wait_for(predicate, timeout)

        cap._term_cond.wait_for = waiting_for
        writer = threading.Thread(target=lambda: (waiting.wait(), os.write(2, b"the message\\n")))
        writer.start()
        cap.write_monitor("tui_debug: ERROR a finding\\n")
        writer.join()
        cap.stop()
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL, env=td_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode() == "RuntimeError: the message\ntui_debug: ERROR a finding\n"


def test_a_monitor_line_never_lands_in_the_middle_of_the_scripts_line(tmp_path: Path) -> None:
    """The script's stderr is mid-line (a traceback flushed in two pieces, a tqdm bar) when the monitor
    writes a finding: the finding starts on a line of its own, and the script's bytes are unchanged."""
    program = textwrap.dedent("""
        import os, sys
        from tui_debug.capture import OutputCapture

        cap = OutputCapture()
        cap.start()
        os.write(2, b"RuntimeError: half a line")
        while not any("half a line" in text for _, text in cap.tail.tail()):  # passed through
            pass
        cap.write_monitor("tui_debug: ERROR a finding\\n")
        os.write(2, b" and the rest\\n")
        cap.stop()
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL, env=td_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode() == "RuntimeError: half a line\ntui_debug: ERROR a finding\n and the rest\n"


SEGFAULT_SCRIPT = """
import ctypes
def crash():
    ctypes.string_at(0)  # reads address 0: SIGSEGV in C code
crash()
"""


def test_a_native_crash_prints_the_crashing_threads_python_stack_and_dies_by_its_signal(tmp_path: Path) -> None:
    """A segfault in C code kills the process, the reader threads of the script's fd 2 with it:
    faulthandler writes the training thread's stack to the real stderr, and the exit is the signal's."""
    write(tmp_path / "train.py", SEGFAULT_SCRIPT)
    proc = run_td("--headless", "--out", tmp_path / "run", "train.py", cwd=tmp_path)
    assert proc.returncode == -signal.SIGSEGV, describe(proc)
    assert "Fatal Python error: Segmentation fault" in proc.stderr, describe(proc)
    assert f'File "{tmp_path / "train.py"}", line 4 in crash' in proc.stderr, describe(proc)


def test_the_capture_gives_faulthandler_back_as_it_found_it() -> None:
    program = textwrap.dedent("""
        import faulthandler
        from tui_debug.capture import OutputCapture

        for before in (False, True):
            faulthandler.enable() if before else faulthandler.disable()
            cap = OutputCapture()
            cap.start()
            during = faulthandler.is_enabled()
            cap.stop()
            print(before, during, faulthandler.is_enabled())
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL, env=td_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split("\n")[:2] == ["False True False", "True True True"]


GC_SCRIPT = """
import gc, weakref
import torch

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made by the script after importing torch
ref = weakref.ref(a)
del a, b
gc.collect()
print("FROZEN", gc.get_freeze_count(), "CYCLE_COLLECTED", ref() is None)
"""


@pytest.mark.parametrize("freeze", [True, False])
def test_torchs_import_is_taken_out_of_later_gc_passes_and_the_scripts_cycles_still_collected(
        tmp_path: Path, freeze: bool) -> None:
    """After the import a full collection would traverse ~300K objects of torch's (~100 ms, the GIL
    held, early in training); frozen they never are again. What the script makes after is not frozen."""
    write(tmp_path / "train.py", GC_SCRIPT)
    write(tmp_path / "td.toml", f"freeze_gc_at_import = {str(freeze).lower()}\n")
    proc = run_td("--headless", "--out", tmp_path / "run", "--config", tmp_path / "td.toml", "train.py", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    words = proc.stdout.split()
    frozen = int(words[words.index("FROZEN") + 1])
    # what the interpreter holds frozen on its own before any code runs (0 on 3.11, a few hundred on 3.12)
    start = subprocess.run([sys.executable, "-c", "import gc; print(gc.get_freeze_count())"],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True)
    own = int(start.stdout)
    assert (frozen > own + 50_000) if freeze else frozen == own, (frozen, own)
    assert words[words.index("CYCLE_COLLECTED") + 1] == "True"


def test_output_piped_into_a_reader_that_stops_ends_the_script_as_python_would(tmp_path: Path) -> None:
    """`python -m tui_debug train.py | head -2`: the script's next print fails with BrokenPipeError
    (as under plain Python) instead of blocking forever on a pipe nobody drains."""
    from helpers import td_cmd, td_env

    script = tmp_path / "many.py"
    script.write_text('for i in range(10**6):\n    print("line", i)\n', encoding="utf-8")
    proc = subprocess.Popen(td_cmd("--headless", "--out", tmp_path / "run", script), cwd=tmp_path,
                            env=td_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    try:
        stderr = proc.stderr.read().decode("utf-8", "replace")
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 1, stderr
    assert "BrokenPipeError" in stderr and "Exception in thread" not in stderr, stderr
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "crashed" and "BrokenPipeError" in report["errors"][0]["message"]


def test_os_exit_ends_the_run_at_once_with_its_status_and_the_report_written(tmp_path: Path) -> None:
    script = tmp_path / "osx.py"
    script.write_text(textwrap.dedent("""\
        import atexit, os
        atexit.register(lambda: print("atexit ran"))
        print("bye", flush=True)
        try:
            os._exit(3)
        finally:
            print("finally ran")
        """), encoding="utf-8")
    proc = run_td("--headless", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 3, describe(proc)
    assert proc.stdout == "bye\n", describe(proc)  # no cleanup of the script's ran, as with plain Python
    report = load_report(tmp_path / "run")
    assert (report["run"]["status"], report["run"]["exit_code"]) == ("exited", 3)
    assert (tmp_path / "run" / "output.log").read_text(encoding="utf-8") == "bye\n"


def test_the_run_waits_for_the_scripts_own_threads_as_python_does(tmp_path: Path) -> None:
    """A checkpoint saved in a background thread after the script's last line: Python waits for
    non-daemon threads at exit (and a thread the main thread starts is one by default)."""
    script = tmp_path / "bg.py"
    script.write_text(textwrap.dedent("""\
        import threading, time
        print("daemon:", threading.current_thread().daemon, flush=True)
        def save():
            time.sleep(0.5)
            open("ckpt.txt", "w").write("saved")
            print("saved", flush=True)
        threading.Thread(target=save).start()
        """), encoding="utf-8")
    proc = run_td("--headless", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "daemon: False\nsaved\n", describe(proc)
    assert (tmp_path / "ckpt.txt").read_text() == "saved"


def test_a_signal_ignored_at_launch_stays_ignored(tmp_path: Path) -> None:
    """`nohup python -m tui_debug train.py &`: SIGHUP was ignored by whoever started us, so logging out
    must not end the run (as under plain Python), until the script installs a handler of its own."""
    from helpers import td_cmd, td_env

    script = tmp_path / "hup.py"
    script.write_text(textwrap.dedent("""\
        import os, signal, threading, time
        print("ignored:", signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.3)  # (time for a SIGHUP that was not ignored to end the run)
        handled = threading.Event()
        signal.signal(signal.SIGHUP, lambda *a: (print("handled", flush=True), handled.set()))
        os.kill(os.getpid(), signal.SIGHUP)
        handled.wait(60)
        print("survived", flush=True)
        """), encoding="utf-8")
    proc = subprocess.run(td_cmd("--headless", "--out", tmp_path / "run", script), cwd=tmp_path, env=td_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "ignored: True\nhandled\nsurvived\n", describe(proc)


def test_a_report_path_that_cannot_be_written_is_exit_2_before_the_script_runs(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text('print("ran")\n', encoding="utf-8")
    proc = run_td("--headless", "--out", tmp_path / "run", "--report", "/proc/tui_debug_report.json", script,
                  cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    assert proc.stdout == "" and nonempty_lines(proc.stderr) == [
        "tui_debug: error: cannot write --report '/proc/tui_debug_report.json': No such file or directory"], \
        describe(proc)


def test_the_run_folder_holds_its_log_files_from_the_start(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text('print("quiet run")\n', encoding="utf-8")
    proc = run_td("--headless", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"report.json", "debug.log", "errors.log", "output.log"}


def test_an_asyncio_signal_handler_in_the_script_works(tmp_path: Path) -> None:
    """asyncio's loop.add_signal_handler sets a wakeup fd, which Python allows in the main thread only:
    the script's thread gets it through the relay (under plain Python this works; it raised here)."""
    script = tmp_path / "aio.py"
    script.write_text(textwrap.dedent("""\
        import asyncio, os, signal
        async def main():
            loop = asyncio.get_running_loop()
            got = loop.create_future()
            loop.add_signal_handler(signal.SIGUSR2, got.set_result, "handled")
            os.kill(os.getpid(), signal.SIGUSR2)
            print(await asyncio.wait_for(got, 10), flush=True)
            loop.remove_signal_handler(signal.SIGUSR2)
        asyncio.run(main())
        """), encoding="utf-8")
    proc = run_td("--headless", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "handled\n", describe(proc)


def test_a_ctrl_c_the_blocked_script_has_not_acted_on_is_explained(tmp_path: Path) -> None:
    """Python hands a Ctrl+C to the script's thread at its next bytecode: a script in time.sleep does
    not see it yet. The user is told why, and that two more stop it at once (report written)."""
    from helpers import td_cmd, td_env

    script = tmp_path / "sleepy.py"
    script.write_text('import time\nprint("sleeping", flush=True)\ntime.sleep(300)\n', encoding="utf-8")
    proc = subprocess.Popen(td_cmd("--headless", "--out", tmp_path / "run", script), cwd=tmp_path, env=td_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "sleeping\n"
        proc.send_signal(signal.SIGINT)
        lines = []
        while not any("busy outside Python code" in line for line in lines):
            line = proc.stderr.readline()
            assert line, lines
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        while "press Ctrl+C once more" not in lines[-1]:
            lines.append(proc.stderr.readline())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == -signal.SIGINT
    finally:
        proc.kill()
    assert load_report(tmp_path / "run")["run"]["status"] == "interrupted"


def test_an_optimizer_that_cannot_be_snapshotted_leaves_the_monitor_on(tmp_path: Path) -> None:
    """ZeroRedundancyOptimizer refuses state_dict() until consolidated: the first snapshot raised and
    switched the whole monitor off. Now snapshots stop, with a warning, and the NaN step is still skipped."""
    script = tmp_path / "nosnap.py"
    script.write_text(textwrap.dedent("""\
        import torch, torch.nn as nn
        class Sharded(torch.optim.SGD):
            def state_dict(self):
                raise RuntimeError("Optimizer state has not been consolidated on this rank")
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = Sharded(model.parameters(), lr=0.1)
        for i in range(300):
            x = torch.randn(8, 4)
            if i == 150:
                x[0, 0] = float("nan")
            opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
        print("finite", bool(model.weight.isfinite().all()))
        """), encoding="utf-8")
    proc = run_td("--headless", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "finite True\n", describe(proc)
    report = load_report(tmp_path / "run")
    keys = {e["category"]: e["message"] for e in report["errors"]}
    assert keys["system_error"].startswith("last-good snapshots are off: taking one raised RuntimeError")
    assert "gradient_error" in keys and "switched off" not in proc.stderr, describe(proc)


def test_a_new_folds_model_can_be_rolled_back_before_its_200th_step(tmp_path: Path) -> None:
    """Snapshots came every 200 steps: a second fold's model had none until then, and a rollback in it
    answered that the snapshot's models were no longer trained."""
    script = tmp_path / "folds.py"
    script.write_text(textwrap.dedent("""\
        import torch, torch.nn as nn
        torch.manual_seed(0)
        for fold in range(2):
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for i in range(120):
                x = torch.randn(16, 4)
                if fold == 1 and i in (60, 61):
                    x[0, 0] = float("nan")
                opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
        """), encoding="utf-8")
    proc = run_td("--headless", "--recover", "auto", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    rollbacks = [a for a in load_report(tmp_path / "run")["actions"] if a["action"] == "rollback"]
    assert rollbacks and rollbacks[0]["ok"] and rollbacks[0]["models"] == ["model#2"], rollbacks
    assert 120 < rollbacks[0]["snapshot_step"] < 180, rollbacks


def test_a_forked_child_gets_the_scripts_signal_dispositions_not_the_relay(tmp_path: Path) -> None:
    """multiprocessing's fork workers inherited the monitor's relay, which had no loop to deliver to
    there: Process.terminate()'s SIGTERM was swallowed and Pool.__exit__ waited for ever. A handler the
    script set before forking still runs in the child, as under plain Python."""
    script = tmp_path / "forks.py"
    script.write_text(textwrap.dedent("""\
        import multiprocessing as mp, os, signal, time
        def block():
            mp.Event().wait()
        def usr1_child(q):
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)
        if __name__ == "__main__":
            ctx = mp.get_context("fork")
            p = ctx.Process(target=block); p.start(); time.sleep(0.3)
            p.terminate(); p.join(timeout=20)
            print("terminated", p.exitcode, flush=True)
            got = ctx.Queue()
            signal.signal(signal.SIGUSR1, lambda s, f: got.put(("handled in", os.getpid() != parent)))
            parent = os.getpid()
            c = ctx.Process(target=usr1_child, args=(got,)); c.start(); c.join(timeout=20)
            print(got.get(timeout=20), c.exitcode, flush=True)
        """), encoding="utf-8")
    plain = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
    proc = run_td("--headless", "--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == plain.stdout == "terminated -15\n('handled in', True) 0\n", \
        describe(proc) + plain.stdout


# -- faithful to plain Python: cases a review found (session 18) -------------------------------------

def _plain_python(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *(os.fspath(a) for a in args)], cwd=cwd, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)


def test_an_output_log_that_cannot_be_written_never_stops_the_script(tmp_path: Path) -> None:
    """A full disk under the run folder: the log stops (said once), the script's output still passes
    through and the run ends with its report. The reader thread used to die, and the script then
    blocked for ever in a print once the pipe's 64 KiB had filled."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "output.log").symlink_to("/dev/full")
    script = write(tmp_path / "spam.py", 'for i in range(20000):\n    print("line", i, "x" * 40)\nprint("done")\n')
    proc = run_td("--out", run, script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.splitlines()[-1] == "done" and len(proc.stdout.splitlines()) == 20001
    said = [line for line in nonempty_lines(proc.stderr) if "no longer written" in line]
    assert len(said) == 1 and "No space left on device" in said[0], describe(proc)
    assert load_report(run)["run"]["status"] == "finished"


def test_a_signal_handler_gets_the_frame_the_script_was_running(tmp_path: Path) -> None:
    script = write(tmp_path / "sig.py", """\
        import os, signal
        seen = None
        def handler(signum, frame):
            global seen
            seen = frame
        signal.signal(signal.SIGUSR1, handler)
        def train():
            os.kill(os.getpid(), signal.SIGUSR1)
            while seen is None:
                pass
        train()
        print("frame:", seen.f_code.co_name, seen.f_code.co_filename == __file__, flush=True)
        """)
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "frame: train True\n", describe(proc)


def test_an_exception_raised_by_a_signal_handler_is_the_very_object(tmp_path: Path) -> None:
    """A keyword-only exception class was rebuilt from its args (TypeError); now the script catches
    the object its handler raised. Uncaught, its traceback shows the handler's line, as Python's."""
    script = write(tmp_path / "sig.py", """\
        import os, signal, sys, time
        class Preempted(Exception):
            def __init__(self, *, step):
                super().__init__(f"preempted at step {step}")
                self.step = step
        def handler(signum, frame):
            raise Preempted(step=3)  # the handler's line
        signal.signal(signal.SIGUSR1, handler)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):
                time.sleep(0.01)
        except Preempted as exc:
            print("caught", type(exc) is Preempted, exc, exc.step, flush=True)
        if sys.argv[1:] == ["again"]:
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):
                time.sleep(0.01)
        """)
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "caught True preempted at step 3 3\n", describe(proc)
    proc = run_td("--out", tmp_path / "run2", script, "again", cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    block = _traceback_block(proc.stderr)
    assert block[-1] == "Preempted: preempted at step 3", describe(proc)
    assert any("in handler" in line for line in block) and "raise Preempted(step=3)  # the handler's line" in \
        "\n".join(block), describe(proc)
    assert str(PACKAGE_DIR) not in proc.stderr


def test_an_uncaught_keyboard_interrupt_runs_atexit_then_dies_by_sigint_as_python(tmp_path: Path) -> None:
    script = write(tmp_path / "ki.py", """\
        import atexit
        atexit.register(lambda: print("atexit ran", flush=True))
        raise KeyboardInterrupt
        """)
    plain = _plain_python(script, cwd=tmp_path)
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (plain.returncode, plain.stdout) == (-signal.SIGINT, "atexit ran\n"), \
        describe(proc)
    assert load_report(tmp_path / "run")["run"]["status"] == "interrupted"


def test_a_zip_application_and_a_pyc_file_run_as_python_runs_them(tmp_path: Path) -> None:
    import py_compile
    import zipfile

    app = tmp_path / "app.zip"
    with zipfile.ZipFile(app, "w") as zf:
        zf.writestr("__main__.py", "import sys, helper\nprint(__name__, helper.VALUE, sys.argv[1:])\n"
                                   "sys.exit(4)\n")
        zf.writestr("helper.py", "VALUE = 42\n")
    source = write(tmp_path / "src.py", "import sys\nprint(__name__, sys.argv[1:])\nsys.exit(3)\n")
    pyc = tmp_path / "compiled.pyc"
    py_compile.compile(str(source), cfile=str(pyc), doraise=True)
    for target, code in ((app, 4), (pyc, 3)):
        plain = _plain_python(target, "q", cwd=tmp_path)
        proc = run_td("--out", tmp_path / f"run-{target.suffix[1:]}", target, "q", cwd=tmp_path)
        assert (proc.returncode, proc.stdout) == (plain.returncode, plain.stdout), describe(proc)
        assert proc.returncode == code and proc.stdout.endswith("['q']\n"), describe(proc)


def test_a_package_that_fails_to_import_under_dash_m_gives_its_traceback_and_exit_1(tmp_path: Path) -> None:
    """Python imports ``-m pkg.mod``'s package with argv ['-m', *args]; its error is the script's own
    (traceback, exit 1), not a usage error."""
    write(tmp_path / "pkg" / "__init__.py", 'import sys\nprint("init argv", sys.argv, flush=True)\n'
                                            'if "--bad" in sys.argv:\n    {}["missing"]\n')
    write(tmp_path / "pkg" / "train.py", 'import sys\nprint("train argv", sys.argv[1:])\n')
    proc = run_td("--out", tmp_path / "run", "-m", "pkg.train", "--lr", "3", cwd=tmp_path)
    plain = _plain_python("-m", "pkg.train", "--lr", "3", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (plain.returncode, plain.stdout) == (
        0, "init argv ['-m', '--lr', '3']\ntrain argv ['--lr', '3']\n"), describe(proc)
    proc = run_td("--out", tmp_path / "run2", "-m", "pkg.train", "--bad", cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert _traceback_block(proc.stderr)[-1] == "KeyError: 'missing'", describe(proc)
    assert str(PACKAGE_DIR) not in proc.stderr


def test_the_closing_line_starts_a_line_of_its_own_after_an_open_progress_bar(tmp_path: Path) -> None:
    script = write(tmp_path / "bar.py", 'for i in range(3):\n    print(f"\\rprogress {i}/2", end="", flush=True)\n')
    proc = subprocess.run(td_cmd("--out", tmp_path / "run", script), cwd=tmp_path, env=td_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout
    last = proc.stdout.splitlines()[-2:]
    assert last[0].endswith("progress 2/2") and last[1].startswith("tui_debug: finished"), proc.stdout


def test_a_report_path_under_a_file_names_the_report_not_the_run_folder(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    script = write(tmp_path / "s.py", "print('ran')\n")
    proc = run_td("--out", tmp_path / "run", "--report", tmp_path / "afile" / "r.json", script, cwd=tmp_path)
    line = assert_one_error_line(proc)
    assert "--report" in line and "run folder" not in line, line
    assert proc.stdout == ""


def test_a_script_that_is_not_utf8_gets_pythons_own_message(tmp_path: Path) -> None:
    script = tmp_path / "latin1.py"
    script.write_bytes(b'x = 1\nprint("caf\xe9")\n')
    plain = _plain_python(script, cwd=tmp_path)
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert (proc.returncode, script_stderr(proc.stderr)) == (1, nonempty_lines(plain.stderr)), describe(proc)
    assert "Non-UTF-8 code starting with '\\xe9'" in proc.stderr and "on line 2" in proc.stderr


FAKE_LIBRARY = '''
import torch

class Accelerator:
    """As accelerate's: the script hands it each loss; the backward runs in here."""

    def backward(self, loss):
        loss.backward()


class Module(torch.nn.Module):
    """As Lightning's LightningModule: the library's loop calls the model, never the script."""


def fit(model, step):
    for i in range(6):
        step(model(torch.randn(8, 4)), i)
'''

LIBRARY_SCRIPT = '''
import torch
from fakelib import Accelerator, Module, fit

class Net(Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.body(x)

torch.manual_seed(0)
acc = Accelerator()
net = Net()
critic = torch.nn.Linear(1, 1)
opt_g = torch.optim.SGD(net.parameters(), lr=0.01)
opt_d = torch.optim.SGD(critic.parameters(), lr=0.01)

def step(out, i):
    d_loss = critic(out.detach()).square().mean()
    opt_d.zero_grad(); acc.backward(d_loss); opt_d.step()
    g_loss = 500 + critic(out).mean()
    opt_g.zero_grad(); acc.backward(g_loss); opt_g.step()

fit(net, step)
'''


def test_losses_and_models_are_named_from_the_script_not_from_the_library_that_runs_them(tmp_path: Path) -> None:
    """Under accelerate or Lightning the backward is called from the library's one line: a GAN's two
    losses were one loss, named after that line, alternating D's and G's values (a healthy run was
    "exploding" at 500x), and the model the library's name for it (``lightning_module``)."""
    lib = tmp_path / "env" / "site-packages"
    lib.mkdir(parents=True)
    (lib / "fakelib.py").write_text(FAKE_LIBRARY)
    (tmp_path / "train.py").write_text(LIBRARY_SCRIPT)
    proc = run_td("--headless", "--out", tmp_path / "run", "train.py", cwd=tmp_path, extra_path=(lib,))
    assert proc.returncode == 0, describe(proc)
    report = load_report(tmp_path / "run")
    assert {name: (v["source"], v["count"]) for name, v in report["losses"].items()} == {
        "d_loss": ("train.py:22", 6), "g_loss": ("train.py:24", 6)}
    assert {m["name"] for m in report["models"]} == {"net", "critic"}
    assert not [e for e in report["errors"] if e["severity"] in ("warning", "error")], report["errors"]


MAIN_THREAD_HANDLER = '''
import os, signal, threading, time

stop = []
if threading.current_thread() is threading.main_thread():  # as Lightning registers its SIGTERM handler
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
seen = []
threading.Thread(target=lambda: seen.append(threading.main_thread() is not threading.current_thread())).start()
os.kill(os.getpid(), signal.SIGTERM)
for _ in range(500):
    if stop:
        break
    time.sleep(0.01)
print("graceful stop:", stop == [signal.SIGTERM], "threads see the script's main thread:", seen == [True])
'''


def test_the_script_is_the_main_thread_to_itself_so_libraries_register_their_handlers(tmp_path: Path) -> None:
    """Lightning registers its SIGTERM handler (a graceful stop, a checkpoint on preemption) only when
    ``threading.current_thread() is threading.main_thread()``: under tui_debug it never did, and a
    SIGTERM killed the run (143) where plain Python stopped gracefully (0)."""
    (tmp_path / "handler.py").write_text(MAIN_THREAD_HANDLER)
    plain = subprocess.run([sys.executable, "handler.py"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
    proc = run_td("--headless", "--out", tmp_path / "run", "handler.py", cwd=tmp_path)
    assert plain.returncode == 0 and "graceful stop: True" in plain.stdout, plain
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == plain.stdout, describe(proc)


ASYNCIO_RUN = '''
import asyncio

async def main():
    print("READY", flush=True)
    try:
        await asyncio.sleep(3600)  # (the loop blocks in select: an exception sent to the thread waits for it)
    except asyncio.CancelledError:
        print("cancelled", flush=True)
        raise

asyncio.run(main())
'''


def test_ctrl_c_under_asyncio_run_cancels_the_main_task_as_python_does(tmp_path: Path) -> None:
    """asyncio.run installs its own SIGINT handler when it runs in the main thread, which the script's
    thread now is to itself: Ctrl+C cancels the main task (its CancelledError handlers run), then
    KeyboardInterrupt ends the run, killed by SIGINT, as under plain Python. Before, the interrupt
    sent to the training thread waited for the event loop to wake up (an hour here)."""
    (tmp_path / "aio.py").write_text(ASYNCIO_RUN)
    proc = subprocess.Popen(td_cmd("--headless", "--out", tmp_path / "run", "aio.py"), cwd=tmp_path, env=td_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGINT)
    out, err = _finish(proc)
    assert out.strip() == "cancelled", err
    assert proc.returncode == -signal.SIGINT, err
    assert script_stderr(err)[-1] == "KeyboardInterrupt" and "runners.py" in err, err
