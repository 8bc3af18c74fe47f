"""Per-step cost of the monitor in one process: off, installed but never checked, sampled (as it
runs) and every step checked.

    python -m tui_debug --headless bench/modes.py transformer cnn [--device cuda] [--rounds 6] [--steps 100] [--batch N]

Each round runs ``--steps`` steps with the instrumentation uninstalled, then installed with no step
checked (the cost of the hooks that every step runs: module-call wrapper, backward patch, optimizer
step hooks), then with the sampler deciding, then with every step checked (after a few steps to
settle each switch), and prints the medians over the rounds. On a GPU this separates what a checked step costs from what
the sampled-out steps between checks cost (session 7: the transformer paid ~1 ms a step at 1 check
in 12, which the checked steps alone did not explain).
"""

import argparse
import statistics
import sys
import time

import torch

import workloads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workloads", nargs="+", choices=["cnn", "transformer", "toy", "rnn"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=0, help="the first N samples of the batch only (a small, fast model)")
    args = p.parse_args()
    from tui_debug import monitor

    if monitor.ACTIVE_MONITOR is None:
        sys.exit("run it under the monitor: python -m tui_debug --headless bench/modes.py ...")
    instr = monitor.ACTIVE_MONITOR.instr
    budget = instr._sampler.budget
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.set_num_threads(1)
    for name in args.workloads:
        torch.manual_seed(0)
        model, opt, loss_fn, x, y = getattr(workloads, name)()
        if args.batch:
            x, y = x[:args.batch], y[:args.batch]
        model.to(args.device)
        x, y = x.to(args.device), y.to(args.device)
        opt = type(opt)(model.parameters(), lr=opt.defaults["lr"])  # its state on the device

        def steps(n: int) -> float:
            sync()
            t = time.perf_counter()
            for _ in range(n):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            sync()
            return (time.perf_counter() - t) / n

        # warm-up, and the sampler's first probe (the rnn's slow steps: its first steady decision too)
        steps(400 if cuda or name == "rnn" else 60)
        every, modes, sampled_checked = instr._sampler.every, {}, []
        for _ in range(args.rounds):
            for mode in ("off", "unchecked", "sampled", "every step"):
                sampler = instr._sampler
                if mode == "off":
                    instr.uninstall()
                elif mode == "unchecked":
                    instr.install(torch)
                    sampler.budget = budget
                    kept = sampler.every, sampler.next_probe, sampler.probe_left
                    # no probe, no check (a check forced by the GPU losses kept for later still runs)
                    sampler.every, sampler.next_probe, sampler.probe_left = 1 << 40, 1 << 62, 0
                else:
                    if mode == "sampled":
                        sampler.every, sampler.next_probe, sampler.probe_left = kept
                    sampler.budget = 0.0 if mode == "every step" else budget
                steps(20 if cuda else 3)
                checked = instr._observed_steps
                modes.setdefault(mode, []).append(steps(args.steps))
                if mode == "sampled":
                    sampled_checked.append(instr._observed_steps - checked)
        instr.install(torch)
        instr._sampler.budget = budget
        med = {m: statistics.median(v) * 1e3 for m, v in modes.items()}
        print(f"MODES {name} on {args.device}: sampler checks 1 step in {every} "
              f"({sum(sampled_checked)} of {args.rounds * args.steps} timed sampled steps checked); ms a step: "
              + ", ".join(f"{m} {v:.3f}" for m, v in med.items())
              + f"; unchecked/off {med['unchecked'] / med['off']:.3f}x, sampled/off {med['sampled'] / med['off']:.3f}x, "
              f"every step/off {med['every step'] / med['off']:.3f}x",
              flush=True)


if __name__ == "__main__":
    main()
