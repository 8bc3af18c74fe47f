"""End to end: a real training script under the UI in a pseudo-terminal; keys change the run and the report."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

from helpers import SCRIPTS, load_report, td_cmd, td_env

ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")
DEADLINE_S = 90  # a hang fails the test; nothing waits for a fixed time


class Terminal:
    def __init__(self, args, cwd, cols=100, rows=30):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = td_env()
        env["TERM"] = "xterm-256color"
        self.proc = subprocess.Popen(td_cmd(*args), cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.raw = b""

    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.master], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return False
        self.raw += data
        return bool(data)

    def wait_for(self, pattern: str, since: int = 0) -> int:
        """Read until ``pattern`` shows up after offset ``since`` of the de-escaped text; returns its end."""
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            m = re.search(pattern, self.text()[since:])
            if m:
                return since + m.end()
            if not self._read(0.5) and self.proc.poll() is not None:
                break
        raise AssertionError(f"{pattern!r} never appeared; screen text:\n{self.text()[-3000:]}")

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def finish(self) -> int:
        end = time.monotonic() + DEADLINE_S
        while self.proc.poll() is None and time.monotonic() < end:
            self._read(0.2)
        while self._read(0.05):  # whatever the process wrote last
            pass
        os.close(self.master)
        return self.proc.wait(5)


def test_keys_under_the_ui_reach_the_run_and_the_report(tmp_path):
    out = tmp_path / "run"
    term = Terminal(["--out", out, SCRIPTS / "loop_forever.py"], cwd=tmp_path)
    try:
        pos = term.wait_for(r"RUNNING")
        pos = term.wait_for(r"Output")
        term.send("l")
        pos = term.wait_for(r"lower_lr: learning rate x0\.5: 0\.01 -> 0\.005", pos)
        term.send("q")
        pos = term.wait_for(r"Stop it", pos)
        term.send("y")
        code = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    text = term.text()
    assert code == 130, text[-3000:]
    assert "report written to" in text  # said on the restored terminal, after the UI
    assert term.raw.rfind(b"\x1b[?1049l") > term.raw.rfind(b"\x1b[?1049h")  # left the alternate screen
    report = load_report(out)
    assert report["run"]["status"] == "interrupted" and report["run"]["exit_code"] == 130
    actions = report.get("actions") or []
    assert any(a["action"] == "lower_lr" and a.get("ok") for a in actions), actions


def test_a_hangup_on_the_final_screen_closes_the_app_and_keeps_the_scripts_report(tmp_path):
    """The script ended and the app shows its final state; the SSH connection drops (the terminal goes
    away, SIGHUP). The report was written when the script ended, the app exits instead of waiting for
    a key that will never come, and the report keeps the script's own status."""
    script = tmp_path / "short.py"
    script.write_text("import torch\n"
                      "m = torch.nn.Linear(2, 1)\n"
                      "o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                      "for _ in range(5):\n"
                      "    o.zero_grad()\n"
                      "    m(torch.randn(4, 2)).sum().backward()\n"
                      "    o.step()\n")
    out = tmp_path / "run"
    term = Terminal(["--out", out, script], cwd=tmp_path)
    try:
        term.wait_for(r"script finished \(exit 0\)")
        report = load_report(out)  # on disk while the app still shows the final state
        assert report["run"]["status"] == "finished", report["run"]
        os.close(term.master)  # the terminal goes away...
        term.proc.send_signal(signal.SIGHUP)  # ... with the hangup that comes with it
        code = term.proc.wait(DEADLINE_S)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert code in (-signal.SIGHUP, 128 + signal.SIGHUP), code
    report = load_report(out)
    assert report["run"]["status"] == "finished" and report["run"]["exit_code"] == 0, report["run"]


def test_a_script_reading_its_input_gets_the_lines_typed_under_the_ui(tmp_path):
    """input() and a breakpoint()'s pdb under the UI: the terminal is Textual's, so the script waited
    for ever for a line it could never get. What is typed in the app's input line reaches it."""
    script = tmp_path / "ask.py"
    script.write_text(
        "import torch\n"
        "name = input('run name? ')\n"
        "m = torch.nn.Linear(4, 1); opt = torch.optim.SGD(m.parameters(), lr=0.01)\n"
        "for step in range(30):\n"
        "    opt.zero_grad(); m(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()\n"
        "    if step == 25:\n"
        "        breakpoint()\n"
        "print('NAME', repr(name), 'STEP', step)\n")
    out = tmp_path / "run"
    term = Terminal(["--exit-on-end", "--out", out, script], cwd=tmp_path, cols=120, rows=40)
    try:
        pos = term.wait_for(r"the script reads its input")
        term.send("exp 7\r")
        pos = term.wait_for(r"\(Pdb\)", pos)
        term.send("p 6 * 7\r")
        pos = term.wait_for(r"42", pos)
        time.sleep(0.6)  # a user reading pdb's answer (a step over 0.25 s and 20x the median is "slow")
        term.send("c\r")
        code = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    text = term.text()
    assert code == 0, text[-3000:]
    assert "NAME 'exp 7' STEP 29" in text, text[-3000:]  # replayed on the restored terminal
    report = load_report(out)
    assert report["run"]["status"] == "finished" and report["summary"]["steps"] == 30
    # the minutes a user spends at the prompt are no step's: no "slow step" finding for them
    assert not [e for e in report["errors"] if "took" in e["message"]], report["errors"]
