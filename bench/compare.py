"""Two versions of the instrumentation in one process: blocks of steps alternate base / this tree / off.

    python bench/compare.py REV [--workload transformer] [--blocks 60] [--block 10] [--batch N]

REV is a git revision of this repository (the base). Its ``tui_debug/`` is extracted into a temporary
folder as the package ``tui_debug_base``, and both versions' ``Instrumentation`` observe the same
model, installed in turn for ``--block`` steps, with an uninstrumented block in between; the order
rotates every round. Machine drift (several percent between runs on a shared VM) cancels, which a
comparison of separate runs cannot do for the 0.1-0.5% changes being measured. Only the training
thread's side is measured: events go to a list, no consumer runs.
"""

import argparse
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def extract(rev: str) -> str:
    """``git archive REV tui_debug`` as the package ``tui_debug_base`` in a temporary folder."""
    dest = tempfile.mkdtemp(prefix="tui_debug_base_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "tui_debug"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    pkg = os.path.join(dest, "tui_debug_base")
    os.rename(os.path.join(dest, "tui_debug"), pkg)
    for folder, _, files in os.walk(pkg):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                with open(path, "w", encoding="utf-8") as f:
                    f.write(re.sub(r"\btui_debug\b(?=[. ])", "tui_debug_base", text))
    return dest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("rev")
    p.add_argument("--workload", default="transformer", choices=["cnn", "transformer", "toy"])
    p.add_argument("--blocks", type=int, default=60)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--batch", type=int, default=0, help="the first N samples of the batch only (a small, fast model)")
    args = p.parse_args()
    sys.path.insert(0, extract(args.rev))
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import torch
    import workloads
    from tui_debug.config import DebugConfig
    from tui_debug.instrument.hooks import Instrumentation
    from tui_debug_base.config import DebugConfig as BaseConfig
    from tui_debug_base.instrument.hooks import Instrumentation as BaseInstrumentation

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, opt, loss_fn, x, y = getattr(workloads, args.workload)()
    if args.batch:
        x, y = x[:args.batch], y[:args.batch]
    sink: list = []

    def emit(batch: list) -> None:
        sink.extend(batch)
        if len(sink) > 10_000:
            sink.clear()

    versions = {"base": BaseInstrumentation(BaseConfig(), emit), "this": Instrumentation(DebugConfig(), emit),
                "off": None}
    gc.collect()
    gc.freeze()

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    for inst in (versions["base"], versions["this"]):  # warm-up, and each learns what it learns
        inst.install(torch)
        for _ in range(20):
            step()
        inst.uninstall()
    times: dict[str, list[float]] = {k: [] for k in versions}
    order = list(versions)
    for b in range(args.blocks):
        for name in order[b % 3:] + order[:b % 3]:
            inst = versions[name]
            if inst is not None:
                inst.install(torch)
            step()  # the first step after an install is not timed
            t0 = time.perf_counter()
            for _ in range(args.block):
                step()
            times[name].append((time.perf_counter() - t0) / args.block)
            if inst is not None:
                inst.uninstall()
    off = times["off"]
    for name in ("base", "this"):
        ratios = [a / o for a, o in zip(times[name], off)]
        print(f"{name} ({args.rev if name == 'base' else 'working tree'}): on/off median {statistics.median(ratios):.4f}")
    ratios = [a / b for a, b in zip(times["this"], times["base"])]
    print(f"this/base: median {statistics.median(ratios):.4f}, mean {statistics.mean(ratios):.4f} "
          f"(plain step {statistics.median(off) * 1e3:.2f} ms, {args.blocks} blocks of {args.block})")


if __name__ == "__main__":
    main()
