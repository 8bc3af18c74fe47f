"""Sick fixtures for the sampled detectors (dead ReLUs, saturated tanh, update/weight ratio) and the
data-stall hint; the healthy direction is tests/test_detectors.py's healthy fixtures, which run long
enough for these samples and must stay silent."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from helpers import SCRIPTS
from test_detectors import UNSAMPLED, names_in, pick, run_fixture, show

SCRIPT = SCRIPTS / "sick_activations.py"


def test_dead_relu_layer_is_named(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, SCRIPT, "--kind", "dead", config=UNSAMPLED)
    assert proc.returncode == 0, show(report)
    (dead,) = pick(report, "model_error", "warning", "never active")
    assert "model.1 (ReLU)" in names_in(dead) and dead["context"]["dead_share"] > 0.5, show(report)
    assert dead["first_step"] <= 130, show(report)  # 5 samples, one every 25 steps


def test_saturated_tanh_layer_is_named(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, SCRIPT, "--kind", "saturated", config=UNSAMPLED)
    assert proc.returncode == 0, show(report)
    (sat,) = pick(report, "model_error", "warning", "saturated")
    assert "model.1 (Tanh)" in names_in(sat) and sat["context"]["saturated_share"] > 0.7, show(report)


def test_update_ratio_far_too_large_is_flagged(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, SCRIPT, "--kind", "update", "--steps", "40",
                               config=UNSAMPLED + "update_ratio_every = 1\n")
    assert proc.returncode == 0, show(report)
    (upd,) = pick(report, "optimization_error", "warning", "far too large")
    assert upd["context"]["median_ratio"] > 0.3 and upd["first_step"] <= 5, show(report)


def test_data_stall_is_an_info_hint(tmp_path: Path) -> None:
    proc, report = run_fixture(tmp_path, SCRIPT, "--kind", "stall", "--steps", "80", config=UNSAMPLED)
    assert proc.returncode == 0, show(report)
    (stall,) = pick(report, "data_error", "info", "waiting for data")
    assert stall["context"]["wait_share"] > 0.5, show(report)
    assert not [e for e in report["errors"] if e["severity"] in ("warning", "error")], show(report)


def _ratio_records(losses: list[float], ratio: float) -> list:
    from tui_debug.events import StepRecord

    return [StepRecord(step=i + 1, time=float(i), duration=0.01, optimizer=0, losses=[(0, v)], grad_names=None,
                       grad_norms=None, update_ratios=[("model.weight", ratio), ("model.bias", ratio)])
            for i, v in enumerate(losses)]


def test_tiny_updates_warn_while_the_loss_is_stuck_but_not_once_it_has_converged() -> None:
    """|update|/|weight| of 1e-12 means a far too small learning rate while the loss is stuck; on a run
    whose loss fell 1000x (a least-squares fit reaching 1e-13) it only means the minimum is reached."""
    from tui_debug.config import DebugConfig
    from tui_debug.detectors.trends import UpdateRatio

    def run(losses: list[float]) -> list[str]:
        detector = UpdateRatio(DebugConfig())
        out = []
        for rec in _ratio_records(losses, 1e-12):
            detector.observe_losses(rec)
            out += [v.finding.key for v in detector.observe(rec)]
        return out

    assert run([2.0, 1.99, 1.99, 1.98, 1.98]) == ["update-ratio|low"]
    assert run([2.0, 0.5, 1e-4, 1e-9, 3e-13]) == []


def test_tiny_updates_of_gradients_that_shrank_1000x_are_no_warning_of_a_far_too_small_learning_rate() -> None:
    """A noisy regression at its minimum: the loss flat well above 0, the gradients ~0, and float32
    adds nothing to the weights (a ratio of exactly 0). Gradients 1000x smaller than earlier in the
    run say they shrank (convergence, or vanishing): an info finding that says so, not the warning
    that the learning rate is far too small (a toy run got it at its minimum). Gradients as large as
    they were still get that warning."""
    from tui_debug.config import DebugConfig
    from tui_debug.detectors.trends import UpdateRatio
    from tui_debug.events import FindingEvent, StepRecord
    from tui_debug.session import GradStats

    def run(ratio: float, grad_max: float, grad_last: float) -> list[FindingEvent]:
        detector = UpdateRatio(DebugConfig())
        detector.grads = {n: GradStats(last=grad_last, max=grad_max, count=50) for n in ("model.weight", "model.bias")}
        out = []
        for i in range(3):
            rec = StepRecord(step=100 * (i + 1), time=float(i), duration=0.01, optimizer=0, losses=[(0, 0.71)],
                             grad_names=None, grad_norms=None,
                             update_ratios=[("model.weight", ratio), ("model.bias", ratio)])
            detector.observe_losses(rec)
            out += [v.finding for v in detector.observe(rec)]
        return out

    (converged,) = run(0.0, grad_max=0.8, grad_last=3e-6)
    assert converged.severity == "info" and converged.key == "update-ratio|low"
    assert converged.message.startswith("updates no longer change the weights (too small for float32 to add)")
    assert "gradients 2.7e+05x smaller than their largest" in converged.message
    assert "converged" in converged.message and converged.context["gradient_shrink"] == pytest.approx(0.8 / 3e-6)
    (zero,) = run(0.0, grad_max=0.8, grad_last=0.0)
    assert zero.severity == "info" and "gradients are 0 now" in zero.message and zero.context["gradient_shrink"] is None
    (stuck,) = run(1e-10, grad_max=0.9, grad_last=0.5)
    assert stuck.severity == "warning" and "learning rate is far too small" in stuck.message
    assert stuck.message.startswith("updates are 1e-10x the size of the weights")


def test_huge_finite_gradient_norms_are_finite_and_nonfinite_ones_are_counted() -> None:
    """The consumer folds each step's norms with a fast all-finite check (one sum): finite norms whose
    sum overflows (1e308 + 1e308) must still count as finite, with their true total, while a NaN or
    an inf among them is counted per parameter and keeps min/max/total out of it."""
    from tui_debug.config import DebugConfig
    from tui_debug.detectors.trends import GradientNorms, all_finite
    from tui_debug.errors import ErrorTracker
    from tui_debug.events import StepRecord
    from tui_debug.session import Session

    assert all_finite([1e308, 1e308, 1.0]) and all_finite([])
    assert not all_finite([1.0, math.nan]) and not all_finite([math.inf, -math.inf]) and not all_finite([-math.inf])

    names = ["model.a", "model.b"]
    norms = [[1.0, 2.0], [1e308, 1e308], [3.0, math.nan], [0.5, math.inf]]
    config = DebugConfig()
    tracker = ErrorTracker(config)
    try:
        session = Session(config, tracker)
        session.handle([StepRecord(step=i + 1, time=float(i), duration=0.01, optimizer=0, losses=[],
                                   grad_names=names, grad_norms=n) for i, n in enumerate(norms)])
        a, b = session.grads["model.a"], session.grads["model.b"]
        assert (a.count, a.nonfinite, a.min, a.max, a.last) == (4, 0, 0.5, 1e308, 0.5)
        assert (b.count, b.nonfinite, b.min, b.max, b.last_step) == (4, 2, 2.0, 1e308, 4)
        assert math.isinf(b.last)
    finally:
        tracker.stop()

    detector = GradientNorms(DebugConfig())
    detector.observe(StepRecord(step=1, time=0.0, duration=0.01, optimizer=0, losses=[], grad_names=names,
                                grad_norms=[1e308, 1e308]))
    assert list(detector.totals[0]) == [math.hypot(1e308, 1e308)]  # finite, not an overflowed sum of squares


def test_the_consumer_lets_a_waiting_thread_take_the_gil_while_it_folds_steps() -> None:
    """A CPU backward takes the GIL back at most of its nodes; the consumer folding a batch of step
    records must hand it over now and then instead of holding it for the whole batch. With the switch
    interval raised to 10 s, only the consumer's own hand-overs can let the other thread run."""
    import sys
    import threading

    from tui_debug.config import DebugConfig
    from tui_debug.errors import ErrorTracker
    from tui_debug.events import StepRecord
    from tui_debug.session import Session

    names = [f"model.p{i}" for i in range(64)]
    records = [StepRecord(step=i + 1, time=float(i), duration=0.01, optimizer=0, losses=[(0, 1.0)],
                          grad_names=names, grad_norms=[1.0 + i * 1e-3] * 64) for i in range(400)]
    config = DebugConfig()
    tracker = ErrorTracker(config)
    counter = [0]
    stop = threading.Event()

    def other() -> None:  # like the training thread in a backward: needs the GIL now and then
        while not stop.is_set():
            counter[0] += 1
            time.sleep(1e-6)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    worker = threading.Thread(target=other, daemon=True)
    try:
        session = Session(config, tracker)
        worker.start()
        while counter[0] == 0:
            time.sleep(0.001)
        before = counter[0]
        session.handle(records)
        during = counter[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        worker.join()
        tracker.stop()
    assert session.steps == 400
    assert during > 0, "the consumer held the GIL through the whole batch"


def test_a_bias_converging_to_zero_does_not_make_the_learning_rate_look_too_large() -> None:
    """A noise-free least-squares fit: the weight converges to its target, the bias to ~0, so the bias
    moves many times its own size each step while the weight moves ~1e-3 of its. The update ratio is
    taken over weight matrices: the median of the two made a healthy run's rate look 'far too large'
    (and --recover auto halved it)."""
    import torch

    from tui_debug.config import DebugConfig
    from tui_debug.detectors.trends import UpdateRatio
    from tui_debug.events import StepRecord
    from tui_debug.instrument.hooks import Instrumentation

    config = DebugConfig(update_ratio_every=1, sample_fast_steps=False)
    batches: list = []
    inst = Instrumentation(config, batches.append)
    inst.install(torch)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x = torch.randn(64, 4)
        w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
        y = x @ w.T
        with torch.no_grad():  # near the fit already: the weight's updates are small from the start
            model.weight.copy_(w + 0.01)
            model.bias.fill_(0.01)
        for _ in range(400):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        bias = abs(float(model.bias))
        inst.finish()
    finally:
        inst.uninstall()
    assert bias < 1e-4  # converged: any step moves it by a large share of its size
    records = [e for b in batches for e in b if isinstance(e, StepRecord) and e.update_ratios]
    assert len(records) > 300 and all([n for n, _ in r.update_ratios] == ["model.weight"] for r in records)
    detector = UpdateRatio(config)
    keys = []
    for r in records:
        detector.observe_losses(r)
        keys += [v.finding.key for v in detector.observe(r) if v.finding is not None]
    assert keys == [], keys


def test_an_exact_fit_is_not_a_vanishing_gradient_and_its_plateau_says_converged() -> None:
    """A loss fitted down to 1e-33: every layer's gradient is ~0, one exactly 0. That is convergence
    (info), not a vanishing gradient (a warning that --recover auto would act on)."""
    from tui_debug.config import DebugConfig
    from tui_debug.detectors.trends import GradientNorms, Plateau, UpdateRatio
    from tui_debug.events import StepRecord

    def run(final_loss: float) -> list[tuple[str, str]]:
        config = DebugConfig(plateau_steps=200)
        ratio, grads, plateau = UpdateRatio(config), GradientNorms(config), Plateau(config)
        grads.converged = plateau.converged = ratio.converged
        out = []
        for i in range(600):
            loss = 2.0 if i == 0 else final_loss
            rec = StepRecord(step=i + 1, time=float(i), duration=0.01, optimizer=0, losses=[(0, loss)],
                             grad_names=["model.weight", "model.bias"], grad_norms=[1e-17, 0.0])
            ratio.observe_losses(rec)
            verdicts = grads.observe(rec) + plateau.observe("loss", rec.step, loss)
            out += [(v.finding.severity, v.finding.message) for v in verdicts if v.finding is not None]
        return out

    converged = run(5e-33)
    assert [s for s, _ in converged] == ["info"] and "has converged" in converged[0][1], converged
    stuck = run(1.9)  # the same gradients while the loss stays high: they do vanish
    assert any(s == "warning" and "vanishing gradient" in m for s, m in stuck), stuck


def test_a_bias_the_loss_cancels_is_called_useless_not_vanishing() -> None:
    """A WGAN critic's last bias cancels in mean(D(fake)) - mean(D(real)): its gradient is exactly 0
    while its weight learns. That is info (it does nothing), not a vanishing gradient with advice about
    activations; a whole layer without gradient still is one."""
    from tui_debug.config import DebugConfig
    from tui_debug.detectors.trends import GradientNorms
    from tui_debug.events import StepRecord

    def run(weight: float) -> list[tuple[str, str]]:
        grads = GradientNorms(DebugConfig())
        out = []
        for i in range(120):
            rec = StepRecord(step=i + 1, time=float(i), duration=0.01, optimizer=0, losses=[(0, 1.0)],
                             grad_names=["D.0.weight", "D.0.bias", "D.2.weight", "D.2.bias"],
                             grad_norms=[0.5, 0.2, weight, 0.0])
            out += [(v.finding.severity, v.finding.message) for v in grads.observe(rec) if v.finding is not None]
        return out

    cancelled = run(0.3)
    assert [s for s, _ in cancelled] == ["info"] and cancelled[0][1].startswith("D.2.bias does nothing"), cancelled
    dead = run(0.0)  # the last layer gets no gradient at all: disconnected, or behind dead units
    assert [s for s, _ in dead] == ["warning"] and "vanishing gradient in D.2.weight" in dead[0][1], dead


def test_attentions_key_bias_whose_gradient_is_zero_to_rounding_is_no_vanishing_gradient() -> None:
    """Softmax ignores what the key bias adds to every score of a query, so its gradient is 0 but for
    rounding (1e-9 to 1e-12 against its weight's 0.05): every BERT/ViT-style model trained under
    tui_debug got "vanishing gradient in ...key.bias". A bias small against a weight that is itself
    tiny still vanishes."""
    from tui_debug.config import DebugConfig
    from tui_debug.detectors.trends import GradientNorms
    from tui_debug.events import StepRecord

    def run(key_weight: float, key_bias: float) -> list[tuple[str, str]]:
        grads = GradientNorms(DebugConfig())
        out = []
        for i in range(120):
            rec = StepRecord(step=i + 1, time=float(i), duration=0.01, optimizer=0, losses=[(0, 1.0)],
                             grad_names=["attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.key.bias"],
                             grad_norms=[0.05, 0.04, key_weight, key_bias * (1 + (i % 7) / 10)])
            out += [(v.finding.severity, v.finding.message) for v in grads.observe(rec) if v.finding is not None]
        return out

    cancelled = run(0.05, 1.2e-9)
    assert [s for s, _ in cancelled] == ["info"] and cancelled[0][1].startswith("attn.key.bias does nothing"), cancelled
    small = run(0.05, 1e-7)  # 2e-6 of its weight's: a small gradient, not a cancelled one
    assert [s for s, _ in small] == ["warning"] and "vanishing gradient in attn.key.bias" in small[0][1], small


def test_a_gans_losses_settling_at_their_equilibrium_are_no_plateau() -> None:
    """examples/gan.py (2,000 steps, healthy) got "loss 'g_loss' did not improve over the last 1006 steps:
    the learning rate may be too small": adversarial losses settle, they do not fall. One loss stepping
    one optimizer still gets the note."""
    import random

    from tui_debug.config import DebugConfig
    from tui_debug.errors import ErrorTracker
    from tui_debug.events import LossSiteEvent, StepRecord
    from tui_debug.session import Session

    rng = random.Random(0)
    for gan, expected in ((True, 0), (False, 1)):
        config = DebugConfig(enable_file_output=False, enable_console_output=False)
        session = Session(config, ErrorTracker(config))
        events: list = [LossSiteEvent(0, "d_loss", "gan.py:40"), LossSiteEvent(1, "g_loss", "gan.py:44")]
        for i in range(1, 1501):
            value = 1.0 + 0.1 * rng.random()
            if gan:  # D's step reads d_loss, G's step g_loss
                events += [StepRecord(2 * i - 1, float(i), 0.01, 0, [(0, value)], None, None),
                           StepRecord(2 * i, float(i), 0.01, 1, [(1, value)], None, None)]
            else:
                events.append(StepRecord(i, float(i), 0.01, 0, [(0, value)], None, None))
        session.handle(events)
        plateaus = [e for e in session.tracker.snapshot() if (e.key or "").startswith("plateau|")]
        assert len(plateaus) == expected, plateaus
