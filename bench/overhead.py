"""Per-step overhead of tui_debug (and of torch.autograd.detect_anomaly) on the issue's three workloads
(and, with `--workloads rnn`, an LSTM cell stepped by hand: hundreds of small module calls a step).

Runs each workload plain and under the monitor, interleaved, ROUNDS times, and prints the median
of the per-round ratios of the step time the workload measured itself (steady state).

A second figure cancels the machine's noise (on a shared 2-core VM, plain/plain differs by up to
10%): one monitored process switches its instrumentation off and on every few steps (``--ab`` in
workloads.py) and reports on/off within the same process. Under the UI the app runs in both halves,
so that figure is the instrumentation's cost with the UI drawing; the subprocess ratio includes it.

    python bench/overhead.py [--rounds 7] [--ui] [--memory] [--device cuda]

--memory also runs 1,000,000 toy steps under the monitor and compares peak RSS after 10,000 steps
with peak RSS at the end (target: within 32 MB).

Every run, plain or monitored, gets the same fixed glibc malloc settings (``--malloc default`` turns
this off). With glibc's defaults the heap is trimmed and re-grown at every CNN step: identical plain
runs take 195 to 1,900 page faults per step and their step time swings by up to ~10% with it, which
buries a 1-3% overhead (any allocation, ours or the script's, moves where the trims fall). Fixing
the trim and mmap thresholds for both arms removes that lottery without favouring either.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = os.path.join(HERE, "workloads.py")
# rnn (not in the targets, nor run by default): hundreds of small module calls a step, whose
# checks are sampled down to max_overhead_slow (5%)
TARGETS = {"cnn": 1.03, "transformer": 1.03, "toy": 1.15, "rnn": 1.05}
AB_ARGS = {"cnn": ["--steps", "600", "--ab", "10"], "transformer": ["--steps", "600", "--ab", "10"],
           "toy": ["--steps", "30000", "--ab", "1000"], "rnn": ["--steps", "1000", "--ab", "100"]}
UI_TARGETS = {"cnn": 1.05, "transformer": 1.05, "toy": 1.3, "rnn": 1.07}
# no heap trimming (1 GiB) and the largest fixed mmap threshold glibc accepts (32 MiB); see the docstring
FIXED_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
ENV = {}


def run_ui(workload, extra, env):
    """Under the terminal UI, in a pseudo-terminal (120x40); the BENCH line comes from output.log."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    out = tempfile.mkdtemp(prefix="tui_debug_bench_ui_")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    cmd = [sys.executable, "-m", "tui_debug", "--exit-on-end", "--out", out, WORKLOADS, workload, *extra]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=dict(env, TERM="xterm-256color"),
                            start_new_session=True)
    os.close(slave)

    def drain():
        while True:
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    proc.wait(timeout=3600)
    os.close(master)
    with open(os.path.join(out, "output.log"), encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("BENCH "):
                return json.loads(line[6:])
    raise RuntimeError(f"{' '.join(cmd)} gave no BENCH line (exit {proc.returncode})")


def checked_share(out_dir):
    """"checked/steps" from the run's report (fast steps are sampled: how many were checked)."""
    with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    return f"{report['performance']['checked_steps']}/{report['summary']['steps']}"


def run(mode, workload, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", **ENV)
    if mode == "ui":
        return run_ui(workload, extra, env)
    out_dir = None
    if mode == "monitor":
        out_dir = tempfile.mkdtemp(prefix="tui_debug_bench_")
        cmd = [sys.executable, "-m", "tui_debug", "--headless", "--out", out_dir, WORKLOADS, workload, *extra]
    else:
        cmd = [sys.executable, WORKLOADS, workload, *extra]
        if mode == "anomaly":
            cmd.append("--anomaly")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            out = json.loads(line[6:])
            if mode == "monitor":
                out["checked"] = checked_share(out_dir)
            return out
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workloads", default="cnn,transformer,toy")
    p.add_argument("--no-anomaly", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--ui", action="store_true", help="also run under the terminal UI in a pseudo-terminal")
    p.add_argument("--device", default="cpu", help="where the workloads run: cpu (default) or cuda")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="fixed (default): the same glibc trim/mmap thresholds for every run; default: glibc's own")
    args = p.parse_args()
    if args.malloc == "fixed":
        ENV.update(FIXED_MALLOC)
    print(f"malloc: {args.malloc}" + (f" ({', '.join(f'{k}={v}' for k, v in FIXED_MALLOC.items())})"
                                       if args.malloc == "fixed" else ""))
    dev = ["--device", args.device]
    ab_args = AB_ARGS if args.device == "cpu" else dict(AB_ARGS, cnn=["--steps", "2000", "--ab", "50"],
                                                        transformer=["--steps", "2000", "--ab", "50"])
    print(f"{'workload':<12} {'plain step':>11} {'headless':>9} {'(on/off)':>9} {'target':>7} {'UI':>7} "
          f"{'(on/off)':>9} {'target':>7} {'detect_anomaly':>15}")
    for w in args.workloads.split(","):
        ratios, ab, ui, ui_ab, anomaly, plain, noise, ui_gc, checked, ab_checked = [], [], [], [], [], [], [], [], [], []
        for _ in range(args.rounds):
            a = run("plain", w, dev)
            b = run("monitor", w, dev)
            noise.append(run("plain", w, dev)["step_s"] / a["step_s"])
            plain.append(a["step_s"])
            ratios.append(b["step_s"] / a["step_s"])
            checked.append(b["checked"])
            r = run("monitor", w, ab_args[w] + dev)
            ab.append(r["ab_ratio"])
            ab_checked.append(f"{r['on_checked']}/{r['on_steps']}")
            if args.ui:
                c = run("ui", w, dev)
                ui.append(c["step_s"] / a["step_s"])
                ui_gc.append(sum(c.get("gc_s", [0.0])) * 1e3)  # ms of cyclic GC in the timed window
                ui_ab.append(run("ui", w, ab_args[w] + dev)["ab_ratio"])
            if not args.no_anomaly:
                anomaly.append(run("anomaly", w, dev)["step_s"] / a["step_s"])
        med = statistics.median
        an = f"{med(anomaly):.2f}x" if anomaly else "-"
        u = f"{med(ui):.3f}x" if ui else "-"
        uab = f"{med(ui_ab):.3f}x" if ui_ab else "-"
        print(f"{w:<12} {med(plain) * 1e3:>9.3f}ms {med(ratios):>8.3f}x {med(ab):>8.3f}x {TARGETS[w]:>6.2f}x "
              f"{u:>7} {uab:>9} {UI_TARGETS[w]:>6.2f}x {an:>15}   (headless ratios: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}; on/off: {', '.join(f'{r:.3f}' for r in ab)}; "
              f"plain/plain noise: {', '.join(f'{r:.3f}' for r in noise)}; checked steps: {', '.join(checked)}; "
              f"on/off runs' checked on-steps: {', '.join(ab_checked)}"
              + (f"; UI: {', '.join(f'{r:.3f}' for r in ui)}, UI on/off: {', '.join(f'{r:.3f}' for r in ui_ab)}, "
                 f"UI runs' GC ms: {', '.join(f'{g:.0f}' for g in ui_gc)}" if ui else "") + ")", flush=True)
    if args.memory:
        r = run("monitor", "toy", ["--steps", "1000000", "--warmup", "0", "--rss-at", "10000"])
        growth = (r["rss_peak"] - r["rss_early"]) / 2**20
        print(f"memory: peak RSS after 10,000 toy steps {r['rss_early'] / 2**20:.1f} MiB, after 1,000,000 "
              f"{r['rss_peak'] / 2**20:.1f} MiB: growth {growth:.1f} MiB (target <= 32 MB)")


if __name__ == "__main__":
    main()
