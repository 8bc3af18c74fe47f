#!/usr/bin/env bash
# GPU check for the terminal UI (needs an NVIDIA GPU + driver; the CPU test suite never needs one).
# Runs a CUDA training loop under the UI in a pseudo-terminal and asserts:
#   1. the GPU pane shows the device's memory (cuda:0 ... GiB/... GiB),
#   2. `c` lowers torch's reserved memory (the action's before -> after, from report.json),
#   3. a CUDA out-of-memory error is classified (memory_error) with its requested size.
# Usage: scripts/gpu_check.sh        (prints PASS/FAIL lines; exit status 0 when all pass)
set -u
cd "$(dirname "$0")/.."
exec python - <<'PY'
import os, re, sys, json, tempfile, textwrap
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

out = os.path.join(tmp, "run1")
t = Terminal(["--out", out, script], cwd=tmp, cols=120, rows=40)
try:
    t.wait_for("READY")
    pos = t.wait_for(r"cuda:0")
    m = re.search(r"(\d+\.\d) GiB/(\d+\.\d) GiB", t.text()[pos:] ) or re.search(r"[\d.]+ [GM]iB/[\d.]+ GiB", t.text())
    check("GPU pane shows device memory", m, m.group(0) if m else t.text()[-800:])
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
print("ALL PASS" if ok else "SOME CHECKS FAILED")
sys.exit(0 if ok else 1)
PY
