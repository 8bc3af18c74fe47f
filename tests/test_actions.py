"""Recovery actions applied in the training thread at step boundaries, on a real training loop."""

from __future__ import annotations

import queue
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn

from tui_debug.config import DebugConfig
from tui_debug.instrument.hooks import Instrumentation
from tui_debug.recovery import actions
from tui_debug.recovery.actions import ActionResult, Snapshots


@pytest.fixture
def inst() -> Iterator[Instrumentation]:
    batches: list[list[Any]] = []
    i = Instrumentation(DebugConfig(), batches.append)
    i.actions = queue.SimpleQueue()
    i.install(torch)
    try:
        yield i
    finally:
        i.uninstall()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_scale_lr_changes_every_group_and_reports_old_and_new(inst: Instrumentation) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.01}])
    _train(model, opt, 2)
    result = actions.scale_lr(inst, 0.5)
    assert result.ok and [g["lr"] for g in opt.param_groups] == [0.05, 0.005]
    assert [(c["old"], c["new"]) for c in result.detail["changes"]] == [(0.1, 0.05), (0.01, 0.005)]
    actions.scale_lr(inst, 2.0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]


def test_queued_action_runs_in_the_training_thread_at_the_next_step_boundary(inst: Instrumentation) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, opt, 1)
    seen: list[float] = []
    inst.actions.put(lambda: seen.append(opt.param_groups[0]["lr"]) or actions.scale_lr(inst, 0.5))
    assert seen == [] and opt.param_groups[0]["lr"] == 0.1  # nothing happens between steps
    _train(model, opt, 1)
    assert seen == [0.1] and opt.param_groups[0]["lr"] == 0.05


def test_clipping_limits_the_total_gradient_norm_seen_by_the_optimizer(inst: Instrumentation) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    norms: list[float] = []

    def after_ours(optimizer: Any, args: Any, kwargs: Any) -> None:
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in model.parameters()]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(after_ours)
    try:
        _train(model, opt, 3)
        assert max(norms) > 0.05
        result = actions.set_clipping(inst, 0.05)
        assert result.ok and inst.clip_norm == 0.05
        norms.clear()
        _train(model, opt, 3, seed=1)
        assert max(norms) <= 0.05 * 1.001
        assert actions.toggle_clipping(inst).detail["max_norm"] is None and inst.clip_norm is None
    finally:
        handle.remove()


