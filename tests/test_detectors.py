"""Detector calibration, both directions: realistic healthy training scripts stay silent (nothing of
severity warning or above), and each sick script gets the finding its detector exists for, at the
right step, naming the layer or loss. Every fixture runs under ``python -m tui_debug`` in a subprocess
(tests/scripts/healthy_*.py, tests/scripts/sick_*.py, examples/)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from helpers import EXAMPLES, SCRIPTS, describe, load_report, run_td

SEVERE = ("warning", "error", "critical")
# Checks every step: fast steps (< 5 ms) are otherwise sampled, which would leave the detectors
# fewer points than the script has steps. Used to tell a detector's criterion from the sampler.
UNSAMPLED = "sample_fast_steps = false\n"


def run_fixture(tmp_path: Path, script: Path, *args: str, config: str | None = None,
                recover: str | None = None) -> tuple[Any, dict[str, Any]]:
    out = tmp_path / "run"
    opts: list[str] = ["--out", str(out)]
    if config is not None:
        cfg = tmp_path / "td.toml"
        cfg.write_text(config)
        opts += ["--config", str(cfg)]
    if recover is not None:
        opts += ["--recover", recover]
    proc = run_td(*opts, script, *args)
    assert (out / "report.json").exists(), describe(proc)
    return proc, load_report(out)


def show(report: dict[str, Any]) -> str:
    """The findings, one a line, for assertion messages."""
    lines = []
    for e in report["errors"]:
        lines.append(f"  {e['severity']:8s} {e['category']:18s} steps {e['first_step']}-{e['last_step']} "
                     f"x{e['count']}: {e['message']} | context {json.dumps(e['context'])[:400]}"
                     f" | recovery {e['recovery_action']!r}")
    return "findings:\n" + ("\n".join(lines) or "  (none)")


def severe(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in report["errors"] if e["severity"] in SEVERE]


def pick(report: dict[str, Any], category: str, severity: str, pattern: str = "") -> list[dict[str, Any]]:
    return [e for e in report["errors"] if e["category"] == category and e["severity"] == severity
            and re.search(pattern, e["message"])]


def names_in(e: dict[str, Any]) -> str:
    return e["message"] + " " + json.dumps(e["context"])


def loss_at(report: dict[str, Any], name: str, step: int) -> float | None:
    for s, v in report["losses"][name]["history"]:
        if s == step:
            return float(v)
    return None


# -- healthy: no finding of severity warning or above --------------------------------------------

HEALTHY = [
    pytest.param(SCRIPTS / "healthy_cnn.py", (), None, id="cnn-batchnorm-dropout-sgd"),
    pytest.param(SCRIPTS / "healthy_transformer.py", (), None, id="transformer-lm-adamw-warmup-clip"),
    pytest.param(EXAMPLES / "gan.py", ("--steps", "400"), None, id="gan-2d-mixture"),
    pytest.param(EXAMPLES / "gan.py", ("--steps", "400"), UNSAMPLED, id="gan-2d-mixture-every-step"),
    pytest.param(SCRIPTS / "healthy_lstm.py", (), None, id="lstm-noisy-sines"),
    pytest.param(EXAMPLES / "digits.py", ("--epochs", "10"), None, id="examples-digits"),
    pytest.param(SCRIPTS / "healthy_kfold.py", (), None, id="kfold-fresh-model-per-fold"),
]


@pytest.mark.parametrize("script,args,config", HEALTHY)
def test_healthy_run_raises_no_warning(tmp_path: Path, script: Path, args: tuple[str, ...],
                                       config: str | None) -> None:
    proc, report = run_fixture(tmp_path, script, *args, config=config)
    assert proc.returncode == 0, describe(proc)
    assert report["run"]["status"] == "finished"
    assert report["summary"]["steps"] >= 200, report["summary"]
    assert not severe(report), f"false alarm on a healthy run ({script.name})\n{show(report)}"


@pytest.mark.parametrize("config", [None, UNSAMPLED], ids=["sampled", "every-step"])
def test_each_fold_of_a_cross_validation_is_a_new_model_not_an_explosion(tmp_path: Path, config: str | None) -> None:
    """A fresh model per fold starts from a high loss again, after a 0.4 s pause: no explosion, no
    slow step; the folds' steps follow each other; each finished fold's model is freed."""
    proc, report = run_fixture(tmp_path, SCRIPTS / "healthy_kfold.py", config=config)
    assert proc.returncode == 0, describe(proc)
    assert report["summary"]["steps"] == 450, report["summary"]
    assert not report["errors"], show(report)
    history = [s for s, _ in report["losses"]["loss"]["history"]]
    assert history == sorted(set(history)) and history[-1] == 450, history
    assert report["losses"]["loss"]["count"] == 450
    assert [m["name"] for m in report["models"]] == ["model", "model#2", "model#3"]
    assert proc.stdout.count("earlier folds' weights freed: True") == 3, proc.stdout


# -- sick: one per detector ------------------------------------------------------------------------

def test_nonfinite_names_loss_gradients_and_producing_module(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, EXAMPLES / "nan_midrun.py", "--steps", "160")  # breaks at step 120
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    assert not [e for e in severe(report) if e["first_step"] < 120], "warning before the bug\n" + msg
    (loss,) = pick(report, "loss_error", "error", "is nan")
    assert "'loss'" in loss["message"] and 120 <= loss["first_step"] <= 125, msg
    (grad,) = pick(report, "gradient_error", "error", "non-finite")
    assert "model.0.weight" in grad["message"] and 120 <= grad["first_step"] <= 125, msg
    acts = pick(report, "model_error", "error")
    assert acts, msg
    act = min(acts, key=lambda e: e["first_step"])  # later ones may follow from weights already NaN
    assert act["context"]["module"] == "model.2 (LogScale)", "producing module misnamed\n" + msg
    # named on the loss's step, whether that step was checked or sampled out (then its forward is
    # replayed at its read: a fast step's last model call, kept by the fast path)
    assert act["first_step"] == loss["first_step"], msg


def test_loss_explosion_warns_early_while_loss_finite(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, SCRIPTS / "sick_loss_explosion.py")
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    warn = pick(report, "loss_error", "warning", "explod")
    assert len(warn) == 1, msg
    w = warn[0]
    assert "'loss'" in w["message"] and w["first_step"] <= 30, msg
    value = loss_at(report, "loss", w["first_step"])
    assert value is None or math.isfinite(value), f"warned only at loss {value}\n{msg}"
    first_inf = int(re.search(r"first non-finite loss at step (\d+)", proc.stdout).group(1))
    assert w["first_step"] < first_inf - 30, f"inf at step {first_inf}\n{msg}"
    for e in pick(report, "loss_error", "error"):
        assert w["first_step"] < e["first_step"], msg


EXPLODING = [pytest.param(None, id="default"), pytest.param(UNSAMPLED, id="every-step")]


@pytest.mark.parametrize("config", EXPLODING)
def test_exploding_gradients_warn_and_name_layers(tmp_path: Path, config: str | None) -> None:
    # healthy for 150 steps; steps 151-154 get a corrupted shard (inputs x1600)
    proc, report = run_fixture(tmp_path, SCRIPTS / "sick_exploding_grad.py", config=config)
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    assert not [e for e in severe(report) if e["first_step"] <= 150], "false alarm in the warm-up\n" + msg
    warn = pick(report, "gradient_error", "warning", "explod")
    assert len(warn) == 1, "exploding gradients not flagged\n" + msg
    w = warn[0]
    assert 151 <= w["first_step"] <= 153, msg
    layers = w["context"].get("layers") or []
    assert layers and all(re.fullmatch(r"model\.\d+\.(weight|bias)", n) for n in layers), msg
    assert re.search(r"model\.\d+\.weight", w["message"]), msg
    for e in pick(report, "loss_error", "error") + pick(report, "gradient_error", "error"):
        assert w["first_step"] <= e["first_step"], "warned only after the run was lost\n" + msg


def test_vanishing_gradients_name_first_layer(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, SCRIPTS / "sick_vanishing.py")  # 600 steps
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    warn = pick(report, "gradient_error", "warning", "vanish")
    assert warn, "vanishing gradients not flagged\n" + msg
    w = min(warn, key=lambda e: e["first_step"])
    assert "model.0.weight" in w["message"], msg
    assert 50 <= w["first_step"] <= 600, msg
    assert not pick(report, "gradient_error", "warning", "explod"), msg


def test_a_bias_cancelled_by_batchnorm_is_called_redundant_not_vanishing(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, SCRIPTS / "conv_bias_before_batchnorm.py", config="vanishing_steps = 20\n")
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    redundant = pick(report, "model_error", "info", "does nothing")
    assert sorted(e["context"]["parameter"] for e in redundant) == ["model.0.bias", "model.5.bias"], msg
    assert all("bias=False" in e["message"] + json.dumps(e) for e in redundant), msg
    assert not pick(report, "gradient_error", "warning", "vanish"), msg  # model.3 feeds a ReLU: a real gradient


def test_memory_leak_warns_with_growth_rate(tmp_path: Path) -> None:
    # ~0.8 MiB kept per step for 11 s (memory is sampled once a second)
    proc, report = run_fixture(tmp_path, SCRIPTS / "sick_memory_leak.py")
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    warn = pick(report, "memory_error", "warning", "grows")
    assert len(warn) == 1, "leak not flagged\n" + msg
    w = warn[0]
    assert "MiB per 100 steps" in w["message"], msg
    assert 0.3 * 2**20 <= w["context"]["bytes_per_step"] <= 3 * 2**20, msg
    assert w["first_step"] < report["summary"]["steps"], msg


def test_slow_step_is_an_info_finding(tmp_path: Path) -> None:
    # ~10 ms steps; fetching the last batch (step 200) stalls for 0.5 s
    proc, report = run_fixture(tmp_path, SCRIPTS / "sick_slow_step.py")
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    slow = pick(report, "timeout_error", "info", "took")
    assert len(slow) == 1, msg
    s = slow[0]
    assert s["last_step"] == 200 and s["context"]["duration_s"] >= 0.5, msg  # context: the latest one
    assert s["context"]["ratio"] >= 10, msg
    assert not severe(report), msg


def test_plateau_with_far_too_small_learning_rate(tmp_path: Path) -> None:
    # lr=1e-7: the loss moves by 1e-5 of its value over 1300 steps
    proc, report = run_fixture(tmp_path, SCRIPTS / "sick_plateau.py")
    assert proc.returncode == 0, describe(proc)
    msg = show(report)
    found = [e for e in report["errors"] if e["category"] == "optimization_error"]
    assert found, "a loss that does not move for 1300 steps was not reported\n" + msg
    for e in found:
        if "improved" in e["message"]:  # the plateau finding proper
            assert "'loss'" in e["message"] and 1000 <= e["first_step"] <= 1300, msg


# -- recovery ---------------------------------------------------------------------------------------

def final_loss(stdout: str) -> float:
    return float(re.search(r"final loss (\S+);", stdout).group(1))


def test_recover_auto_saves_diverging_run(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, EXAMPLES / "diverging.py", recover="auto")
    assert proc.returncode == 0, describe(proc)
    msg = show(report) + "\n" + proc.stdout[-2000:]
    assert "parameters finite: True" in proc.stdout, msg
    broke = pick(report, "loss_error", "error", "is (inf|nan)")
    warned = pick(report, "loss_error", "warning", "explod")
    assert broke and warned, msg
    assert warned[0]["first_step"] < broke[0]["first_step"], msg
    at_warning = loss_at(report, "loss", warned[0]["first_step"])
    final = final_loss(proc.stdout)
    assert math.isfinite(final) and final < report["losses"]["loss"]["first"], msg
    assert at_warning is None or final < at_warning, msg
    acted = [e for e in report["errors"] if e["recovery_action"]]
    assert any(e["category"] == "loss_error" for e in acted), msg
    assert any(e["category"] == "gradient_error" and e["severity"] == "error" for e in acted), msg
    actions = {a["action"] for a in report["actions"] if a.get("ok", True)}
    assert {"rollback", "lower_lr"} <= actions, f"{report['actions']}\n{msg}"


def test_recover_off_leaves_diverging_run_destroyed(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, EXAMPLES / "diverging.py", recover="off")
    assert proc.returncode == 0, describe(proc)
    assert "parameters finite: False" in proc.stdout, describe(proc)
    assert not [a for a in report["actions"] if a["action"] in ("rollback", "lower_lr")], report["actions"]
    assert pick(report, "loss_error", "error"), show(report)


WARNED_SCRIPT = '''
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
sched = torch.optim.lr_scheduler.StepLR(opt, 50)
loss_fn = nn.MSELoss()
for epoch in range(3):
    sched.step()
    for i in range(20):
        x = torch.randn(32, 4); y = x.sum(1)
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
probs = F.softmax(model(torch.randn(5, 4)))
'''


def test_torch_warnings_of_silent_bugs_become_findings_at_the_scripts_line(tmp_path: Path) -> None:
    """A (32, 1) output against (32,) targets: MSELoss broadcasts them, warns once, and the run trains
    toward the wrong optimum with a loss that still goes down. The warning scrolls away with the
    output; the finding stays, at the script's line (not torch's). The script's stderr still shows
    the warning as Python prints it."""
    script = tmp_path / "warned.py"
    script.write_text(WARNED_SCRIPT, encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "UserWarning: Using a target size (torch.Size([32]))" in proc.stderr  # as without the monitor
    report = load_report(tmp_path / "run")
    by_key = {e["context"].get("source"): e for e in report["errors"] if "warning" in e["context"]}
    loss = by_key["warned.py:12"]
    assert loss["category"] == "loss_error" and loss["severity"] == "warning"
    assert "broadcasts its target [32] against its input [32, 1]" in loss["message"]
    assert "squeeze(-1)" in loss["recommendation"]
    order = by_key["warned.py:9"]
    assert order["category"] == "optimization_error" and "before optimizer.step()" in order["message"]
    assert order["count"] == 1  # warned once, though called three times
    dim = by_key["warned.py:14"]
    assert dim["severity"] == "info" and dim["message"].startswith("softmax without dim=")


def test_the_warnings_detector_chains_to_what_showed_warnings_and_puts_it_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from tui_debug.detectors.torch_warnings import TorchWarnings

    shown: list[str] = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    emitted: list[Any] = []
    original = warnings._showwarnmsg  # type: ignore[attr-defined]
    detector = TorchWarnings(emitted.extend, step=lambda: 7)
    detector.install()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Implicit dimension choice for log_softmax has been deprecated. Change the call")
            warnings.warn("something else entirely")
            # logging.captureWarnings(True) replaces showwarning without chaining: still seen
            monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append("logged"))
            warnings.warn("Implicit dimension choice for softmax has been deprecated. Change the call")
    finally:
        detector.uninstall()
    assert shown == ["Implicit dimension choice for log_softmax has been deprecated. Change the call",
                     "something else entirely", "logged"]  # each printed (or logged) as before
    assert [(f.category, f.step, f.key.split("|")[1]) for f in emitted] == [
        ("model_error", 7, "implicit-dim-log_softmax"), ("model_error", 7, "implicit-dim-softmax")]
    assert warnings._showwarnmsg is original  # type: ignore[attr-defined]  # the original is back


EVAL_SCRIPT = '''
import sys, torch, torch.nn as nn
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
if "--inert" in sys.argv:  # layers that compute the same in both modes (a pretrained model's dropout 0.0)
    net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(),
                        nn.Dropout(0.0), nn.Linear(32, 1))
opt = torch.optim.Adam(net.parameters(), 1e-3)
for epoch in range(3):
    for i in range(40):
        x = torch.randn(16, 8)
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    with torch.no_grad():
        net(torch.randn(64, 8))
    if "--fixed" in sys.argv:
        net.train()
'''


@pytest.mark.parametrize("variant", [None, "--fixed", "--inert"])
def test_a_model_left_in_eval_mode_while_it_trains_is_flagged(tmp_path: Path, variant: str | None) -> None:
    """model.eval() for a validation pass, and no model.train() after it: the next epochs train with
    dropout off and BatchNorm on its running statistics, and nothing fails. The script that calls
    model.train() again gets no such finding, nor one whose layers compute the same in both modes."""
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT, encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, *([variant] if variant else []), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    flagged = [e for e in load_report(tmp_path / "run")["errors"] if e["error_id"] and "eval mode" in e["message"]]
    if variant:
        assert flagged == []
        return
    [finding] = flagged
    assert finding["severity"] == "warning" and finding["category"] == "model_error"
    assert finding["message"].startswith("net trains in eval mode") and finding["step"] > 40
    assert finding["context"]["modules"] == ["BatchNorm1d", "Dropout"]
    assert "net.train()" in finding["recommendation"]


GRADLESS_SCRIPT = '''
import sys, torch, torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
if "--remade" in sys.argv:
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))  # opt keeps the old one's
frozen = torch.optim.SGD(nn.Linear(4, 4).requires_grad_(False).parameters(), lr=0.1)  # a frozen stage's
for step in range(60):
    x = torch.randn(32, 4)
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    if "--zero-between" in sys.argv:
        loss.backward(); opt.zero_grad(); opt.step()
    else:
        opt.zero_grad(); loss.backward(); opt.step()
    frozen.step()
print("loss", loss.item())
'''


@pytest.mark.parametrize("variant", ["--remade", "--zero-between", None])
def test_an_optimizer_whose_parameters_never_get_gradients_is_an_error(tmp_path: Path, variant: str | None) -> None:
    """The model re-made after its optimizer (which keeps stepping the old one), or zero_grad() between
    backward() and step(): nothing fails, the loss just never goes down. An optimizer of frozen
    parameters (requires_grad False) that steps anyway is by design."""
    script = tmp_path / "gradless.py"
    script.write_text(GRADLESS_SCRIPT, encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, *([variant] if variant else []), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    flagged = [e for e in load_report(tmp_path / "run")["errors"] if e["message"].startswith("optimizer")]
    if variant is None:
        assert flagged == [], flagged
        return
    [finding] = flagged
    assert finding["severity"] == "error" and finding["category"] == "optimization_error"
    assert finding["message"].startswith("optimizer0 (SGD) steps 4 parameters and none of them has a gradient")
    assert finding["count"] == 1 and "zero_grad()" in finding["recommendation"]
