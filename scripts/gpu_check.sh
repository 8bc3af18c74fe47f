#!/usr/bin/env bash
# GPU check for the terminal UI (needs an NVIDIA GPU + driver; the CPU test suite never needs one).
# Runs a CUDA training loop under the UI in a pseudo-terminal and asserts:
#   1. the GPU pane shows the device's memory (cuda:0 ... GiB/... GiB),
#   2. `c` lowers torch's reserved memory (the action's before -> after, from report.json),
#   3. a CUDA out-of-memory error is classified (memory_error) with its requested size;
# and headless, that on CUDA (asynchronous reads)
#   4. a module turning its output non-finite is named, on the step it happened (steps of ~ms),
#   5. a GradScaler's skipped fp16 steps are neither findings nor broken by the monitor;
# and prints, for information, what is named when the non-finite step is a sub-millisecond one.
# Usage: scripts/gpu_check.sh [--bench]   (prints PASS/FAIL/INFO lines; exit status 0 when all pass)
#   --bench  then the monitor's per-step cost in one process (bench/modes.py: off / sampled / every step
#            checked, ~1 minute) and the headless overhead benchmark on the GPU (bench/overhead.py --device
#            cuda, 2 rounds, ~4 minutes, with each monitored run's checked/steps): the whole check with
#            --bench fits a 15-minute GPU lease with the machine's start (session 12: ~2 minutes
#            without --bench).
# textual is not in every CUDA image: install it (and its pure-Python dependencies) first, e.g. from wheels.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
"$PY" - <<'PY'
import os, re, subprocess, sys, json, tempfile, textwrap
sys.path.insert(0, "tests")
from test_tui_e2e import Terminal

tmp = tempfile.mkdtemp(prefix="tui_debug-gpu-")
script = os.path.join(tmp, "cuda_train.py")
open(script, "w").write(textwrap.dedent("""
    import sys, torch
    m = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10)).cuda()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    junk = [torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") for _ in range(4)]
    del junk  # 1 GiB reserved but unused: `c` (empty_cache) must give it back
    step = 0
    while True:
        x = torch.randn(256, 2048, device="cuda")
        loss = m(x).square().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        if step == 5: print("READY", flush=True)
        if "--oom" in sys.argv and step == 20:
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB: out of memory
"""))
ok = True
def check(name, cond, info=""):
    global ok
    ok &= bool(cond)
    print(("PASS " if cond else "FAIL ") + name + (f"  [{info}]" if info else ""), flush=True)

# What the pane must show: the device's total memory as NVML gives it, formatted as the pane does
# (a loose "x GiB/y GiB" also matched the system-memory line below it).
import pynvml
from tui_debug.tui.fmt import human_bytes
from tui_debug.tui.gpu import GpuPoller
pynvml.nvmlInit()
dev0 = GpuPoller().sample(pynvml, pynvml.nvmlDeviceGetCount()).devices[0]
pynvml.nvmlShutdown()
total = "/" + human_bytes(dev0.mem_total)
print(f"INFO NVML device 0: {dev0.name}, {human_bytes(dev0.mem_used)}{total}, error {dev0.error}", flush=True)

out = os.path.join(tmp, "run1")
t = Terminal(["--out", out, script], cwd=tmp, cols=120, rows=40)
try:
    t.wait_for("READY")
    pos = t.wait_for(r"cuda:0")
    try:
        end = t.wait_for(r"mem [^\n]*?[\d.]+ [KMG]iB" + re.escape(total), pos)
        check("GPU pane shows device memory", True, t.text()[end - 40:end].strip())
    except AssertionError as exc:
        check("GPU pane shows device memory", False, f"no '{total}' after cuda:0: {str(exc)[-1500:]}")
    t.send("c"); t.wait_for(r"clear_cache: cleared cache", pos)
    t.send("q"); t.wait_for("Stop it"); t.send("y"); code = t.finish()
finally:
    if t.proc.poll() is None: t.proc.kill()
rep = json.load(open(os.path.join(out, "report.json")))
cc = [a for a in rep.get("actions", []) if a["action"] == "clear_cache"]
b = cc and cc[0].get("before", {}).get("cuda_reserved_bytes"); a = cc and cc[0].get("after", {}).get("cuda_reserved_bytes")
check("`c` lowers torch reserved memory", cc and b is not None and a is not None and a < b, f"{b} -> {a}")
check("quit -> exit 130", code == 130, str(code))

out = os.path.join(tmp, "run2")
t = Terminal(["--exit-on-end", "--out", out, script, "--oom"], cwd=tmp, cols=120, rows=40)
try:
    code = t.finish()
finally:
    if t.proc.poll() is None: t.proc.kill()
rep = json.load(open(os.path.join(out, "report.json")))
mem = [e for e in rep["errors"] if e["category"] == "memory_error"]
check("CUDA OOM classified as memory_error with its size", mem and re.search(r"PiB|TiB|GiB|bytes", mem[0]["message"]),
      mem[0]["message"] if mem else str([e["message"] for e in rep["errors"]]))
