"""Shared helpers for the tui_debug test suite (imported by the test modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
EXAMPLES = REPO / "examples"
PACKAGE_DIR = REPO / "tui_debug"
SCHEMA_FILE = PACKAGE_DIR / "report.schema.json"

# Generous: a run that hangs fails the test instead of the whole suite.
RUN_TIMEOUT = 120


def td_env(*extra_path: str | os.PathLike[str]) -> dict[str, str]:
    """The environment for a ``python -m tui_debug`` child: this checkout importable first."""
    env = dict(os.environ)
    parts = [str(REPO), *(os.fspath(p) for p in extra_path)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("PYTHONSTARTUP", None)
    env.pop("PYTHONINSPECT", None)
    return env


def td_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "tui_debug", *(os.fspath(a) for a in args)]


def run_td(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
           extra_path: tuple[str | os.PathLike[str], ...] = (),
           timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tui_debug ARGS`` to completion, capturing text stdout/stderr."""
    return subprocess.run(td_cmd(*args), cwd=cwd, env=td_env(*extra_path), capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)


def load_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(run_dir) / "report.json", encoding="utf-8") as fh:
        return json.load(fh)


def script_stderr(stderr: str) -> list[str]:
    """stderr lines that are not the monitor's own ``tui_debug:`` lines."""
    return [line for line in stderr.splitlines() if not line.startswith("tui_debug:")]


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def findings(report: dict[str, Any], category: str) -> list[dict[str, Any]]:
    return [e for e in report["errors"] if e["category"] == category]


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """For assertion messages: what the run printed."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