def test_default_clip_norm_comes_from_recent_history(inst: Instrumentation) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _train(model, opt, 5)
    recent = sorted(inst.recent_total_norms)
    assert actions.default_clip_norm(inst) == pytest.approx(2 * recent[len(recent) // 2])


def test_rollback_restores_parameters_and_optimizer_state_but_keeps_lowered_lr(inst: Instrumentation) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 3)
    snaps = Snapshots()
    snap = snaps.take(inst)
    assert snap is not None and snap["step"] == 3
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, 3, seed=2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    actions.scale_lr(inst, 0.5)
    result = actions.rollback(inst, snaps)
    assert result.ok and result.detail["snapshot_step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k])
    assert opt.state_dict()["state"][0]["step"] == 3
    assert opt.param_groups[0]["lr"] == 0.005


def test_rollback_never_gives_a_later_folds_optimizer_an_earlier_ones_state(inst: Instrumentation) -> None:
    """Optimizer states were restored by position: a snapshot of fold 1's Adam went into fold 2's
    (same shapes, so it loaded), its moments and step count from another model."""
    import gc

    model = nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 5)
    snaps = Snapshots()
    assert snaps.take(inst) is not None
    del model, opt
    gc.collect()
    model = nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = actions.rollback(inst, snaps)
    assert not result.ok and "no longer trained" in result.message
    assert opt.state_dict()["state"][0]["step"] == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_rollback_asked_for_mid_iteration_waits_for_the_gans_last_optimizer(inst: Instrumentation) -> None:
    """A GAN reuses fake = G(z) for G's step after D's: a rollback applied right after D's step loaded
    G's weights in place under that graph, and G's backward raised (the user's run crashed)."""
    torch.manual_seed(0)
    G, D = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), nn.Linear(2, 1)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    snaps = Snapshots()
    results: list[ActionResult] = []
    for it in range(12):
        fake = G(torch.randn(16, 8))
        if it == 3:
            snaps.take(inst)
        if it in (6, 9):  # asked for before D's step, while G's backward is still to come
            inst.actions.put(lambda: results.append(actions.rollback(inst, snaps)))
            inst.wake = True
        d_loss = bce(D(torch.randn(16, 2)), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(D(fake), torch.ones(16, 1))
        opt_g.zero_grad()
        g_loss.backward()  # RuntimeError (modified by an inplace operation) when the rollback came first
        opt_g.step()
    assert [r.ok for r in results] == [True, True], results


def test_a_learning_rate_change_names_the_optimizer_as_the_report_does(inst: Instrumentation) -> None:
    """In a later fold the live optimizer is the report's optimizers[1]: the change said 0."""
    import gc

    for fold in range(2):
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _train(model, opt, 3)
        if fold == 0:
            del model, opt
            gc.collect()
    result = actions.scale_lr(inst, 0.5)
    assert [c["optimizer"] for c in result.detail["changes"]] == [1]


def test_rollback_without_snapshot_says_so(inst: Instrumentation) -> None:
    result = actions.rollback(inst, Snapshots())
    assert isinstance(result, ActionResult) and not result.ok and "no snapshot" in result.message


def test_checkpoint_writes_state_dicts_off_the_training_thread(inst: Instrumentation, tmp_path: Any) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _train(model, opt, 2)
    result = actions.save_checkpoint(inst, str(tmp_path))
    assert result.ok
    import threading

    for t in threading.enumerate():
        if t.name == "tui_debug-checkpoint":
            t.join(30)
    state = torch.load(result.detail["path"])
    assert state["step"] == 2 and "model" in state["models"] and len(state["optimizers"]) == 1
    assert torch.equal(state["models"]["model"]["weight"], model.weight.detach())


def test_clear_cache_reports_memory_before_and_after(inst: Instrumentation) -> None:
    result = actions.clear_cache(inst)
    assert result.ok and "rss_bytes" in result.detail["before"] and "rss_bytes" in result.detail["after"]


class _WrappedOptimizer(torch.optim.Optimizer):
    """As accelerate's AcceleratedOptimizer (HF Trainer's): holds the optimizer, shares its groups."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # (no super().__init__, as accelerate)
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def test_a_lowered_learning_rate_holds_under_a_scheduler_of_a_wrapped_optimizer(inst: Instrumentation) -> None:
    """accelerate (and HF Trainer through it) hands the scheduler a wrapper of the optimizer: the
    scheduler was not found, the halving was undone at its next step, and the action said "ok"."""
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = _WrappedOptimizer(opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapped, lambda epoch: 1.0)
    for i in range(6):
        if i == 3:
            result = actions.scale_lr(inst, 0.5)
            assert result.ok and result.detail["schedulers"] == ["LambdaLR"], result
        _train(model, opt, 1)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("kind", ["LambdaLR", "OneCycleLR", "CyclicLR", "CosineAnnealingLR", "StepLR"])
def test_a_lowered_learning_rate_holds_under_the_scripts_scheduler(inst: Instrumentation, kind: str) -> None:
    """LambdaLR (and the warm-up schedules built on it) computes each step's rate from its base rates,
    OneCycleLR from the group's max_lr: the halving was undone at the scheduler's next step, while the
    UI and the report said it was applied. A twin schedule (an optimizer that never steps, so the
    monitor never sees it) gives the rate unlowered."""
    import warnings

    lr_scheduler = torch.optim.lr_scheduler

    def make(opt: torch.optim.Optimizer) -> Any:
        return {"LambdaLR": lambda: lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 + epoch / 10),
                "OneCycleLR": lambda: lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=1000),
                "CyclicLR": lambda: lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=100),
                "CosineAnnealingLR": lambda: lr_scheduler.CosineAnnealingLR(opt, T_max=1000),
                "StepLR": lambda: lr_scheduler.StepLR(opt, step_size=1000)}[kind]()

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = make(opt)
    twin_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    twin = make(twin_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the twin's scheduler steps before its optimizer ever does)
        for i in range(10):
            if i == 5:
                assert actions.scale_lr(inst, 0.5).ok
            _train(model, opt, 1)
            scheduler.step()
            twin.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(twin_opt.param_groups[0]["lr"] / 2, rel=1e-9)
