"""Training workloads that time their own steps (steady state, after warm-up) and print JSON.

    python bench/workloads.py cnn|transformer|toy|rnn [--steps N] [--warmup N] [--batch N] [--anomaly] [--rss-at N] [--device cuda]

On CUDA the clock is read after ``torch.cuda.synchronize()`` (at the start and end of the timed window and at
each --ab block boundary), so a step time is the GPU's as well as the host's.
"""

import argparse
import gc
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn


def cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 8 * 8, 10))
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), nn.CrossEntropyLoss(), x, y


class TinyLM(nn.Module):
    def __init__(self, vocab=1000, d=128, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.encoder(self.emb(idx)))


def transformer():
    model = TinyLM()
    x = torch.randint(0, 1000, (8, 64))
    y = torch.randint(0, 1000, (8, 64))
    loss_fn = nn.CrossEntropyLoss()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), (lambda out, t: loss_fn(out.reshape(-1, 1000), t.reshape(-1))), x, y


class CellRNN(nn.Module):
    """An LSTM cell stepped through the sequence by hand: 200 module calls a step, each small (its
    hooks take ~12% of a step on the CPU, over the 10% beyond which checks are sampled)."""

    def __init__(self, d_in=16, hidden=16):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.LSTMCell(d_in, hidden)
        self.proj = nn.Linear(hidden, d_in)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], self.hidden)
        inp = x[:, 0]
        for _ in range(x.shape[1]):
            h, c = self.cell(inp, (h, c))
            inp = torch.tanh(self.proj(h))
        return self.out(h)


def rnn():
    model = CellRNN()
    x, y = torch.randn(32, 100, 16), torch.randn(32, 1)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.MSELoss(), x, y


def toy():
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), x, y


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["cnn", "transformer", "toy", "rnn"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--anomaly", action="store_true")
    p.add_argument("--rss-at", type=int, default=0)
    p.add_argument("--ab", type=int, default=0, metavar="BLOCK",
                   help="under the monitor: switch its instrumentation off and on every BLOCK steps and "
                        "report both step times (same process, so machine noise cancels); the first step "
                        "after each switch is not timed")
    p.add_argument("--settle", type=int, default=1, metavar="N",
                   help="with --ab: untimed steps after each switch (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch", type=int, default=0, help="the first N samples of the batch only (a small, fast model)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, opt, loss_fn, x, y = {"cnn": cnn, "transformer": transformer, "toy": toy, "rnn": rnn}[args.workload]()
    if args.batch:
        x, y = x[:args.batch], y[:args.batch]
    cuda = args.device.startswith("cuda")
    if cuda:  # parameters moved before the optimizer's first step: its state follows them
        model.to(args.device)
        x, y = x.to(args.device), y.to(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gpu_steps = {"cnn": 1000, "transformer": 1000, "toy": 30000, "rnn": 1000}
    steps = args.steps or (gpu_steps if cuda else {"cnn": 150, "transformer": 150, "toy": 30000, "rnn": 300})[args.workload]
    # On a GPU the monitor's sampler warms up over its first ~64 steps (32 checked, then a probe, half
    # checked; session 14: 80-96 of 1,010 timed CNN steps checked against 1 in 67 in steady state): the
    # timed window starts after it, as the toy's does on the CPU
    warmup = args.warmup if args.warmup is not None else (
        {"cnn": 200, "transformer": 200, "toy": 2000, "rnn": 200} if cuda
        else {"cnn": 10, "transformer": 10, "toy": 2000, "rnn": 300})[args.workload]
    ctx = torch.autograd.detect_anomaly(check_nan=True) if args.anomaly else None
    if ctx is not None:
        ctx.__enter__()
    rss_early = None
    t0 = None
    gc_time = [0.0, 0.0, 0.0]
    gc_count = [0, 0, 0]
    gc_start = [0.0]

    def on_gc(phase, info):  # time spent in the cyclic GC, by generation (the monitor allocates too)
        if phase == "start":
            gc_start[0] = time.perf_counter()
        elif t0 is not None:
            gc_time[info["generation"]] += time.perf_counter() - gc_start[0]
            gc_count[info["generation"]] += 1

    gc.callbacks.append(on_gc)
    instr = None
    if args.ab:
        from tui_debug import monitor
        instr = monitor.ACTIVE_MONITOR.instr if monitor.ACTIVE_MONITOR is not None else None
        if instr is None:
            sys.exit("--ab needs the monitor: python -m tui_debug bench/workloads.py ... --ab N")
    blocks = {True: [], False: []}
    on_checked = checked0 = 0
    tb = None
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        if instr is not None and i >= warmup and (i - warmup) % args.ab == 0:
            sync()
            now = time.perf_counter()
            if tb is not None:
                blocks[instr._installed].append((now - tb) / args.ab)
            if ((i - warmup) // args.ab) % 2 == 0:
                instr.install(torch)
                checked0 = instr._observed_steps
            else:
                on_checked += instr._observed_steps - checked0
                instr.uninstall()
            # The first step after a switch is not timed (as in compare.py): its kernels run ~0.7 ms
            # slower on the transformer, in its allocations' new layout and caches, which a run that
            # installs once pays once, not every block.
            for _ in range(args.settle):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            sync()
            tb = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if args.rss_at and i + 1 == args.rss_at:
            rss_early = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sync()
    elapsed = time.perf_counter() - t0
    if instr is not None:
        instr.install(torch)
    if ctx is not None:
        ctx.__exit__(None, None, None)
    out = {"workload": args.workload, "device": args.device, "steps": steps, "step_s": elapsed / steps,
           "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_early": rss_early,
           "gc_s": gc_time, "gc_n": gc_count}
    if instr is not None:
        on, off = blocks[True], blocks[False]
        pairs = [a / b for a, b in zip(on, off)]
        out.update(on_s=statistics.median(on), off_s=statistics.median(off), ab_ratio=statistics.median(pairs),
                   on_checked=on_checked, on_steps=len(on) * (args.ab + args.settle),
                   ab_pairs=[round(r, 4) for r in pairs])
    sys.stdout.write("BENCH " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
