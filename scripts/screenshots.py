"""PNG screenshots of the terminal UI on real runs of the shipped examples.

    python scripts/screenshots.py                              # the default list below
    python scripts/screenshots.py "examples/gan.py --epochs 2" "examples/data_error.py" --size 120x40

Each example runs in its own process under the real Monitor (fds captured, instrumentation on) with
the app driven headless; when the script ends, the screen is exported as SVG (Textual) and turned
into PNG (cairosvg): ``screenshots/<name>.png``, plus ``<name>-detail.png`` with the first error's
detail open when the run had findings. Needs ``pip install cairosvg``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["examples/digits.py --epochs 3", "examples/nan_midrun.py", "examples/gan.py --steps 600",
           "examples/data_error.py", "examples/diverging.py"]
WAIT_S = 300


def shoot(example: str, out_dir: str, size: tuple[int, int]) -> list[str]:
    """In this process: run ``example`` under the Monitor + app, return the PNGs written."""
    sys.path.insert(0, REPO)
    import cairosvg

    from tui_debug.config import DebugConfig
    from tui_debug.errors import ErrorSeverity
    from tui_debug.monitor import Monitor
    from tui_debug.runner import prepare_script
    from tui_debug.tui.app import TuiDebugApp

    argv = shlex.split(example)
    name = os.path.splitext(os.path.basename(argv[0]))[0]
    run_dir = tempfile.mkdtemp(prefix=f"tui_debug-shot-{name}-")
    target = prepare_script(os.path.join(REPO, argv[0]), argv[1:])
    monitor = Monitor(target, DebugConfig(enable_console_output=False), run_dir=run_dir,
                      report_path=os.path.join(run_dir, "report.json"), passthrough=False)
    monitor.printer._write = lambda text: None
    app = TuiDebugApp(monitor)
    written: list[str] = []

    def save(svg: str, suffix: str = "") -> None:
        path = os.path.join(out_dir, f"{name}{suffix}.png")
        cairosvg.svg2png(bytestring=svg.encode("utf-8"), write_to=path)
        written.append(path)

    async def drive() -> None:
        async with app.run_test(size=size) as pilot:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while monitor.session.ended is None and loop.time() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.2)  # one GPU poll and one memory sample after the end
            app.tick()
            await pilot.pause()
            save(app.export_screenshot(title=f"python -m tui_debug {example}"))
            errors = [i for i in monitor.tracker.snapshot() if i.severity.rank >= ErrorSeverity.ERROR.rank]
            if errors:
                opts = app.errors
                idx = max(i for i, e in enumerate(monitor.tracker.snapshot()) if e is errors[-1])
                app.action_focus_pane("errors")
                opts.highlighted = idx
                await pilot.press("enter")
                await pilot.pause()
                save(app.export_screenshot(title=f"python -m tui_debug {example}"), "-detail")

    asyncio.run(drive())
    monitor.finish()
    return written


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("examples", nargs="*", help='each "SCRIPT [ARGS...]", relative to the repository')
    p.add_argument("--size", default="120x40", help="terminal size COLSxROWS (default 120x40)")
    p.add_argument("--out", default=os.path.join(REPO, "screenshots"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    cols, rows = (int(v) for v in args.size.lower().split("x"))
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        for path in shoot(args.one, args.out, (cols, rows)):
            print(path, file=sys.__stderr__)
        return 0
    failed = 0
    for example in args.examples or DEFAULT:
        proc = subprocess.run([sys.executable, __file__, "--one", example, "--size", args.size, "--out", args.out],
                              cwd=REPO)
        failed += proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