check("OOM run exit 1", code == 1, str(code))

# -- headless, asynchronous reads ------------------------------------------------------------------------
nan_script = os.path.join(tmp, "cuda_nan.py")
open(nan_script, "w").write(textwrap.dedent("""
    import sys, torch
    width, batch = int(sys.argv[1]), int(sys.argv[2])
    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.on = False
        def forward(self, x):
            return torch.log(x - 1e6) if self.on else x  # NaN made right here
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), Boom(),
                                torch.nn.Linear(width, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width, device="cuda")
    for step in range(1, 81):
        model[2].on = step == 60
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
"""))
amp_script = os.path.join(tmp, "cuda_amp.py")
open(amp_script, "w").write(textwrap.dedent("""
    import torch
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)  # fp16 overflows: the first steps are skipped
    for step in range(60):
        x = torch.randn(256, 512, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    print("SCALE", scaler.get_scale())
"""))

def headless(name, *args):
    out = os.path.join(tmp, name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "tui_debug", "--headless", "--out", out, *args], cwd=tmp,
                       env=env, capture_output=True, text=True, timeout=300)
    return p, json.load(open(os.path.join(out, "report.json")))

for label, width, batch, exact in (("slow steps (4096x4096, batch 4096)", 4096, 4096, True),
                                   ("fast steps (64x64, batch 32)", 64, 32, False)):
    p, rep = headless(f"nan-{width}", nan_script, str(width), str(batch))
    errs = [e for e in rep["errors"] if e["category"] in ("model_error", "loss_error", "gradient_error")]
    first = min(errs, key=lambda e: (e["first_step"], e["category"] != "model_error")) if errs else None
    info = (f"step {first['first_step']}: {first['category']}: {first['message'][:120]}" if first
            else f"no finding; exit {p.returncode}; {p.stderr[-400:]}")
    perf = rep.get("performance", {})
    step_s = f"{perf.get('step_time_p50_s')} s, {perf.get('checked_steps')} of {rep['summary']['steps']} steps checked"
    if exact:
        check(f"CUDA NaN named on its step, {label}",
              first and first["first_step"] == 60 and "model.2" in first["message"], info)
    else:
        print(f"INFO CUDA NaN, {label}: {info}  [p50 step {step_s}]", flush=True)

p, rep = headless("amp", amp_script)
bad = [(e["category"], e["message"][:100]) for e in rep["errors"] if e["severity"] in ("error", "critical")]
check("GradScaler fp16 skipped steps: no error findings, exit 0", p.returncode == 0 and not bad,
      f"exit {p.returncode}, steps {rep['summary']['steps']}, {p.stdout.strip()}, {bad or ''} {p.stderr[-300:] if p.returncode else ''}")
# -- recovery snapshots of CUDA state: copied to pinned memory without waiting, complete when used ----
import time, torch
from tui_debug.recovery.actions import Snapshots, rollback
lin = torch.nn.Linear(1024, 1024).cuda()
adam = torch.optim.AdamW(lin.parameters())
lin(torch.randn(64, 1024, device="cuda")).sum().backward()
adam.step()
class State:
    torch, step, clip_norm, recent_total_norms = torch, 7, None, []
    def models(self): return {"lin": lin}
    def optimizers(self): return [adam]
snaps = Snapshots()
want = {k: v.detach().cpu().clone() for k, v in lin.state_dict().items()}
torch.cuda.synchronize()
torch.cuda._sleep(100_000_000)  # the GPU busy for tens of ms: a synchronous copy would wait for it
t0 = time.perf_counter()
snaps.take(State())
took = time.perf_counter() - t0
pinned = all(t.is_pinned() for t in snaps.items[-1]["models"]["lin"].values())
with torch.no_grad():
    for prm in lin.parameters():
        prm.add_(1.0)  # after the copies in stream order: the snapshot keeps the values before
res = rollback(State(), snaps)
same = all(torch.equal(lin.state_dict()[k].cpu(), want[k]) for k in want)
check("CUDA snapshot: pinned copies taken without waiting for the GPU; rollback restores them exactly",
      pinned and same and res.ok, f"take {took * 1e3:.2f} ms while the GPU was busy; pinned {pinned}, exact {same}; {res.message}")

print("ALL PASS" if ok else "SOME CHECKS FAILED")
sys.exit(0 if ok else 1)
PY
rc=$?
if [ "${1:-}" = "--bench" ]; then
    "$PY" -m tui_debug --headless --out "$(mktemp -d)" bench/modes.py transformer cnn --device cuda --rounds 8 --steps 150 || rc=1
    "$PY" bench/overhead.py --device cuda --rounds 2 --workloads transformer,cnn --no-anomaly || rc=1
fi
exit $rc
