"""``python -m tui_debug [OPTIONS] SCRIPT [ARGS...]`` / ``python -m tui_debug [OPTIONS] -m MODULE [ARGS...]``.

Everything after SCRIPT (or ``-m MODULE``) belongs to the script, as with ``python -m pdb``.
Bad input is one line on stderr and exit status 2, before anything of the script runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback

from . import __version__
from .config import ConfigError, load_config

USAGE = "python -m tui_debug [OPTIONS] SCRIPT [ARGS...]  |  python -m tui_debug [OPTIONS] -m MODULE [ARGS...]"

# Options that take a value (so the splitter knows where the script starts).
_VALUED = {"--report", "--out", "--config", "--recover", "--debug-level", "-o", "-c"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tui_debug", usage=USAGE, add_help=False,
                description="Run a PyTorch training script under a live debugger.")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--headless", action="store_true",
                   help="no terminal UI: findings on stderr (automatic when stdin/stdout is not a terminal)")
    p.add_argument("--report", metavar="PATH", help="where the JSON report goes (default: RUN_DIR/report.json)")
    p.add_argument("--out", "-o", metavar="DIR",
                   help="the run folder for report and logs (default: tui_debug_runs/<YYYYmmdd-HHMMSS>-<script>)")
    p.add_argument("--config", "-c", metavar="FILE", help="a TOML file with DebugConfig settings")
    p.add_argument("--recover", choices=["off", "safe", "auto"], help="recovery mode (default: safe)")
    p.add_argument("--debug-level", choices=["none", "basic", "detailed", "verbose", "profiling"],
                   help="what debug.log holds: from detailed (the default) on, each new finding's traceback "
                        "too; the checks run at every level")
    p.add_argument("--exit-on-end", action="store_true", help="close the UI when the script ends")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], str | None, str | None, list[str]]:
    """(our options, script, module, script args): our options end at the first non-option."""
    ours: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            if i + 1 >= len(argv):
                raise ConfigError("expected a script after '--'")
            return ours, argv[i + 1], None, argv[i + 2:]
        if a == "-m":
            if i + 1 >= len(argv):
                raise ConfigError("argument -m: expected a module name")
            return ours, None, argv[i + 1], argv[i + 2:]
        if a.startswith("-m") and len(a) > 2 and not a.startswith("--"):
            return ours, None, a[2:], argv[i + 1:]
        if a.startswith("-") and a != "-":
            ours.append(a)
            if a in _VALUED:
                if i + 1 >= len(argv):
                    raise ConfigError(f"argument {a}: expected a value")
                ours.append(argv[i + 1])
                i += 1
            i += 1
            continue
        return ours, a, None, argv[i + 1:]
    return ours, None, None, []


def _fail(message: str) -> int:
    sys.stderr.write(f"tui_debug: error: {message}\n")
    sys.stderr.flush()
    return 2


def launch_rank() -> int | None:
    """This process's rank when a launcher (torchrun, torch.distributed) started several, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ["RANK"])
    except (KeyError, ValueError):
        return None
    return rank if world > 1 else None


def default_run_dir(name: str, rank: int | None = None) -> str:
    """A new folder, made here: processes started in the same second (ranks of one launch) each get
    their own (``mkdir`` fails for all but one of them)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(name.rstrip("/")))[0]) or "run"
    if rank is not None:
        stem += f"-rank{rank}"
    base = os.path.join("tui_debug_runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}")
    os.makedirs("tui_debug_runs", exist_ok=True)
    path, n = base, 2
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            path, n = f"{base}-{n}", n + 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ours, script, module, script_args = split_argv(argv)
        opts = build_parser().parse_args(ours)
    except ConfigError as exc:
        return _fail(f"{exc} (usage: {USAGE})")
    if opts.help:
        build_parser().print_help()
        return 0
    if opts.version:
        print(f"tui_debug {__version__}")
        return 0
    if script is None and module is None:
        return _fail(f"no script given (usage: {USAGE})")

    from .runner import PackageError, UsageError, prepare_module, prepare_script

    try:
        target = prepare_module(module, script_args) if module else prepare_script(script or "", script_args)
    except UsageError as exc:
        return _fail(str(exc))
    except SyntaxError as exc:
        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        return 1
    except PackageError as err:
        sys.stderr.write("".join(traceback.format_exception(type(err.exc), err.exc, err.exc.__traceback__)))
        return 1
    overrides = {}
    if opts.recover:
        overrides["recover"] = opts.recover
    if opts.debug_level:
        overrides["debug_level"] = opts.debug_level
    start_dir = os.path.dirname(target.path) if target.path else os.getcwd()
    try:
        config = load_config(opts.config, start_dir, overrides,
                             warn=lambda msg: print(f"tui_debug: warning: {msg}", file=sys.stderr, flush=True))
    except ConfigError as exc:
        return _fail(str(exc))
    rank = launch_rank()
    try:
        run_dir = opts.out or default_run_dir(target.display, rank)
        if opts.out and rank is not None:  # one --out for the whole launch: a folder per rank in it
            run_dir = os.path.join(opts.out, f"rank{rank}")
        report = opts.report or os.path.join(run_dir, "report.json")
        if opts.report and rank is not None:  # (report.json -> report.rank1.json: no rank overwrites another)
            stem, ext = os.path.splitext(opts.report)
            report = f"{stem}.rank{rank}{ext}"
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create the run folder {opts.out or 'tui_debug_runs'!r}: {exc.strerror or exc}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create the folder of --report {report!r}: {exc.strerror or exc}")
    if os.path.isdir(report):
        return _fail(f"--report {report!r} is a folder; give a file path")
    for folder, what in ((os.path.dirname(os.path.abspath(report)), f"--report {report!r}"),
                         (os.path.abspath(run_dir), f"the run folder {run_dir!r}")):
        try:  # found out now, not after hours of training (the report goes there by temp file + rename)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            return _fail(f"cannot write {what}: {exc.strerror or exc}")

    from .monitor import Monitor

    # Of several ranks sharing a terminal, only rank 0 may take it over.
    ui = not opts.headless and sys.stdin.isatty() and sys.stdout.isatty() and not rank
    monitor = Monitor(target, config, run_dir=os.path.abspath(run_dir), report_path=os.path.abspath(report),
                      passthrough=not ui, rank=rank)
    if ui:
        return monitor.run_ui(exit_on_end=opts.exit_on_end)
    return monitor.run_headless()


def main_entry() -> None:
    """Console script ``tui-debug``."""
    sys.exit(main())
