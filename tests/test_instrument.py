"""The instrumentation in-process: loss and model naming, steps, NaN attribution, clean uninstall."""

from __future__ import annotations

import collections
import math
import subprocess
import sys
import time
from pathlib import Path
import dataclasses
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module

from helpers import RUN_TIMEOUT, SCRIPTS, describe, load_report, run_td
from tui_debug.config import DebugConfig
from tui_debug.events import FindingEvent, LossSiteEvent, ModelEvent, OptimizerEvent, StepRecord
from tui_debug.instrument.hooks import Instrumentation


@dataclasses.dataclass
class Recorder:
    inst: Instrumentation
    batches: list[list[Any]]

    def events(self, cls: type) -> list[Any]:
        """Flush, then every emitted event of type ``cls`` in order."""
        self.inst.finish()
        return [e for batch in self.batches for e in batch if isinstance(e, cls)]

    def findings(self, step: int | None = None) -> list[FindingEvent]:
        return [f for f in self.events(FindingEvent) if step is None or f.step == step]


def _hook_state() -> dict[str, int]:
    return {
        "forward_pre": len(nn_module._global_forward_pre_hooks),
        "forward": len(nn_module._global_forward_hooks),
        "forward_always": len(getattr(nn_module, "_global_forward_hooks_always_called", {})),
        "module_call": id(nn_module.Module.__call__),
        "optimizer_pre": len(optim_module._global_optimizer_pre_hooks),
        "optimizer_post": len(optim_module._global_optimizer_post_hooks),
        "optimizer_made": id(optim_module.Optimizer.__dict__.get("_patch_step_function")),
    }


@pytest.fixture
def rec() -> Iterator[Recorder]:
    batches: list[list[Any]] = []
    inst = Instrumentation(DebugConfig(), batches.append)
    inst.install(torch)
    try:
        yield Recorder(inst, batches)
    finally:
        inst.uninstall()


class NaNMaker(nn.Module):
    """Identity until switched on (or a copy, ``fresh``); then log() of a negative value: NaN
    produced right here."""

    def __init__(self, fresh: bool = False) -> None:
        super().__init__()
        self.on = False
        self.fresh = fresh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            return torch.log(x - 1e3)
        return x * 1.0 if self.fresh else x


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bad = NaNMaker()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bad(self.fc(x))


# -- naming -------------------------------------------------------------------------------------------

def test_gan_losses_and_models_are_named_by_their_variables(rec: Recorder) -> None:
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    D = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    for _ in range(3):
        z = torch.randn(5, 4)
        real = torch.randn(5, 4)
        opt_d.zero_grad()
        d_loss = D(G(z).detach()).mean() - D(real).mean()
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_loss = -D(G(z)).mean()
        g_loss.backward()
        opt_g.step()

    sites = rec.events(LossSiteEvent)
    assert [s.name for s in sites] == ["d_loss", "g_loss"]
    assert all(s.source.startswith("test_instrument.py:") for s in sites)
    assert {m.name for m in rec.events(ModelEvent)} == {"G", "D"}
    assert len(rec.events(OptimizerEvent)) == 2
    records = rec.events(StepRecord)
    assert len(records) == 6
    by_name = {s.index: s.name for s in sites}
    assert [[by_name[i] for i, _ in r.losses] for r in records] == [["d_loss"], ["g_loss"]] * 3
    assert rec.inst.step == 3
    assert {n.split(".")[0] for r in records for n in r.grad_names} == {"G", "D"}


def test_a_gans_gradients_are_listed_in_model_order_not_stepping_order(rec: Recorder) -> None:
    """D's optimizer steps first, but G runs first: the gradients pane (README: "in model order")
    listed D's parameters before G's."""
    from tui_debug.errors import ErrorTracker
    from tui_debug.session import Session

    torch.manual_seed(0)
    rec.inst._sampler.budget = 0.0
    G, D = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    for _ in range(2):
        fake = G(torch.randn(5, 4))
        opt_d.zero_grad()
        D(fake.detach()).mean().backward()
        opt_d.step()
        opt_g.zero_grad()
        (-D(fake).mean()).backward()
        opt_g.step()
    rec.inst.finish()
    config = DebugConfig()
    session = Session(config, ErrorTracker(config))
    session.handle([e for b in rec.batches for e in b])
    assert session.grad_order[0].startswith("D.")  # the order they were first seen
    assert session.grads_in_model_order() == ["G.weight", "G.bias", "D.weight", "D.bias"]


def test_an_expression_loss_gets_a_name(rec: Recorder) -> None:
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    a = model(x).pow(2).mean()
    b = model(x).abs().mean()
    (a + b).backward()
    sites = rec.events(LossSiteEvent)
    assert len(sites) == 1
    assert sites[0].name == "a + b"


def test_before_python_3_11_a_loss_is_named_from_its_line(tmp_path: Path) -> None:
    """3.10 code has no instruction positions: the name comes from the one backward call in the
    innermost statement on the line (several on one line: no guess, file:line instead)."""
    from tui_debug.instrument import naming

    path = tmp_path / "train.py"
    path.write_text("for step in range(3):\n"
                    "    scaler.scale(g_loss).backward(retain_graph=True)\n"
                    "    torch.autograd.backward(\n"
                    "        d_real + d_fake)\n"
                    "    a.backward(); b.backward()\n")
    assert naming._line_source(str(path), 2) == "scaler.scale(g_loss).backward(retain_graph=True)"
    assert naming._line_source(str(path), 3) == "torch.autograd.backward(d_real + d_fake)"
    assert naming._line_source(str(path), 4) == "torch.autograd.backward(d_real + d_fake)"
    assert naming._line_source(str(path), 5) is None
    assert naming._line_source(str(path), 1) is None  # the for statement: no backward of its own line


def test_root_model_and_parameter_names(rec: Recorder) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        optimizer.zero_grad()
        loss = loss_fn(model(torch.randn(6, 4)), torch.randint(0, 2, (6,)))
        loss.backward()
        optimizer.step()
    models = rec.events(ModelEvent)
    assert [m.name for m in models] == ["model"], "the loss function is not a model"
    assert models[0].cls == "Sequential"
    assert models[0].parameters == sum(p.numel() for p in model.parameters())
    records = rec.events(StepRecord)
    assert len(records) == 2
    assert records[-1].grad_names == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    assert [s.name for s in rec.events(LossSiteEvent)] == ["loss"]


# -- steps --------------------------------------------------------------------------------------------

def test_two_optimizers_step_is_the_max_count(rec: Recorder) -> None:
    encoder = nn.Linear(4, 4)
    head = nn.Linear(4, 1)
    opt_a = torch.optim.SGD(encoder.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(head.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    for i in range(5):
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss = head(encoder(x)).pow(2).mean()
        loss.backward()
        opt_b.step()
        if i % 2 == 0:  # the encoder steps on 3 of 5 iterations
            opt_a.step()
    records = rec.events(StepRecord)
    assert rec.inst.step == 5
    assert max(r.step for r in records) == 5
    # opt_b stepped first (index 0) and 5 times; opt_a (index 1) 3 times.
    assert collections.Counter(r.optimizer for r in records) == {0: 5, 1: 3}
    assert [r.step for r in records if r.optimizer == 0] == [1, 2, 3, 4, 5]


def _train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    x = torch.randn(8, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()


def test_a_later_folds_optimizer_continues_the_step_count(rec: Recorder) -> None:
    """k-fold cross-validation (a fresh model and optimizer per fold): counting the most-stepped
    optimizer's steps numbered every later fold's steps 5 ("finished after 5 steps" for 15)."""
    for _ in range(3):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        _train_plain(model, torch.optim.SGD(model.parameters(), lr=0.01), 5)
    steps = [r.step for r in rec.events(StepRecord)]
    assert rec.inst.step == 15
    assert steps == list(range(1, 16))


def test_a_critic_stepped_five_times_a_generator_step_counts_five_steps(rec: Recorder) -> None:
    """WGAN: the generator's optimizer first steps after five critic steps; the run's step is still
    the critic's count, as the most-stepped optimizer's."""
    critic, gen = nn.Linear(4, 1), nn.Linear(4, 4)
    opt_c = torch.optim.SGD(critic.parameters(), lr=0.01)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    z = torch.randn(8, 4)
    for _ in range(4):
        for _ in range(5):
            opt_c.zero_grad()
            critic(gen(z).detach()).mean().backward()
            opt_c.step()
        opt_g.zero_grad()
        (-critic(gen(z)).mean()).backward()
        opt_g.step()
    records = rec.events(StepRecord)
    assert rec.inst.step == 20
    assert [r.step for r in records if r.optimizer == 0] == list(range(1, 21))
    steps = [r.step for r in records]
    assert steps == sorted(steps)


def test_a_finished_models_parameters_are_freed_as_without_the_monitor(rec: Recorder) -> None:
    """The optimizer's state held its parameters for good, and the update ratio's norms (computed
    with autograd on) held them through a graph: each fold's model outlived the fold."""
    import gc
    import weakref

    torch.manual_seed(0)
    refs = []
    for _ in range(2):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        rec.inst._sampler.budget = 0.0  # every step checked: the update ratio's sampled steps among them
        _train_plain(model, optimizer, 40)
        refs.append(weakref.ref(model[0].weight))
        del model, optimizer
        gc.collect()
        assert [r() is None for r in refs] == [True] * len(refs)


def test_a_model_at_a_freed_models_address_is_a_new_model(rec: Recorder) -> None:
    """CPython gives a freed object's address to the next of its size: a later fold's model was taken
    for the freed one (known by id), so it was never named and its parameters kept the old names."""
    rec.inst._sampler.budget = 0.0  # every step checked
    ids = []
    for _ in range(6):
        model = nn.Linear(4, 1)
        ids.append(id(model))
        _train_plain(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
        del model
    assert len(set(ids)) < len(ids), "no address was reused: the case is not exercised"
    assert [m.name for m in rec.events(ModelEvent)] == ["model"] + [f"model#{i}" for i in range(2, 7)]
    names = [r.grad_names for r in rec.events(StepRecord)]
    assert [n[0] for n in names[::2]] == ["model.weight"] + [f"model#{i}.weight" for i in range(2, 7)]


def test_models_are_named_by_the_call_not_by_reading_a_functions_locals(rec: Recorder) -> None:
    """Reading a function frame's f_locals (before Python 3.13) leaves a dict on the frame holding
    every local as it was: the names come from the call's source instead."""
    import gc
    import sys
    import weakref

    def fold() -> weakref.ref:
        net = nn.Linear(4, 1)
        spare = nn.Linear(4, 4)  # a local nothing else holds
        ref = weakref.ref(spare)
        net(torch.randn(2, 4)).sum().backward()
        del spare
        gc.collect()
        assert ref() is None, "the monitor kept a local of the script's frame alive"
        return ref

    fold()
    models = rec.events(ModelEvent)
    assert [m.name for m in models] == ["net"]
    if sys.version_info >= (3, 11):
        holder = [nn.Linear(4, 1)]
        holder[0](torch.randn(2, 4))
        trainer = type("Trainer", (), {})()
        trainer.G = nn.Linear(4, 1)
        trainer.G(torch.randn(2, 4))
        names = [m.name for m in rec.events(ModelEvent)]
        assert names[1] == "Linear"  # holder[0](...): no name in the call, none bound
        assert names[2] == "G"


def test_eval_forwards_under_no_grad_make_no_steps(rec: Recorder) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(8, 4))
        model.train()
    with torch.no_grad():
        for _ in range(10):
            model(x)
    assert rec.inst.step == 3
    records = rec.events(StepRecord)
    assert [r.step for r in records] == [1, 2, 3]
    assert rec.findings() == []


# -- NaN attribution (sentinels) ------------------------------------------------------------------------

def _train(model: nn.Module, steps: int, bad_step: int, poison_input: bool = False) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, steps + 1):
        x = torch.randn(8, 4)
        if poison_input and step == bad_step:
            x[3, 1] = float("nan")
        for m in model.modules():
            if isinstance(m, NaNMaker):
                m.on = not poison_input and step == bad_step
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()


def test_nan_is_blamed_on_the_module_that_produced_it(rec: Recorder) -> None:
    model = nn.Sequential(nn.Linear(4, 8), NaNMaker(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    _train(model, steps=2, bad_step=2)
    assert rec.findings(step=1) == []
    at_2 = rec.findings(step=2)
    blamed = [f for f in at_2 if f.category == "model_error"]
    assert [f.context["module"] for f in blamed] == ["model.1 (NaNMaker)"], at_2
    assert "model.1 (NaNMaker)" in blamed[0].message
    assert {f.category for f in at_2} >= {"loss_error", "gradient_error", "model_error"}
    assert not [f for f in at_2 if f.category == "input_validation"]


def test_a_float64_model_is_checked_in_float64(rec: Recorder) -> None:
    """Norms of float64 activations and gradients in their own precision: a float32 one is refused
    as narrowing, which used to switch the monitor off at the first step of any float64 model."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Sequential(nn.Linear(4, 8), NaNMaker(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        _train(model, steps=2, bad_step=2)
    finally:
        torch.set_default_dtype(previous)
    assert rec.inst.broken is None
    assert rec.findings(step=1) == []
    blamed = [f.context["module"] for f in rec.findings(step=2) if f.category == "model_error"]
    assert blamed == ["model.1 (NaNMaker)"]
    records = rec.events(StepRecord)
    assert [r.step for r in records] == [1, 2] and records[0].grad_names


def test_nan_in_a_nested_module_is_blamed_on_the_innermost(rec: Recorder) -> None:
    model = nn.Sequential(nn.Linear(4, 8), Block(), nn.Linear(8, 1))
    _train(model, steps=2, bad_step=2)
    blamed = [f for f in rec.findings(step=2) if f.category == "model_error"]
    assert [f.context["module"] for f in blamed] == ["model.1.bad (NaNMaker)"]


def test_nan_in_the_input_data_is_an_input_validation_finding(rec: Recorder) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    _train(model, steps=2, bad_step=2, poison_input=True)
    assert rec.findings(step=1) == []
    at_2 = rec.findings(step=2)
    inputs = [f for f in at_2 if f.category == "input_validation"]
    assert len(inputs) == 1, at_2
    assert inputs[0].context["module"] == "model (Sequential)"
    assert not [f for f in at_2 if f.category == "model_error"], "no module produced the NaN"


@pytest.mark.parametrize("n", [8, 70_000], ids=["small", "large"])
def test_nan_in_a_loss_target_is_bad_data_not_the_models_doing(rec: Recorder, n: int) -> None:
    """Regression labels with a NaN: the loss and gradients go bad with no module to blame; the
    finding says the loss function's target was not finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    loss_fn = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 3):
        y = torch.randn(n, 1)
        if step == 2:
            y[n // 2, 0] = float("nan")
        optimizer.zero_grad()
        loss_fn(model(torch.randn(n, 4)), y).backward()
        optimizer.step()
    assert rec.findings(step=1) == []
    at_2 = rec.findings(step=2)
    bad_data = [f for f in at_2 if f.category == "input_validation"]
    assert [f.message for f in bad_data] == ["the target given to loss_fn (MSELoss) contains nan values"], at_2
    assert not [f for f in at_2 if f.category == "model_error"]


def test_a_module_whose_weight_went_bad_is_named_with_the_weight(rec: Recorder) -> None:
    """A NaN weight (written by an earlier step, or loaded) makes a finite input's output NaN: the
    finding says the weight is the cause; a module that makes NaN from finite weights says nothing of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Block(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    for step in range(1, 5):
        if step == 2:
            with torch.no_grad():
                model[3].weight[0, 1] = float("nan")
        if step == 4:
            with torch.no_grad():
                model[3].weight.normal_()
            model[2].bad.on = True
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    at_2 = [f for f in rec.findings(step=2) if f.category == "model_error"]
    assert len(at_2) == 1 and at_2[0].context["module"] == "model.3 (Linear)", at_2
    assert at_2[0].context["nonfinite_parameters"] == ["weight"]
    assert at_2[0].message.endswith("its weight is non-finite")
    at_4 = [f for f in rec.findings(step=4) if f.category == "model_error"]
    assert [f.context["module"] for f in at_4] == ["model.2.bad (NaNMaker)"], at_4
    assert "nonfinite_parameters" not in at_4[0].context


def test_nan_input_in_a_reused_buffer_with_gradient_accumulation(rec: Recorder) -> None:
    """Two micro-batches per step copied into one preallocated input tensor (a common pattern):
    the second micro-batch carries a NaN, which is bad data, not a module's doing."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 8), nn.ReLU()]
    for _ in range(6):  # deep enough that one forward has more activations than any small batch of them
        layers += [nn.Linear(8, 8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x_buf = torch.empty(5, 4)
    for step in range(1, 3):
        optimizer.zero_grad()
        for micro in range(2):
            x_buf.copy_(torch.randn(5, 4))
            if step == 2 and micro == 1:
                x_buf[0, 0] = float("nan")
            loss = model(x_buf).mean() / 2
            loss.backward()
        optimizer.step()
    at_2 = rec.findings(step=2)
    assert [f.category for f in at_2 if f.category in ("input_validation", "model_error")] == \
        ["input_validation"], [(f.category, f.message) for f in at_2]


def test_a_skipped_step_leaves_the_parameters_and_gives_the_gradients_back(rec: Recorder) -> None:
    """Safe recovery skips a step with non-finite gradients as GradScaler does: the parameters are
    untouched, and the script still finds its gradients after optimizer.step() (they were set to None,
    and a script logging p.grad.norm() there crashed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(1, 5):
        x = torch.randn(8, 4)
        if step == 3:
            x[0, 0] = float("inf")
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads), step
        if step == 3:
            assert not all(bool(g.isfinite().all()) for g in grads)  # the script sees what backward made
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert rec.inst.skipped_steps == 1


def test_micro_batches_before_the_first_optimizer_step_are_not_steps(rec: Recorder) -> None:
    """Gradient accumulation: 4 backwards per optimizer step. The backwards before the first step
    were counted as steps of a hand-written update (8 steps reported 11 times; the NaN of step 3 at
    step 6)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 9):
        for micro in range(4):
            x = torch.randn(8, 4)
            if step == 3 and micro == 2:
                x[0, 0] = float("nan")
            (model(x).pow(2).mean() / 4).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert rec.inst.step == 8
    assert [r.step for r in rec.events(StepRecord)] == list(range(1, 9))
    assert {f.step for f in rec.findings() if f.category == "loss_error"} == {3}


def test_reentrant_checkpointing_backwards_are_neither_losses_nor_steps(rec: Recorder) -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
    optimizer = torch.optim.SGD(blocks.parameters(), lr=0.01)
    x = torch.randn(4, 8, requires_grad=True)
    for _ in range(5):
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=True)
        loss = h.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert rec.inst.step == 5
    assert [s.name for s in rec.events(LossSiteEvent)] == ["loss"]


def test_a_closure_step_is_read_after_it_with_its_own_losses(rec: Recorder) -> None:
    """optimizer.step(closure): the backward runs inside the step. Read before it, each step got the
    previous one's losses and gradients, and a NaN on the last step was never seen."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    seen: list[list[float]] = []

    for step in range(1, 6):
        values: list[float] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            inp = x.clone()
            if step == 5:
                inp[0, 0] = float("nan")
            loss = (model(inp) - y).pow(2).mean()
            loss.backward()
            values.append(loss.item())
            return loss

        optimizer.step(closure)
        seen.append(values)
    records = rec.events(StepRecord)
    assert [r.step for r in records] == [1, 2, 3, 4, 5]
    by_step = {r.step: [v for _, v in r.losses] for r in records}
    for step, values in enumerate(seen[:4], 1):
        assert by_step[step] == pytest.approx(values), step
    assert all(math.isnan(v) for v in by_step[5])
    assert {f.step for f in rec.findings() if f.category in ("loss_error", "gradient_error")} == {5}


@pytest.mark.parametrize("inside", [True, False])
def test_a_closure_step_with_non_finite_gradients_is_skipped_before_its_update(rec: Recorder, inside: bool) -> None:
    """Lightning steps every optimizer with a closure (its backward inside, or a no-op one in manual
    optimization). Its boundary was after the update, so safe mode never skipped a step there, the
    weights went NaN, and the NaN's module was said to have non-finite weights (read after the
    update). The closure's end is the boundary now, before the update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), NaNMaker(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    for step in range(1, 6):
        model[1].on = step == 3

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        before = [p.detach().clone() for p in model.parameters()]
        if inside:
            optimizer.step(closure=closure)
        else:
            closure()
            optimizer.step(lambda: None)
        if step == 3:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            assert all(p.grad is not None for p in model.parameters())  # given back after the step
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert rec.inst.skipped_steps == 1 and rec.inst.step == 5
    [named] = [f for f in rec.findings() if f.category == "model_error"]
    assert named.step == 3 and named.context["module"] == "model.1 (NaNMaker)"
    assert "non-finite" not in named.message.partition("from a finite input")[2], named.message
    losses = {r.step: [v for _, v in r.losses] for r in rec.events(StepRecord)}
    assert all(len(losses[k]) == 1 for k in range(1, 6)) and math.isnan(losses[3][0])  # each step its own


def test_a_model_called_with_keyword_arguments_has_its_input_measured(rec: Recorder) -> None:
    """model(**batch), the Hugging Face way: NaN data was blamed on the model, "its input was not
    measured"."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, features: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(features)

    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for step in range(1, 4):
        batch = {"features": torch.randn(8, 4)}
        if step == 3:
            batch["features"][1, 2] = float("nan")
        optimizer.zero_grad()
        net(**batch).pow(2).mean().backward()
        optimizer.step()
    at_3 = [(f.category, f.context.get("module")) for f in rec.findings(step=3)
            if f.category in ("input_validation", "model_error")]
    assert at_3 == [("input_validation", "net (Net)")]


def test_a_model_returning_a_dataclass_is_named_when_its_output_goes_bad() -> None:
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        aux: float = 0.0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.register_buffer("scale", torch.ones(()))

        def forward(self, x: torch.Tensor) -> Out:
            return Out(self.fc(x) / self.scale)

    batches: list[list[Any]] = []
    inst = Instrumentation(DebugConfig(), batches.append)
    inst.install(torch)
    try:
        torch.manual_seed(0)
        net = Net()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        for step in range(1, 4):
            if step == 3:
                net.scale.zero_()
            optimizer.zero_grad()
            net(torch.randn(8, 4)).logits.sum().backward()
            optimizer.step()
        inst.finish()
    finally:
        inst.uninstall()
    found = [e for b in batches for e in b if isinstance(e, FindingEvent) and e.category == "model_error"]
    assert [(f.step, f.context["module"]) for f in found] == [(3, "net (Net)")]


def test_a_group_frozen_by_a_zero_learning_rate_is_left_out_of_the_update_ratio() -> None:
    """Linear probing: the backbone's group has lr=0. Its updates are 0 by design, and the median over
    layers said the learning rate was far too small."""
    batches: list[list[Any]] = []
    inst = Instrumentation(DebugConfig(update_ratio_every=1), batches.append)
    inst.install(torch)
    try:
        inst._sampler.budget = 0.0
        torch.manual_seed(0)
        backbone, head = nn.Linear(4, 8), nn.Linear(8, 1)
        model = nn.Sequential(backbone, nn.ReLU(), head)
        optimizer = torch.optim.SGD([{"params": backbone.parameters(), "lr": 0.0},
                                     {"params": head.parameters(), "lr": 0.1}])
        for _ in range(4):
            optimizer.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            optimizer.step()
        inst.finish()
    finally:
        inst.uninstall()
    ratios = [r.update_ratios for b in batches for r in b if isinstance(r, StepRecord) and r.update_ratios]
    assert ratios and all([n for n, _ in rs] == ["model.2.weight"] for rs in ratios), ratios
    assert all(v > 0 for rs in ratios for _, v in rs)


def test_an_optimizer_stepped_by_the_skipped_one_is_part_of_that_step(rec: Recorder) -> None:
    """ZeroRedundancyOptimizer's pattern: its step() steps an inner torch optimizer. The inner one's
    pre-step hook gave the held gradients back and the step was skipped twice (--recover auto then
    took one bad batch for a poisoned state and rolled back)."""
    class Delegating(torch.optim.Optimizer):
        def __init__(self, params: Any, **kw: Any) -> None:
            self.inner = torch.optim.SGD(params, **kw)
            super().__init__(self.inner.param_groups, self.inner.defaults)

        def step(self, closure: Any = None) -> Any:
            return self.inner.step()

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = Delegating(model.parameters(), lr=0.1)
    for i in range(5):
        x = torch.randn(8, 4)
        if i == 3:
            x[0, 0] = float("nan")
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert rec.inst.skipped_steps == 1 and rec.inst.step == 5
    assert bool(model.weight.isfinite().all())


def test_a_loss_module_made_every_step_does_not_reindex_the_models(rec: Recorder) -> None:
    """nn.CrossEntropyLoss()(out, y) inline: each step's loss module dies; each death and each new one
    reindexed every model (~1 ms a rebuild on a 48-layer transformer) and dropped the learned proofs."""
    torch.manual_seed(0)
    rec.inst._sampler.budget = 0.0
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generations = []
    for _ in range(6):
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        generations.append(rec.inst._generation)
    assert len(set(generations[1:])) == 1, generations
    assert [m.name for m in rec.events(ModelEvent)] == ["model"]


def test_models_called_through_self_or_a_builtin_keep_their_names(rec: Recorder) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

        def training_step(self, x: torch.Tensor) -> torch.Tensor:  # Lightning's way
            return self(x).pow(2).mean()

    def run() -> None:
        model = Net()
        model.training_step(torch.randn(8, 4)).backward()
        encoder = nn.Linear(4, 2)
        outs = list(map(encoder, [torch.randn(2, 4), torch.randn(2, 4)]))
        torch.stack(outs).sum().backward()

    run()
    assert [m.name for m in rec.events(ModelEvent)][:2] == ["model", "Linear"]  # (no "list": a builtin)


# -- AMP and hand-written updates ---------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="a CPU GradScaler is torch >= 2.3")
def test_gradscaler_skipped_steps_are_not_findings_and_do_not_break_the_scaler(rec: Recorder) -> None:
    """A GradScaler starting far too high skips its first steps (scaled gradients overflow). Those
    skips call no optimizer, so they are no steps; the gradients are the scaler's to handle, and the
    monitor must neither report them nor take them away (``scaler.step`` then asserts)."""
    import runpy

    from helpers import SCRIPTS

    scaler = runpy.run_path(str(SCRIPTS / "amp_scaler_skips.py"))["scaler"]  # 60 iterations
    skipped = round(127 - torch.log2(torch.tensor(scaler.get_scale())).item())
    assert 0 < skipped < 60  # the scaler really skipped some steps and then stepped
    assert rec.inst.step == 60 - skipped
    found = [(f.category, f.message) for f in rec.findings()]
    assert not [f for f in found if f[0] in ("gradient_error", "loss_error", "training_error")], found
    # The skipped iterations are counted, and their losses are not taken for the next step's.
    from tui_debug.events import ScalerSkips

    assert sum(e.count for e in rec.events(ScalerSkips)) == skipped == rec.inst.scaler_skips
    records = rec.events(StepRecord)
    assert [r.step for r in records] == list(range(1, 61 - skipped))
    assert all(len(r.losses) == 1 for r in records), [len(r.losses) for r in records]


def test_nan_gradients_of_a_hand_written_update_are_reported_and_left_in_place(rec: Recorder) -> None:
    """No optimizer: each backward is a step. Safe mode skips only an optimizer's step; taking the
    gradients of a hand-written ``p -= lr * p.grad`` away would crash the script."""
    w = torch.ones(4, requires_grad=True)
    model = nn.Linear(4, 1)
    for i in range(5):
        x = torch.ones(4) * (float("nan") if i == 3 else 1.0)
        loss = model(x * w).sum()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad  # TypeError if the monitor set p.grad to None
                p.grad = None
    found = rec.findings()
    assert any(f.category in ("gradient_error", "loss_error", "model_error", "input_validation")
               for f in found), [(f.category, f.message) for f in found]


# -- the module-call wrapper: torch.compile, faults of our own ----------------------------------------

@pytest.mark.xfail(not hasattr(torch.compiler, "is_compiling"), strict=True,
                   reason="torch < 2.3 (2.1.2 tried): dynamo does not fold is_compiling() in the wrapper, "
                          "traces on into the hooks and compiles their frames; the monitor switches off")
def test_torch_compile_traces_the_instrumented_model_without_graph_breaks(
        rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo traces through the module-call wrapper (it asks is_compiling() first): one graph, no
    break, and the steps are still counted with their loss."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._dynamo.variables import nn_module as dynamo_nn_module

    # As if dynamo had been imported before the wrapper (it then takes it for a custom __call__ and
    # traces it; imported after, it would skip it): the case that used to break every graph.
    monkeypatch.setattr(dynamo_nn_module, "unpatched_nn_module_call", nn_module.Module._wrapped_call_impl,
                        raising=False)  # (older torch has no such name: nothing to set)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.GELU()), nn.Linear(16, 1))
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        for _ in range(3):
            optimizer.zero_grad()
            loss = compiled(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            optimizer.step()
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()  # a failure must not leave compiled state to the tests after it
    records = rec.events(StepRecord)
    assert [r.step for r in records] == [1, 2, 3]
    assert all(r.losses and math.isfinite(r.losses[0][1]) for r in records)
    # the model inside runs compiled (no call of ours): registered with the wrapper, under its name,
    # so that its parameters are named (they were optimizer0.param0...)
    assert [(m.name, m.cls) for m in rec.events(ModelEvent)] == [("compiled", "Sequential")]
    assert records[-1].grad_names == ["compiled.0.weight", "compiled.0.bias", "compiled.2.0.weight",
                                      "compiled.2.0.bias", "compiled.3.weight", "compiled.3.bias"]


def test_nan_data_fed_to_a_compiled_model_and_a_nan_made_inside_it_are_told_apart(rec: Recorder) -> None:
    """The compiled model's layers run compiled, unseen, but the call of torch.compile's wrapper is
    measured: NaN data was reported only through the loss and gradients (the loss finding pointed to a
    model_error that never came); now it is input_validation, and a NaN made inside is put on the
    model, under its name."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), NaNMaker(), nn.Linear(16, 1))
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        for step in range(1, 7):
            x = torch.randn(4, 8)
            if step == 3:
                x[0, 0] = float("nan")
            model[1].on = step == 5
            optimizer.zero_grad()
            compiled(x).pow(2).mean().backward()
            optimizer.step()
    finally:
        torch._dynamo.reset()
    first = {f.step: f for f in rec.findings() if f.category in ("input_validation", "model_error")}
    assert sorted(first) == [3, 5], [(f.step, f.category, f.message) for f in rec.findings()]
    assert first[3].category == "input_validation" and "compiled (Sequential)" in first[3].message, first[3].message
    assert first[5].category == "model_error" and first[5].context["module"] == "compiled (Sequential)"
    assert "container.py" in first[5].context["forward"]  # Sequential's forward, not the wrapper's


def test_a_tensors_backward_given_its_gradient_is_named_after_the_tensor() -> None:
    """WGAN code's ``errD_real.backward(one)``: the argument is the gradient, not the loss (every loss
    was named ``one``); a wrapper's ``acc.backward(d_loss)`` and ``self.manual_backward(g)`` name theirs."""
    import ast

    from tui_debug.instrument.naming import _backward_target

    def target(src: str) -> str:
        found = _backward_target(ast.parse(src, mode="eval"))
        return ast.unparse(found) if found is not None else ""

    assert target("errD_real.backward(one)") == "errD_real"
    assert target("loss.backward(torch.ones_like(loss))") == "loss"
    assert target("acc.backward(d_loss)") == "d_loss"
    assert target("self.accelerator.backward(loss * 2)") == "loss * 2"
    assert target("self.manual_backward(g_loss)") == "g_loss"
    assert target("torch.autograd.backward(total)") == "total"


def test_jit_trace_of_an_observed_model_passes_its_check_and_training_is_still_observed(rec: Recorder) -> None:
    """torch.jit.trace runs the model twice and compares the graphs, named after the variables in the
    frames it runs through: module calls under its tracer go straight to torch. Not steps either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()
    traced = torch.jit.trace(model, x)  # its check trace raises TracingCheckError on a mismatch
    assert torch.equal(traced(x), model(x))
    for _ in range(2):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert rec.inst.broken is None
    assert [r.step for r in rec.events(StepRecord)] == [1, 2, 3]
    assert rec.findings() == []


def test_torch_func_transforms_inside_and_outside_a_model_leave_the_monitor_on(rec: Recorder) -> None:
    """vmap/grad from torch.func run module calls on functorch's wrapper tensors; a reduction of ours
    under vmap has no batching rule and used to switch the monitor off for the rest of the run."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    class Ensemble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
                                         for _ in range(3))
            self.base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            params, buffers = stack_module_state(list(self.members))
            outs = vmap(lambda p, b: functional_call(self.base, (p, b), (x,)))(params, buffers)
            return outs.mean(0) + self.base(x)

    torch.manual_seed(0)
    model = Ensemble()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 8)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    base_params = dict(model.base.named_parameters())
    grads = grad(lambda p: functional_call(model.base, p, (x,)).pow(2).mean())(base_params)
    assert set(grads) == set(base_params)
    assert rec.inst.broken is None
    records = rec.events(StepRecord)
    assert [r.step for r in records] == [1, 2, 3]
    assert all(r.losses and math.isfinite(r.losses[0][1]) for r in records)
    assert rec.findings() == []


def test_a_dispatch_mode_of_the_script_sees_none_of_our_work(rec: Recorder) -> None:
    """Under a TorchDispatchMode (the script's own tool, or fake tensors) module calls go straight to
    torch: the mode sees the model's ops and none of the monitor's, and the monitor stays on."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)

    def step() -> list[str]:
        optimizer.zero_grad()
        with Ops() as ops:
            model(x).pow(2).mean().backward()
        optimizer.step()
        return ops.names

    monitored = [step(), step()]
    assert rec.inst.broken is None
    assert [r.step for r in rec.events(StepRecord)] == [1, 2]
    rec.inst.uninstall()
    try:
        plain = step()
    finally:
        rec.inst.install(torch)
    assert "aten.addmm.default" in plain
    assert monitored == [plain, plain]


def test_a_fault_of_the_monitor_switches_it_off_and_training_goes_on(rec: Recorder) -> None:
    """A bug in our own code during a module call: the call still returns torch's result, the monitor
    reports itself disabled and puts torch back as it was; later steps run unobserved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)

    def broken(*args: Any) -> int:
        raise KeyError("a bug of ours")

    rec.inst._measured = broken  # type: ignore[method-assign]
    expected = model[2](model[1](model[0](x)))
    out = model(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    optimizer.step()
    assert rec.inst.broken is not None and "a bug of ours" in rec.inst.broken
    assert getattr(nn_module.Module.__call__, "__tui_debug__", False) is False
    disabled = [f for f in rec.findings() if f.key == "monitor-disabled"]
    assert len(disabled) == 1 and disabled[0].category == "system_error"


# -- uninstall ----------------------------------------------------------------------------------------

def test_uninstall_removes_every_hook_and_patch() -> None:
    from tui_debug.instrument.hooks import _grad_scaler_type

    before = _hook_state()
    assert before["forward"] == 0 and before["forward_pre"] == 0
    orig_call = nn_module.Module.__call__
    orig_backward = torch.autograd.backward
    orig_scale = _grad_scaler_type().scale
    orig_update = _grad_scaler_type().update
    batches: list[list[Any]] = []
    inst = Instrumentation(DebugConfig(), batches.append)
    inst.install(torch)
    try:
        during = _hook_state()
        assert nn_module.Module.__call__ is not orig_call  # module calls are observed through a wrapper
        assert during["forward"] == 0 and during["forward_pre"] == 0  # not global hooks (torch's slow path)
        assert torch.autograd.backward is not orig_backward
        assert _grad_scaler_type().scale is not orig_scale
        assert _grad_scaler_type().update is not orig_update
    finally:
        inst.uninstall()
    assert _hook_state() == before
    assert nn_module.Module.__call__ is orig_call
    assert len(nn_module._global_forward_hooks) == 0
    assert len(nn_module._global_forward_pre_hooks) == 0
    assert torch.autograd.backward is orig_backward
    assert _grad_scaler_type().scale is orig_scale
    assert _grad_scaler_type().update is orig_update
    inst.uninstall()  # twice is harmless

    # Nothing is observed any more.
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    inst.finish()
    assert not [e for b in batches for e in b]


class InplaceLog(nn.Module):
    """Takes the log of its input in place (like ``nn.ReLU(inplace=True)`` does its ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(1e3).log_() if self.on else x


def test_nan_produced_in_place_is_blamed_on_that_module(rec: Recorder) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), InplaceLog(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 3):
        model[1].on = step == 2
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
    assert rec.findings(step=1) == []
    at_2 = rec.findings(step=2)
    blamed = [f.context.get("module") for f in at_2 if f.category in ("model_error", "input_validation")]
    assert blamed == ["model.1 (InplaceLog)"], [(f.category, f.message) for f in at_2]


# -- cheaper sentinels: finite-preserving modules, large activations -------------------------------------

def test_nan_after_relu_and_dropout_is_blamed_on_its_producer(rec: Recorder) -> None:
    """ReLU/Dropout outputs are not read (finite in -> finite out); attribution is unchanged, also for
    activations large enough to be reduced at once (sum) rather than in chunks."""
    model = nn.Sequential(nn.Linear(4, 16384), nn.ReLU(), nn.Dropout(0.1), NaNMaker(), nn.Linear(16384, 1))
    _train(model, steps=2, bad_step=2)
    assert rec.findings(step=1) == []
    blamed = [f.context["module"] for f in rec.findings(step=2) if f.category == "model_error"]
    assert blamed == ["model.3 (NaNMaker)"]


def _train_cnn(model: nn.Module, steps: int, on_step: Any) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, steps + 1):
        on_step(step)
        optimizer.zero_grad()
        loss = model(torch.randn(8, 3, 32, 32)).pow(2).mean()  # conv outputs: 131,072 values, summed at once
        loss.backward()
        optimizer.step()


def _conv_bn(nan_maker: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1)]
    layers += [NaNMaker(fresh=True)] if nan_maker else []
    return nn.Sequential(*layers, nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 32 * 32, 1))


def test_nan_fed_to_batchnorm_is_blamed_on_its_producer(rec: Recorder) -> None:
    """A large activation consumed by a training BatchNorm is not summed: the BatchNorm's running
    statistics tell its finiteness. The producer is still the one named, on its step; the sticky NaN
    left in the running statistics blames nobody on the healthy steps after it."""
    model = _conv_bn(nan_maker=True)
    _train_cnn(model, 4, lambda step: setattr(model[1], "on", step == 2))
    assert rec.findings(step=1) == []
    blamed = [f.context["module"] for f in rec.findings(step=2) if f.category in ("model_error", "input_validation")]
    assert blamed == ["model.1 (NaNMaker)"], rec.findings(step=2)
    assert not math.isfinite(float(model[2].running_mean.sum()))  # the NaN stays in the statistics
    for step in (3, 4):
        assert not [f for f in rec.findings(step=step) if f.category == "model_error"], rec.findings(step=step)


@pytest.mark.parametrize("poison", ["edit", "forward"])
def test_batchnorm_statistics_poisoned_between_steps_blame_nobody(rec: Recorder, poison: str) -> None:
    """After a healthy step the running statistics are known finite without a sync, as long as
    nothing touched them since. Poisoned between steps, by an in-place edit or by a training-mode
    forward under no_grad (which changes them without bumping their version), they are not taken as
    the conv output's sentinel: no healthy module is blamed."""
    model = _conv_bn(nan_maker=False)

    def on_step(step: int) -> None:
        if step != 3:
            return
        with torch.no_grad():
            if poison == "edit":
                model[1].running_var[2] = float("nan")
            else:
                model(torch.full((8, 3, 32, 32), float("nan")))

    _train_cnn(model, 3, on_step)
    assert not math.isfinite(float(model[1].running_var.sum()))
    assert rec.findings(step=1) == [] and rec.findings(step=2) == []
    assert not [f for f in rec.findings(step=3) if f.category in ("model_error", "input_validation")], \
        rec.findings(step=3)


def test_batchnorm_called_twice_in_a_step_keeps_each_calls_statistics(rec: Recorder) -> None:
    """A BatchNorm's statistics wait in the chunk after its forward; its next forward updates them in
    place (with no version bump), so they are read before it. Here the second call of the step gets
    NaN data: that is what is reported, not the first call's conv (whose output the statistics tell)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in (1, 2):
        optimizer.zero_grad()
        first = model(torch.randn(8, 3, 32, 32)).pow(2).mean()  # a conv output large enough to go to the BatchNorm
        second_input = torch.randn(1, 3, 32, 32)  # small: all of the second call's sentinels wait in the chunk
        if step == 2:
            second_input[0, 0, 0, 0] = float("nan")
        (first + model(second_input).pow(2).mean()).backward()
        optimizer.step()
    assert rec.findings(step=1) == []
    blamed = [(f.category, f.context["module"]) for f in rec.findings(step=2)
              if f.category in ("model_error", "input_validation")]
    assert blamed == [("input_validation", "model (Sequential)")], rec.findings(step=2)


def test_nan_weight_in_a_batchnorm_is_blamed_on_the_batchnorm(rec: Recorder) -> None:
    """Finite input, non-finite output: the BatchNorm itself (its affine parameters), not the conv
    before it nor the one after it."""
    model = _conv_bn(nan_maker=False)

    def poison(step: int) -> None:
        if step == 2:
            with torch.no_grad():
                model[1].weight[3] = float("nan")

    _train_cnn(model, 2, poison)
    assert rec.findings(step=1) == []
    blamed = [f.context["module"] for f in rec.findings(step=2) if f.category in ("model_error", "input_validation")]
    assert blamed == ["model.1 (BatchNorm2d)"], rec.findings(step=2)


def test_lazy_modules_are_instrumented_from_their_first_call(rec: Recorder) -> None:
    """LazyLinear/LazyBatchNorm have no parameter sizes before their first forward: counting them
    used to switch the whole instrumentation off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(1))
    model(torch.randn(8, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 3, 32, 32)).pow(2).mean().backward()
        optimizer.step()
    assert rec.inst.broken is None and rec.inst.step == 3
    assert rec.findings() == []
    assert [len(r.grad_names) for r in rec.events(StepRecord)] == [6, 6, 6]


class LogBetweenChildren(nn.Module):
    """A NaN made by functional code in the parent's forward, between two children."""

    def __init__(self, hidden: int = 8, inplace_after: bool = False) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, hidden), nn.ReLU(inplace=inplace_after), nn.Linear(hidden, 1)
        self.inplace_after = inplace_after
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace_after:  # fc1 -> log (functional) -> ReLU(inplace=True) -> fc2
            h = self.fc1(x)
            return self.fc2(self.act(torch.log(h - 1e3) if self.on else h))
        h = self.act(self.fc1(x))
        if self.on:
            h = torch.log(h - 1e3)
        return self.fc2(h)


@pytest.mark.parametrize("hidden,inplace_after", [(8, False), (70_000, True)],
                         ids=["small", "large-then-inplace-relu"])
def test_nan_from_functional_code_is_blamed_on_the_parent_not_the_next_child(
        rec: Recorder, hidden: int, inplace_after: bool) -> None:
    """Also when the next child changes the NaN tensor in place: its input is read before it runs."""
    torch.manual_seed(0)
    model = LogBetweenChildren(hidden, inplace_after)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 3):
        model.on = step == 2
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    blamed = [f.context["module"] for f in rec.findings(step=2) if f.category == "model_error"]
    assert blamed == ["model (LogBetweenChildren)"]


class Residual(nn.Module):
    """A transformer-style block: residual adds and F.relu between children, so a child's input is
    made by the parent's code from tensors already measured (derived, not read again)."""

    def __init__(self, d: int, where: str) -> None:
        super().__init__()
        self.fc1, self.bad, self.norm, self.fc2 = nn.Linear(d, d), NaNMaker(fresh=True), nn.LayerNorm(d), nn.Linear(d, d)
        self.where = where
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bad.on = self.on and self.where == "child"
        h = self.norm(x + self.bad(torch.relu(self.fc1(x))))
        if self.on and self.where == "parent":
            h = h + torch.log(h.detach().abs() * 0 - 1)  # NaN made by the parent's own code
        return self.fc2(torch.relu(h).reshape(h.shape))


@pytest.mark.parametrize("d", [8, 512], ids=["small", "large"])
@pytest.mark.parametrize("where,blamed", [("child", "model.1.bad (NaNMaker)"), ("parent", "model.1 (Residual)")])
def test_nan_through_residual_adds_and_functional_activations_is_blamed_on_its_maker(
        rec: Recorder, d: int, where: str, blamed: str) -> None:
    """The child's NaN reaches LayerNorm and fc2 through an add, F.relu and a reshape: they are not
    blamed. The parent's NaN (not made by a finite-preserving operation) is blamed on the parent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d), Residual(d, where), nn.Linear(d, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 3):
        model[1].on = step == 2
        optimizer.zero_grad()
        model(torch.randn(256, d)).pow(2).mean().backward()
        optimizer.step()
    assert rec.findings(step=1) == []
    assert [f.context["module"] for f in rec.findings(step=2) if f.category == "model_error"] == [blamed]


class Big16(nn.Module):
    """A finite float16 output of 40000 (float16 holds up to 65504)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(x) * 0 + 40000).half()


class AsFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * 1.0


class HalfResidual(nn.Module):
    """Two children's finite float16 outputs added by the parent: 40000 + 40000 overflows to inf."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.cast, self.head = Big16(), Big16(), AsFloat(), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cast(self.a(x) + self.b(x)))


def test_a_float16_sum_that_overflows_is_read_not_assumed_finite(rec: Recorder) -> None:
    torch.manual_seed(0)
    model = HalfResidual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.zero_grad()
    model(torch.randn(8, 4)).float().mean().backward()
    optimizer.step()
    blamed = [f.context["module"] for f in rec.findings(step=1) if f.category == "model_error"]
    assert blamed == ["model (HalfResidual)"]


class ReshapedConv(nn.Module):
    """A convolution whose output is regrouped before a BatchNorm: channel c of the BatchNorm mixes
    several of the convolution's channels, so their biases do not cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.bn(h.reshape(h.shape[0], 2, 4 * h.shape[2], h.shape[3]))


@pytest.mark.parametrize("model,x,redundant", [
    (lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), (16, 4), ["model.0.bias"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), (4, 3, 8, 8), ["model.0.bias"]),
    # (N, 8, 16) -> Linear -> (N, 8, 8): BatchNorm1d(8) takes dim 1 as channels, not the bias's features
    (lambda: nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)), (4, 8, 16), []),
    (ReshapedConv, (4, 3, 8, 8), []),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (4, 3, 8, 8), []),
], ids=["linear-bn1d", "conv-bn2d", "linear-3d-bn1d", "conv-reshaped-bn", "no-bias"])
def test_a_bias_that_batchnorm_cancels_is_named_once(rec: Recorder, model: Any, x: tuple[int, ...],
                                                      redundant: list[str]) -> None:
    from tui_debug.events import RedundantBias

    torch.manual_seed(0)
    model = model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(*x)).pow(2).mean().backward()
        optimizer.step()
    assert [e.parameter for e in rec.events(RedundantBias)] == redundant


def test_forwards_with_grad_and_no_backward_keep_no_graphs_alive(rec: Recorder) -> None:
    """An evaluation loop that forgets torch.no_grad(): memory stays flat. Each forward frees ~6 MiB of
    activations; sentinels kept unread across forwards pinned those holes in glibc's heap (RSS grew
    400-670 MiB over 100 forwards in some runs), and kept grad_fn nodes would keep the graphs."""
    import psutil

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(1024, 1024)
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    proc = psutil.Process()
    for i in range(120):
        if i == 20:
            before = proc.memory_info().rss
        model(x).sum().item()  # graph built, output dropped, no backward
    grown = proc.memory_info().rss - before
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB over 100 forwards"


def test_a_validation_pass_between_backward_and_step_keeps_the_steps_loss(rec: Recorder) -> None:
    """Ten forwards with gradients on and outputs dropped (a validation pass without no_grad) between
    backward and optimizer.step: their sentinels are let go, the step's loss is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        for _ in range(10):
            model(torch.randn(8, 4)).sum().item()
        optimizer.step()
    records = rec.events(StepRecord)
    assert [r.step for r in records] == [1, 2] and all(len(r.losses) == 1 for r in records)


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bad = nn.Linear(16, 16), NaNMaker(fresh=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.bad(torch.tanh(self.fc(h)) + 1e3 * self.bad.on)


def test_a_cell_called_step_by_step_keeps_every_steps_sentinels(rec: Recorder) -> None:
    """An RNN cell called 20 times per step (each call a model forward, outputs kept for the backward):
    a NaN made at the 3rd call is still named, although later calls run before the step's read."""
    torch.manual_seed(0)
    cell = Cell()
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.01)
    for step in range(1, 3):
        optimizer.zero_grad()
        h, outs = torch.zeros(4, 16), []
        for t in range(20):
            cell.bad.on = step == 2 and t == 2
            h = cell(h)
            outs.append(h)
        torch.stack(outs).sum().backward()
        optimizer.step()
    assert rec.findings(step=1) == []
    assert [f.context["module"] for f in rec.findings(step=2) if f.category == "model_error"] == ["cell.bad (NaNMaker)"]


class Spike(nn.Module):
    """A copy until switched on; then one output value is ``value``."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.value = float("inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return x * 1.0
        out = x.clone()
        out.view(-1)[7] = self.value
        return out


class ProvenChain(nn.Module):
    """A transformer block's shape with large activations (65,536 values): residual adds, dropout,
    LayerNorm and Linear. From the second step most outputs are not summed but proven finite by a
    later sum (see Instrumentation._settle)."""

    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.inp, self.attn, self.drop = nn.Linear(d, d), NaNMaker(fresh=True), nn.Dropout(0.1)
        self.norm1, self.ff, self.spike = nn.LayerNorm(d), nn.Linear(d, 2 * d), Spike()
        self.ff2, self.norm2, self.head = nn.Linear(2 * d, d), nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.norm1(h + self.drop(self.attn(h)))
        h = self.norm2(h + self.drop(self.ff2(torch.relu(self.spike(self.ff(h))))))
        return self.head(h)


@pytest.mark.parametrize("bad,value", [("model.attn (NaNMaker)", "nan"), ("model.spike (Spike)", "inf"),
                                       ("model.spike (Spike)", "-inf")])
def test_outputs_proven_finite_by_later_sums_still_name_the_first_bad_module(
        rec: Recorder, bad: str, value: str) -> None:
    """A NaN made in a module whose output is no longer summed (the LayerNorm and Linear after it
    would show it) is named on its step; so is an inf made before a ReLU (a finite output after a
    ReLU proves nothing, so that output is summed as before). A lone -inf, which the ReLU turns into
    0 (loss and gradients stay finite, the tensor is gone by the step's read), is told apart from a
    sum overflowing when it is summed."""
    torch.manual_seed(0)
    model = ProvenChain()
    model.spike.value = float(value)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    maker = model.attn if "attn" in bad else model.spike
    for step in range(1, 6):
        maker.on = step == 4
        optimizer.zero_grad()
        model(torch.randn(64, 4, 256)).pow(2).mean().backward()
        optimizer.step()
        if step == 3:  # the cheaper path is in use: outputs wait for their proof instead of a sum
            learned = {module_id for module_id, _ in rec.inst._defer_ok}
            names = {rec.inst.module_label(m) for m in model.modules() if id(m) in learned}
            assert {"model.attn (NaNMaker)", "model.inp (Linear)", "model.norm1 (LayerNorm)"} <= names
            assert "model.spike (Spike)" not in names
    assert [f for f in rec.findings() if f.step != 4] == []
    at_4 = rec.findings(step=4)
    assert [f.context["module"] for f in at_4 if f.category == "model_error"] == [bad], at_4


class SecondCallNaN(NaNMaker):
    """NaNMaker(fresh=True) whose NaN comes on its second call of a step only."""

    def __init__(self) -> None:
        super().__init__(fresh=True)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.log(x - 1e3) if self.on and self.calls % 2 == 0 else x * 1.0


class Raiser(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("fused kernel unavailable")


class Tricky(nn.Module):
    """``a`` makes a NaN (or a lone -inf) on the bad step, in ways that a shortcut could miss."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.a = SecondCallNaN() if case == "shared-module-then-inplace" else (
            Spike() if case == "-inf-then-inplace-relu" else NaNMaker(fresh=True))
        if case == "-inf-then-inplace-relu":
            self.a.value = float("-inf")
        self.fc, self.head = nn.Linear(256, 256), nn.Linear(256, 4)
        self.bn, self.ln, self.act, self.fast = nn.BatchNorm1d(256), nn.LayerNorm(256), nn.ReLU(inplace=True), Raiser()
        if case == "hook-cleans-output":
            self.fc.register_forward_hook(lambda mod, inp, out: torch.nan_to_num(out))
        if case == "hook-cleans-input":
            self.fc.register_forward_pre_hook(lambda mod, inp: (torch.nan_to_num(inp[0]),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        case = self.case
        if case == "cleaned-in-place-after":  # the proving sum reads a changed tensor
            y = self.fc(self.a(x))
            y.nan_to_num_()
            return self.head(y)
        if case == "batchnorm-beside":  # a BatchNorm's placeholder value in the proof chain
            h = self.fc(self.a(x))
            return self.head(self.ln(h + self.bn(h)))
        if case == "shared-module-then-inplace":  # one module, two places: a Linear, an in-place ReLU
            y = self.fc(self.a(x))
            return self.head(y + self.act(self.a(x + 1)))
        if case == "caught-exception":  # a fused path that raises, and a fallback
            h = self.a(x)
            try:
                h = self.fast(h)
            except RuntimeError:
                pass
            return self.head(self.fc(h))
        if case == "-inf-then-inplace-relu":
            return self.head(self.fc(self.act(self.a(x))))
        return self.head(self.fc(self.a(x)))  # hooks on fc


@pytest.mark.parametrize("case", ["cleaned-in-place-after", "batchnorm-beside", "shared-module-then-inplace",
                                  "caught-exception", "hook-cleans-output", "hook-cleans-input",
                                  "-inf-then-inplace-relu"])
def test_a_bad_output_is_named_whatever_happens_after_it(rec: Recorder, case: str) -> None:
    """The module that made the NaN (or -inf) is named on its step even when what comes after it
    hides it from later sums: an in-place clean-up, a user hook on the consuming Linear, a BatchNorm
    beside it, a second call of the same module, a caught exception, an in-place ReLU."""
    torch.manual_seed(0)
    model = Tricky(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(1, 6):
        model.a.on = step == 4
        optimizer.zero_grad()
        x = torch.randn(256, 256) if case == "batchnorm-beside" else torch.randn(64, 4, 256)
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert [f for f in rec.findings() if f.step != 4 and f.category != "optimization_error"] == []
    blamed = [f.context.get("module") for f in rec.findings(step=4) if f.category in ("model_error", "input_validation")]
    assert blamed == [f"model.a ({type(model.a).__name__})"], rec.findings(step=4)


def test_activation_checkpointing_recomputes_hold_nothing_through_backward(rec: Recorder) -> None:
    """A checkpointed segment's forward runs again inside backward, so that its activations can be
    freed as backward goes: none of them is held there waiting for a proof of finiteness (the
    forwards outside backward do wait)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = ProvenChain()
    optimizer = torch.optim.SGD(block.parameters(), lr=1e-3)
    held = {True: 0, False: 0}  # new waits, inside / outside backward
    resolve = rec.inst._resolve_hot

    def counting_resolve(reader: Any = None) -> None:
        before = len(rec.inst._deferred)
        resolve(reader)
        held[bool(rec.inst._in_backward)] += len(rec.inst._deferred) > before

    rec.inst._resolve_hot = counting_resolve  # type: ignore[method-assign]
    for _ in range(4):
        optimizer.zero_grad()
        x = torch.randn(64, 4, 256, requires_grad=True)
        checkpoint(block, x, use_reentrant=False).pow(2).mean().backward()
        optimizer.step()
    assert held[False] > 0 and held[True] == 0, held
    assert rec.findings() == []  # (also: the monitor was not switched off by a failure)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(64, 32), (4, 8, 64)), (lambda: nn.Linear(64, 1, bias=False), (16, 64)),
    (lambda: nn.LayerNorm(64), (4, 8, 64)), (lambda: nn.LayerNorm(64, elementwise_affine=False), (4, 8, 64)),
    pytest.param(lambda: nn.RMSNorm(64), (4, 8, 64), marks=pytest.mark.skipif(
        not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm is torch >= 2.4")), (lambda: nn.GroupNorm(4, 64), (4, 64, 8)),
    (lambda: nn.Dropout(0.5), (4, 8, 64)), (lambda: nn.Dropout(1.0), (4, 8, 64)),
    (lambda: nn.Dropout1d(0.5), (4, 64, 8)), (lambda: nn.Dropout2d(0.5), (4, 64, 8, 8)),
    (lambda: nn.Dropout3d(0.5), (2, 64, 2, 4, 4)), (lambda: nn.Flatten(), (4, 8, 64)),
    (lambda: nn.Unflatten(1, (8, 8)), (4, 64)), (lambda: nn.Identity(), (4, 64))],
    ids=["linear", "linear-no-bias", "layernorm", "layernorm-no-affine", "rmsnorm", "groupnorm", "dropout",
         "dropout-p1", "dropout1d", "dropout2d", "dropout3d", "flatten", "unflatten", "identity"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_modules_taken_to_pass_on_non_finite_inputs_do_so(make: Any, shape: tuple[int, ...], value: float) -> None:
    """What PROPAGATING_MODULES and PROPAGATING_SAFE rely on, for the installed torch: one non-finite
    input value, wherever it is, makes the output non-finite (also with zero weights: 0 x inf is NaN)."""
    from tui_debug.instrument import hooks

    module = make().train()
    assert type(module).__name__ in hooks.PROPAGATING_MODULES + hooks.PROPAGATING_SAFE
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.weight)
    for dtype in (torch.float32, torch.bfloat16):
        module = module.to(dtype)
        for where in (0, math.prod(shape) // 2 + 3, -1):
            x = torch.randn(*shape, dtype=dtype)
            x.view(-1)[where] = value
            y = module(x.requires_grad_())
            assert not bool(torch.isfinite(y).all()), (module, dtype, where, value)


def test_evaluation_under_inference_mode_between_steps_breaks_nothing(rec: Recorder) -> None:
    """Inference tensors have no version counter; the module calls that record one must not fail on
    them (an evaluation pass under torch.inference_mode() is common)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        with torch.inference_mode():
            assert model(torch.randn(8, 4)).shape == (8, 1)
    assert rec.inst.broken is None
    assert rec.findings() == []


def test_an_exception_in_a_module_run_without_hooks_still_names_it(rec: Recorder) -> None:
    """Finite-preserving leaves (Softmax here) run without hooks inside a model; the innermost module
    named for an exception raised in one is still that module."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Softmax(dim=3)))
    with pytest.raises(IndexError) as info:
        model(torch.randn(8, 4))
    assert rec.inst.failing_modules(info.value)[:2] == ["model.1.1 (Softmax)", "model.1 (Sequential)"]


class Huge(nn.Module):
    """Finite values so large that a sum of them overflows float32 (1e34 x 131072 > 3.4e38)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 16384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 0 + 1e34


class Shrink(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e-34


def test_a_sentinel_that_overflows_is_rechecked_not_reported(rec: Recorder) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Huge(), Shrink())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).mean().backward()
        optimizer.step()
    assert rec.findings() == []


# -- sampled-out (very fast) steps ----------------------------------------------------------------------

def test_sampled_out_steps_run_without_forward_hooks_and_still_name_a_failing_module(rec: Recorder) -> None:
    class Exploder(nn.Module):
        on = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.on:
                raise RuntimeError("shape mismatch in the block")
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), Exploder()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        optimizer.step()

    step()
    rec.inst._sampler.next = lambda observed, duration, hook_s=0.0: False  # every later step is sampled out
    step()
    assert not rec.inst._fwd_on  # module calls go straight to torch
    model[1][1].on = True
    with pytest.raises(RuntimeError) as info:
        model(torch.randn(8, 4))
    assert rec.inst._failing is None  # named from the traceback, not from a stack of observed calls
    assert rec.inst.failing_modules(info.value)[:2] == ["model.1.1 (Exploder)", "model.1 (Sequential)"]


def _nan_from_a_sampled_out_step(rec: Recorder) -> None:
    """Three steps, the second unchecked; NaNMaker makes NaN from the second on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), NaNMaker(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _sampled_out_second_step(rec)
    for step in (1, 2, 3):
        model[1].on = step >= 2
        optimizer.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        optimizer.step()


def test_a_nan_first_seen_on_a_sampled_out_step_is_named_on_it_by_a_replay_of_its_forward(rec: Recorder) -> None:
    """The NaN starts on a step that was not checked (its loss shows it, its forward was not
    observed): its read replays the model's call on the same inputs and weights, observed, and names
    the module on that step, saying how it was found."""
    _nan_from_a_sampled_out_step(rec)
    [named] = [f for f in rec.findings(step=2) if f.category == "model_error"]
    assert named.context["module"] == "model.1 (NaNMaker)" and named.context["replayed"] is True
    assert "replaying the step's forward" in named.message
    [loss] = [f for f in rec.findings(step=2) if f.category == "loss_error"]
    assert "sampled_out" not in loss.context and "the model_error finding names" in loss.recommendation
    assert not rec.inst._replay_log  # (the inputs are not held past the step)


def _sampled_out_second_step(rec: Recorder) -> None:
    decisions = iter([False, True, True])  # after step 1: step 2 unchecked, then checked again
    rec.inst._sampler.next = lambda observed, duration, hook_s=0.0: next(decisions)


def test_a_replay_runs_what_the_script_called_parts_of_a_model_and_under_its_autocast(rec: Recorder) -> None:
    """The calls kept for a replay are the step's outermost ones, whatever they are: a model's parts
    called by the script itself (``model.head(model.body(x))``), and each under the CPU autocast it ran
    in (an fp16 Linear overflowing to inf is not one in float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), NaNMaker()), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _sampled_out_second_step(rec)
    model(torch.randn(8, 4))  # (the model registered whole first)
    for step in (1, 2, 3):
        model[0][1].on = step >= 2
        optimizer.zero_grad()
        model[1](model[0](torch.randn(8, 4))).sum().backward()
        optimizer.step()
    [named] = [f for f in rec.findings(step=2) if f.category == "model_error"]
    assert named.context["module"] == "model.0.1 (NaNMaker)" and named.context["replayed"] is True

    amp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        amp[0].weight.fill_(300.0)
    optimizer = torch.optim.SGD(amp.parameters(), lr=0.0)
    rec.inst._sampler.alarm()
    _sampled_out_second_step(rec)
    for step in (1, 2, 3):
        x = torch.full((8, 4), 1.0 if step != 2 else 100.0)  # 4 x 300 x 100 = 120,000: over fp16's 65,504
        with torch.autocast("cpu", dtype=torch.float16):
            out = amp(x)
        optimizer.zero_grad()
        out.float().sum().backward()
        optimizer.step()
    last = rec.inst.step
    [named] = [f for f in rec.findings(step=last - 1) if f.category == "model_error"]
    assert named.context["module"] == "amp.0 (Linear)" and named.context["replayed"] is True


def test_a_replay_whose_modules_stay_finite_says_so_and_names_none(rec: Recorder) -> None:
    """The NaN is made by the script's code between the model and the loss: the replayed forward stays
    finite, so no module is named, and the loss finding says where to look instead of promising a
    module later."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _sampled_out_second_step(rec)
    for step in (1, 2, 3):
        optimizer.zero_grad()
        out = model(torch.randn(8, 4))
        (torch.log(out - 1e3) if step == 2 else out).sum().backward()
        optimizer.step()
    assert not [f for f in rec.findings(step=2) if f.category == "model_error"]
    [loss] = [f for f in rec.findings(step=2) if f.category == "loss_error"]
    assert loss.context["replayed_finite"] is True and loss.message.endswith("its forward, replayed, stayed finite)")
    assert "code between the model's output and the loss" in loss.recommendation
    assert rec.inst.replays == 0


def test_a_step_whose_kept_inputs_grow_large_keeps_none(rec: Recorder) -> None:
    """Gradient accumulation over large CPU batches: each micro-batch's input would be held until the
    step's read. Past 64 MiB beyond the first call's, the step keeps nothing (no replay for it), and
    what it held is let go at once."""
    from tui_debug.instrument.hooks import REPLAY_BYTES

    model = nn.Linear(1024, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _sampled_out_second_step(rec)
    optimizer.zero_grad()
    model(torch.randn(8, 1024)).sum().backward()
    optimizer.step()  # (step 1, checked: step 2 is not)
    optimizer.zero_grad()
    kept = []
    for _ in range(REPLAY_BYTES // (2048 * 1024 * 4) + 2):  # 8 MiB micro-batches
        model(torch.randn(2048, 1024)).sum().backward()
        kept.append(len(rec.inst._replay_log))
    assert kept[:2] == [1, 2] and kept[-1] == 0 and rec.inst._replay_full
    optimizer.step()
    assert not rec.inst._replay_full and not rec.inst._replay_log


def test_a_call_that_cannot_be_kept_for_a_replay_never_fails_the_forward(rec: Recorder) -> None:
    """Keeping a call reads its arguments (versions, sizes): whatever that raises, the script's forward
    goes on, the step is not replayed, and the monitor stays on."""

    def broken(*args: Any) -> None:
        raise ValueError("an argument we cannot read")

    rec.inst._record_call = broken
    _nan_from_a_sampled_out_step(rec)
    assert not rec.inst.broken and not rec.inst._replay_log
    assert not [f for f in rec.findings(step=2) if f.category == "model_error"]
    assert [f.context["module"] for f in rec.findings(step=3) if f.category == "model_error"] == ["model.1 (NaNMaker)"]


class TooBig(nn.Module):
    """Raises (KeyboardInterrupt: any exception) on batches over 4; the script catches it and splits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise KeyboardInterrupt("batch too big")
        return x


def test_a_call_that_raised_is_not_kept_by_the_fast_path(rec: Recorder) -> None:
    """The same on fast steps, whose fast path keeps the step's last model call: the call that raised
    is not it (its replay raised a KeyboardInterrupt out of optimizer.step() and ended the run); the
    call before it is, and names the module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), TooBig(), NaNMaker(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    armed = []
    for step in range(1, 61):
        if step == 2:  # sampling: no step checked from here on, unless something calls for it
            s = rec.inst._sampler
            s.every, s.next_probe, s.probe_left, s.budget = 1 << 40, 1 << 62, 0, 0.01
        model[2].on = step == 50
        x = torch.randn(8, 4)
        optimizer.zero_grad()
        out = model(x[:4])
        try:
            model(x)
        except KeyboardInterrupt:
            pass
        armed.append(rec.inst._fast.armed)
        out.sum().backward()
        optimizer.step()
    assert armed[49], armed  # (step 50's forward ran on the fast path)
    [named] = [f for f in rec.findings(step=50) if f.category == "model_error"]
    assert named.context["module"] == "model.2 (NaNMaker)" and named.context["replayed"] is True


def test_a_call_that_raised_is_not_replayed(rec: Recorder) -> None:
    """A model call that raised, and that the script caught (a batch too big, tried again in halves),
    is not the step's forward: the replay leaves it out (replayed, it raised again, and a
    KeyboardInterrupt came out of optimizer.step()), and the halves name the module."""
    torch.manual_seed(0)
    model = nn.Sequential(TooBig(), nn.Linear(4, 8), NaNMaker(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _sampled_out_second_step(rec)
    for step in (1, 2, 3):
        model[2].on = step >= 2
        optimizer.zero_grad()
        x = torch.randn(8, 4)
        try:
            out = model(x)
        except KeyboardInterrupt:
            out = torch.cat([model(x[:4]), model(x[4:])])
        out.sum().backward()
        optimizer.step()
    [named] = [f for f in rec.findings(step=2) if f.category == "model_error"]
    assert named.context["module"] == "model.2 (NaNMaker)" and named.context["replayed"] is True


def test_parameter_free_modules_called_per_sample_are_not_kept_for_a_replay(rec: Recorder) -> None:
    """A transform module applied to each sample in the training thread (a DataLoader without
    workers) is an outermost module call too: kept, 32 of them filled the step's 16 and no replay
    named the model's module."""
    torch.manual_seed(0)
    scale = NaNMaker(fresh=True)  # (parameter-free: x * 1.0)
    model = nn.Sequential(nn.Linear(4, 8), NaNMaker(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _sampled_out_second_step(rec)
    for step in (1, 2, 3):
        model[1].on = step >= 2
        batch = torch.stack([scale(torch.randn(4)) for _ in range(32)])
        optimizer.zero_grad()
        model(batch).sum().backward()
        optimizer.step()
    [named] = [f for f in rec.findings(step=2) if f.category == "model_error"]
    assert named.context["module"] == "model.1 (NaNMaker)" and named.context["replayed"] is True


def test_max_overhead_forward_0_observes_every_forward_and_keeps_no_call() -> None:
    """The opt-out: every slow forward observed, nothing kept for a replay, not even by the fast path
    (whose kept call costs the toy step ~1-2%)."""
    inst = Instrumentation(DebugConfig(max_overhead_forward=0.0), lambda batch: None)
    inst.install(torch)
    try:
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
        assert inst._roots and not inst._replay_roots and not inst._replay_ok
        assert inst._sampler.forward_next(True, 0.03, 0.003)  # (a 10% share: observed all the same)
    finally:
        inst.uninstall()


def test_a_nan_first_seen_on_a_sampled_out_step_is_named_on_the_next_with_that_step(rec: Recorder) -> None:
    """The NaN starts on a step that was not checked and no replay can name it (here: replays off;
    in a run, a fast step's armed path keeps no inputs, or the NaN does not come back): the next
    checked step names the module and says where the loss first went bad."""
    rec.inst._replay_ok = False
    _nan_from_a_sampled_out_step(rec)
    assert {f.category for f in rec.findings(step=2)} == {"loss_error", "gradient_error"}
    # and the loss finding says why no module is named on its step (its advice once pointed to a
    # model_error finding that a transient NaN, its step skipped, never gets)
    [loss] = [f for f in rec.findings(step=2) if f.category == "loss_error"]
    assert loss.message.endswith("(a sampled-out step: its forward was not checked)")
    assert loss.context["sampled_out"] is True
    assert "forward was not checked" in loss.recommendation
    assert "the model_error finding names the module" not in loss.recommendation
    named = [f for f in rec.findings(step=3) if f.category == "model_error"]
    assert [f.context["module"] for f in named] == ["model.1 (NaNMaker)"]
    assert named[0].context["loss_nonfinite_since_step"] == 2
    assert "first went non-finite at step 2" in named[0].message
    [checked] = [f for f in rec.findings(step=3) if f.category == "loss_error"]  # a checked step's
    assert "sampled_out" not in checked.context and "the model_error finding names" in checked.recommendation


def test_a_sampled_out_step_whose_loss_jumps_has_its_gradients_read(rec: Recorder) -> None:
    """A burst of bad batches (inputs x1000) on steps that fall between checks: the loss, read at
    every step, jumps, and that step's gradients are read after all, and the steps after it are
    checked whole. A 4-step burst of exploding gradients had fallen between checks (the gradient
    finding, which wants two steps over its threshold, never came; only the loss's did)."""
    from tui_debug.events import StepRecord
    from tui_debug.instrument.hooks import LOSS_JUMP_QUIET

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for step in range(1, 61):
        if step == 2:  # sampling: no step checked from here on, unless something calls for it
            s = rec.inst._sampler
            s.every, s.next_probe, s.probe_left, s.budget = 1 << 40, 1 << 62, 0, 0.01
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x * (1000.0 if step in (30, 31) else 1.0)), y).backward()
        optimizer.step()
    read = {r.step: r for r in rec.events(StepRecord) if r.grad_norms}
    assert not set(read) & set(range(3, 30)), sorted(read)  # steady losses call for nothing
    assert {30, 31} <= set(read) and set(range(30, 30 + LOSS_JUMP_QUIET)) <= set(read), sorted(read)
    assert min(read[30].grad_norms[0], read[31].grad_norms[0]) > 100 * read[1].grad_norms[0]
    assert not rec.findings(step=30) or all(f.severity != "error" for f in rec.findings(step=30))


def test_heavy_tailed_healthy_losses_do_not_keep_calling_for_checks(rec: Recorder) -> None:
    """Batch-1 training: most losses ~0.04, a hard sample's ~4 one step in 20. Against an average of
    the losses those cleared the 10x bar every ~100 steps (review, session 15), and a third of the
    steps were checked; against a decaying peak they do not."""
    import random

    rng = random.Random(0)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(1, 4)
    base = model(x).detach()
    s = rec.inst._sampler
    watched: list[int] = []
    real_watch = s.watch
    s.watch = lambda steps: (watched.append(rec.inst.step), real_watch(steps))  # type: ignore[method-assign]
    for step in range(1, 2001):
        if step == 2:  # sampling: 1 step in 50 checked
            s.every, s.next_probe, s.probe_left, s.budget = 50, 1 << 62, 0, 0.01
        hard = rng.random() < 0.05
        target = base + (2.0 if hard else 0.2) * (1 if rng.random() < 0.5 else -1) * rng.uniform(0.8, 1.2)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    # the first hard sample is a jump (nothing like it came before); the later ones are the run's
    # usual high, not jumps (against the average: ~20 in 2,000 steps)
    assert len(watched) <= 1, watched


def test_every_fast_step_is_counted_and_timed_when_most_are_sampled_out(tmp_path: Path) -> None:
    from tui_debug.errors import ErrorTracker
    from tui_debug.events import StepSpan
    from tui_debug.session import Session

    batches: list[list[Any]] = []
    config = DebugConfig(log_file=str(tmp_path / "debug.log"), error_file=str(tmp_path / "errors.log"))
    inst = Instrumentation(config, batches.append)
    inst.install(torch)
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for _ in range(3000):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            last_loss = loss.item()
        inst.finish()
    finally:
        inst.uninstall()
    events = [e for b in batches for e in b]
    checked = [e for e in events if isinstance(e, StepRecord) and e.losses]
    assert any(isinstance(e, StepSpan) for e in events), "a 0.3 ms step should be sampled"
    assert 0 < len(checked) < 3000
    session = Session(config, ErrorTracker(config))
    session.handle(events)
    assert session.steps == 3000
    assert session.step_times.count == 2999  # every step after the first has a duration
    (loss,) = session.losses.values()  # every step's loss counts, checked or not (the CPU read it anyway)
    assert loss.count == 3000 and loss.last == pytest.approx(last_loss) and loss.min <= loss.last


def test_actions_and_pause_reach_sampled_out_steps() -> None:
    """A sampled-out step runs no post-step hook; a queued action (or a pause) wakes it, and is
    applied at that step's boundary, in the training thread."""
    import queue
    import threading

    inst = Instrumentation(DebugConfig(), lambda batch: None)
    inst.actions = queue.SimpleQueue()
    inst._sampler.next_probe = 1 << 40
    inst._sampler.every = 1 << 30  # every step after the first is sampled out
    inst.install(torch)
    try:
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 4), torch.randn(8, 1)

        def step() -> None:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        for _ in range(40):
            step()
        assert inst._post_handle is None  # steady state: no Python after optimizer.step
        assert inst._fast.armed  # (the fast path's run of sampled-out steps: see _FastPath)
        applied: list[tuple[int, int]] = []
        inst.actions.put(lambda: applied.append((inst.step, threading.get_ident())))
        inst.wake = True  # what Monitor.request does
        step()
        assert applied == [(41, threading.get_ident())]
        step()
        assert inst._post_handle is None  # back to sleep once done

        for _ in range(30):
            step()
        assert inst._fast.armed
        inst.paused, inst.wake = True, True  # what Monitor.pause does
        inst.resume_event.clear()
        resumed = threading.Timer(0.3, lambda: (setattr(inst, "paused", False), inst.resume_event.set()))
        resumed.start()
        t0 = time.perf_counter()
        step()  # waits at this step's boundary until resumed
        assert time.perf_counter() - t0 >= 0.25 and inst.step == 73
    finally:
        inst.uninstall()


def _fast_path_run(tmp_path: Path, fast: bool, steps: int = 400, bad: dict[int, float] | None = None,
                   recover: str = "safe") -> tuple[dict[str, Any], int, list[float], list[Any]]:
    """A toy run that checks every 20th step (the sampler's timing decisions left out), with the fast
    path for runs of sampled-out steps on or off: what it leaves behind, the steps it ran armed,
    the script's losses, the events. ``bad``: step -> a factor for that step's input (inf, nan...)."""
    from tui_debug.errors import ErrorTracker
    from tui_debug.events import StepRecord
    from tui_debug.session import Session

    batches: list[list[Any]] = []
    config = DebugConfig(recover=recover, log_file=str(tmp_path / f"debug{fast}.log"),
                         error_file=str(tmp_path / f"errors{fast}.log"))
    inst = Instrumentation(config, batches.append)
    if not fast:
        inst._arm_fast = lambda st: None  # type: ignore[method-assign]
    sampler = inst._sampler
    sampler.every, sampler.next_probe = 20, 1 << 40
    sampler._decide = lambda steady=False: None  # type: ignore[method-assign]
    armed = 0
    losses: list[float] = []
    inst.install(torch)
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for step in range(1, steps + 1):
            armed += inst._fast.armed
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x * (bad or {}).get(step, 1.0)), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        inst.finish()
        (st,) = inst._opts.values()
    finally:
        inst.uninstall()
    events = [e for b in batches for e in b]
    session = Session(config, ErrorTracker(config))
    session.handle(events)
    (tracked,) = session.losses.values()
    state = {
        "steps": session.steps, "timed": session.step_times.count, "step": inst.step,
        "loss": (tracked.count, tracked.first, tracked.last, tracked.min, tracked.max, tracked.nonfinite),
        "read": sorted(e.step for e in events if isinstance(e, StepRecord) and e.grad_norms),
        "optimizer": (st.count, st.loss_seen, st.loss_high),
        "sampler": (sampler.n, sampler.since_check),
        "weights": [p.detach().tolist() for p in model.parameters()],
    }
    return state, armed, losses, events


def test_the_fast_path_for_runs_of_sampled_out_steps_leaves_what_the_long_way_leaves(tmp_path: Path) -> None:
    """Most toy steps run in the fast path (see _FastPath); the counts, losses, checked steps and
    the sampler's and optimizer's state are the long way's, to the last step."""
    fast, armed, losses, _ = _fast_path_run(tmp_path, fast=True)
    slow, armed_slow, losses_slow, _ = _fast_path_run(tmp_path, fast=False)
    assert armed > 250 and armed_slow == 0
    assert losses == losses_slow
    assert fast == slow
    assert fast["steps"] == fast["step"] == 400 and fast["timed"] == 399 and fast["loss"][0] == 400
    assert fast["read"] == [1] + list(range(21, 400, 20))  # (the sampler counts from the second step)


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), 1e4])
def test_a_bad_loss_on_a_step_of_the_fast_path_is_caught_on_that_step(tmp_path: Path, factor: float) -> None:
    """A non-finite loss (skipped, its gradients read) or a jumping one (its gradients read) in the
    middle of a run of sampled-out steps: handled on its own step, as the long way does."""
    step = 215  # (a sampled-out step, in the middle of a run of them)
    fast, armed, _, events = _fast_path_run(tmp_path, fast=True, steps=260, bad={step: factor})
    slow, _, _, _ = _fast_path_run(tmp_path, fast=False, steps=260, bad={step: factor})
    assert armed > 150
    assert step in fast["read"]
    assert fast == slow
    findings = [e for e in events if isinstance(e, FindingEvent) and e.severity == "error"]
    if factor != factor or factor == float("inf"):
        assert {f.category for f in findings if f.step == step} >= {"loss_error"}
        assert torch.isfinite(torch.tensor(fast["weights"][0])).all()  # the step was skipped
    else:
        assert not findings


def test_a_flush_from_another_thread_in_the_middle_of_a_fast_step_breaks_nothing(monkeypatch: Any) -> None:
    """The monitor's main thread flushes (a stopped run's last report) while the training thread is
    inside a fast step: the run is folded there, the step lands after it, and training, the step
    count and the final flush go on (review: an AttributeError reached optimizer.step())."""
    import threading

    inst = Instrumentation(DebugConfig(), lambda batch: None)
    s = inst._sampler
    s.every, s.next_probe = 20, 1 << 40
    s._decide = lambda steady=False: None  # type: ignore[method-assign]
    real = time.perf_counter
    due = {"now": False, "done": 0}

    def clock() -> float:  # the hook's clock, read after its checks: the other thread runs there
        if due["now"]:
            due["now"] = False
            other = threading.Thread(target=inst.flush)
            other.start()
            other.join()
            due["done"] += 1
        return real()

    monkeypatch.setattr(time, "perf_counter", clock)
    inst.install(torch)  # (the hook takes its clock here)
    monkeypatch.setattr(time, "perf_counter", real)
    try:
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for i in range(200):
            if i in (150, 170) and inst._fast.armed:
                due["now"] = True
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert due["done"] == 2 and inst.broken is None and inst.step == 200
        inst.finish()
        assert inst.broken is None
    finally:
        inst.uninstall()


def test_a_forked_child_does_not_wait_for_a_fast_path_lock_held_in_the_parent() -> None:
    """A DataLoader worker forked while the monitor's thread folds a run (its lock held): the child's
    hooks come off at once, it does not wait for a lock that no thread of its own will release."""
    import os
    import signal
    import threading

    inst = Instrumentation(DebugConfig(), lambda batch: None)
    inst.install(torch)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with inst._fast_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:  # the child: the fork hooks have run by now
            os._exit(0 if not inst._installed else 3)
        release.set()
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        release.set()
        holder.join()
        inst.uninstall()


def test_an_error_inside_the_fast_path_switches_the_monitor_off_not_the_training() -> None:
    class Loss(torch.Tensor):
        bad = False

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.Tensor.item and Loss.bad:
                raise TypeError("item() unsupported here")
            return super().__torch_function__(func, types, args, kwargs or {})

    inst = Instrumentation(DebugConfig(), lambda batch: None)
    s = inst._sampler
    s.every, s.next_probe = 20, 1 << 40
    inst.install(torch)
    try:
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for i in range(1, 101):
            if i == 75:
                assert inst._fast.armed
            Loss.bad = i == 75
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).as_subclass(Loss).backward()
            opt.step()  # never raises
        assert inst.broken == "TypeError: item() unsupported here"
    finally:
        Loss.bad = False
        inst.uninstall()


def test_a_grad_scaler_that_starts_in_a_fast_run_counts_its_skipped_steps_as_the_long_way(tmp_path: Path) -> None:
    """A GradScaler started mid-run (after an FP32 warm-up), whose first iterations overflow: its
    skipped iterations are told apart from the steps of the fast run before it (review: the run's
    steps were missing from the boundary count the scaler compares with, and 9 steps were taken for
    skipped ones)."""

    class InfGrad(torch.autograd.Function):  # finite outputs, gradients that overflow: a skipped step
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g * float("inf")

    def run(fast: bool) -> tuple[bool, dict[str, int]]:
        inst = Instrumentation(DebugConfig(log_file=str(tmp_path / "d.log"), error_file=str(tmp_path / "e.log")),
                               lambda batch: None)
        if not fast:
            inst._arm_fast = lambda st: None  # type: ignore[method-assign]
        s = inst._sampler
        s.every, s.next_probe = 20, 1 << 40
        s._decide = lambda steady=False: None  # type: ignore[method-assign]
        inst.install(torch)
        try:
            torch.manual_seed(0)
            model = nn.Linear(4, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            x, y = torch.randn(8, 4), torch.randn(8, 1)
            for _ in range(70):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            armed = inst._fast.armed
            scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
            for i in range(71, 81):
                opt.zero_grad()
                out = model(x)
                loss = nn.functional.mse_loss(InfGrad.apply(out) if i == 73 else out, y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            inst.finish()
            (st,) = inst._opts.values()
            return armed, {"step": inst.step, "skips": inst.scaler_skips, "count": st.count, "n": s.n,
                           "seen": st.loss_seen, "boundaries": inst._boundaries}
        finally:
            inst.uninstall()

    armed, fast = run(True)
    _, slow = run(False)
    assert armed
    assert fast == slow and fast["skips"] == 1 and fast["step"] == 79


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it is not on the CPU: drives the GPU path (no .item() per step)."""

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False


def test_a_sampled_out_gpu_steps_nan_loss_is_reported_with_its_own_step(tmp_path: Path) -> None:
    """On a GPU a sampled-out step's loss is not read at once (that would wait for the GPU): it rides
    on the next checked step's read, and a non-finite one is reported with the step it happened."""
    from tui_debug.errors import ErrorTracker
    from tui_debug.session import Session

    batches: list[list[Any]] = []
    config = DebugConfig(recover="off", log_file=str(tmp_path / "debug.log"),
                         error_file=str(tmp_path / "errors.log"))
    inst = Instrumentation(config, batches.append)
    inst._sampler.next_probe = 1 << 40  # the sampler's own decision is tested above: check every 3rd step
    inst._sampler.every = 3
    inst.install(torch)
    nan_step = None
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for i in range(1, 3001):
            inject = nan_step is None and i > 2000 and not inst._observe  # this step is sampled out
            if inject:
                nan_step = i
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * (float("nan") if inject else 1.0)
            loss.as_subclass(_OnDevice).backward()
            if inject:
                assert inst.step == i - 1  # nothing was read at the backward
            optimizer.step()
            if inject:
                with torch.no_grad():  # keep the run healthy after it (only the loss was NaN)
                    for p in model.parameters():
                        p.copy_(torch.nan_to_num(p))
        inst.finish()
    finally:
        inst.uninstall()
    assert nan_step is not None, "no step was sampled out"
    events = [e for b in batches for e in b]
    found = [f for f in events if isinstance(f, FindingEvent) and f.category == "loss_error"]
    assert [f.step for f in found] == [nan_step], [(f.step, f.message) for f in found]
    assert found[0].context["sampled_out"] and found[0].context["read_at_step"] > nan_step
    session = Session(config, ErrorTracker(config))
    session.handle(events)
    (loss_stats,) = session.losses.values()
    assert loss_stats.count == 3000 and loss_stats.nonfinite == 1


def test_sampler_checks_every_step_again_when_steps_slow_down() -> None:
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.05)
    checked = True
    for _ in range(200):  # fast steps whose checks cost half a step: sampled
        checked = s.next(checked, 0.0003 if checked else 0.0002)
    assert s.every > 1
    for _ in range(s.every * 4):
        checked = s.next(checked, 3 * _Sampler.FAST_S)  # now slow steps (over twice the threshold)
    assert s.every == 1 and checked


def test_sampler_resumes_sampling_soon_after_a_few_slow_steps() -> None:
    """Three slow checked steps in a row (a GC pause, a busy machine) switch back to checking every
    step, but only until the steps show they are fast again: not for the next 5,000 steps."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    checked = True
    for _ in range(300):  # checks cost 80% of a 0.3 ms step: sampled
        checked = s.next(checked, 0.00054 if checked else 0.0003)
    every = s.every
    assert every > 16, every  # a 2% budget allows up to 1 check in 64 steps
    slow = 0
    while slow < 3:  # the next three checked steps are slow
        was_checked = checked
        checked = s.next(checked, 3 * _Sampler.FAST_S if was_checked else 0.0003)
        slow += was_checked
    assert s.every == 1
    n_checked = 0
    for _ in range(400):
        n_checked += checked
        checked = s.next(checked, 0.00054 if checked else 0.0003)
    assert s.every > 16 and n_checked < 100, (s.every, n_checked)


def test_the_sampler_takes_steps_of_a_few_ms_but_not_the_cpus_longer_ones() -> None:
    """On a GPU a check is a fixed ~0.5 ms of launches: a 6 ms step it costs 30% of is sampled. On the
    CPU a check's hooks cost ~20 us a module: a batch-1 CNN's 1.6 ms step paid 21% for its checks
    (session 15), so a 3 ms step is sampled too; an 8 ms one, where checks cost in proportion to the
    step's data, is always checked."""
    from tui_debug.instrument.hooks import _Sampler

    for fast_s, step_s, sampled in ((_Sampler.FAST_S_GPU, 0.006, True), (_Sampler.FAST_S, 0.003, True),
                                    (_Sampler.FAST_S, 0.008, False)):
        s = _Sampler(0.05)
        s.fast_s = fast_s
        checked = True
        for _ in range(200):
            checked = s.next(checked, step_s * (1.3 if checked else 1.0))
        assert (s.every > 1) is sampled, (fast_s, step_s, s.every)


def test_slow_steps_whose_hooks_cost_a_lot_are_sampled_to_the_slow_budget() -> None:
    """An LSTM cell stepped through a sequence makes hundreds of module calls a step: its checks cost
    17-32% of 27-70 ms steps, which were all checked. Slow CPU steps whose hooks take over the slow
    budget (10%) of a step are checked one in k, so that checks (twice their hooks) cost about half
    of it, decided from the hooks' in-place time: no probe, so no step goes unchecked before the
    decision. Three slow checked steps in a row (the fast regime's sign of a slowdown) do not switch
    that back; hooks that get cheap (under half the budget) do, and a non-finite value does."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.01, 0.10)
    checked, n_checked, first_unchecked = True, 0, None
    for i in range(2000):  # 20 ms steps; a check costs 6 ms, 4 of them in the hooks (15% of its step)
        n_checked += checked and i >= 1000
        if not checked and first_unchecked is None:
            first_unchecked = i
        checked = s.next(checked, 0.026 if checked else 0.02, 0.004 if checked else 0.0)
    assert s.every == 7 and s.slow_sampling, s.every  # 2 x 15.4% / 5%
    assert first_unchecked == _Sampler.SLOW_WINDOW  # the steps before the decision all checked
    assert n_checked * 0.006 <= 0.05 * 1000 * 0.02  # what checks cost over those 1,000 steps
    assert [d["kind"] for d in s.decisions] == ["hooks"]
    (decision,) = s.decisions
    assert decision["budget"] == 0.10 and 0.15 < decision["hook_share"] < 0.16 and decision["every"] == 7
    for _ in range(300):  # the hooks get cheap (a shorter sequence): every step again
        checked = s.next(checked, 0.021 if checked else 0.02, 0.0008 if checked else 0.0)
    assert s.every == 1 and not s.slow_sampling and checked
    for _ in range(300):
        checked = s.next(checked, 0.026 if checked else 0.02, 0.004 if checked else 0.0)
    assert s.every == 7
    s.alarm()  # a non-finite value: every step, for a while
    for _ in range(500):
        assert s.next(True, 0.026, 0.004)
    assert s.every == 1


def test_a_slow_step_whose_forward_was_not_observed_has_it_replayed_and_its_module_named(tmp_path: Path) -> None:
    """Slow CPU steps are all read (loss, gradient norms), but when the forward's hooks cost more than
    max_overhead_forward, one forward in k is observed. A step that goes NaN in between has its forward
    replayed at its read, before the optimizer updates anything: the layer that made the NaN is named on
    that step, as an observed forward would have named it. The replay leaves no trace in the run: the
    BatchNorm statistics and the random number generator (Dropout draws in the replay) are as a plain
    ``python`` run leaves them, and a warning the forward gives again is not shown twice."""
    script = SCRIPTS / "nan_between_observed_forwards.py"
    (tmp_path / "td.toml").write_text("max_overhead_forward = 1e-9\n")  # any forward cost: 1 in 16 observed
    plain = subprocess.run([sys.executable, str(script), "41"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    proc = run_td("--headless", "--config", tmp_path / "td.toml", "--out", tmp_path / "run", script, "41",
                  cwd=tmp_path)
    assert proc.returncode == 0 and plain.returncode == 0, describe(proc)
    report = load_report(tmp_path / "run")
    (decision,) = [d for d in report["performance"]["sampler"]["decisions"] if d["kind"] == "forward"]
    assert decision["every"] == 16 and decision["step"] < 41, decision
    observed = report["performance"]["sampler"]["forward_observed_steps"]
    assert decision["step"] <= observed < decision["step"] + 3, report["performance"]  # (41: the replay's)
    (made,) = [e for e in report["errors"] if e["category"] == "model_error" and e["severity"] == "error"]
    assert made["step"] == 41 and made["message"].startswith("model.4 (LogBelow) produced a non-finite output"), made
    assert made["context"]["replayed"] is True and "replaying" in made["message"], made
    (loss,) = [e for e in report["errors"] if e["category"] == "loss_error"]
    assert loss["step"] == 41 and "sampled_out" not in loss["context"], loss
    after = [line for line in proc.stdout.splitlines() if line.startswith("AFTER ")]
    assert after == [line for line in plain.stdout.splitlines() if line.startswith("AFTER ")], (after, plain.stdout)
    warned = [line for line in proc.stderr.splitlines() if "LogBelow switched on" in line]
    assert warned == [line for line in plain.stderr.splitlines() if "LogBelow switched on" in line] and warned, warned


def test_slow_cpu_steps_observe_one_forward_in_k_by_the_forward_hooks_share() -> None:
    """The forward rule: after 16 forward-observed slow CPU steps, forwards are observed one in
    ceil(2 x share / max_overhead_forward) (at most 16); a share under half the budget keeps every
    forward; a non-finite value (alarm) observes every forward again for a while; fast steps, GPU steps
    and whole-step sampling (the hooks rule) leave forwards alone."""
    from tui_debug.instrument.hooks import _Sampler

    def run(s: _Sampler, steps: int, duration: float, fwd_s: float) -> list[bool]:
        seen, fwd = [], True
        for _ in range(steps):
            s.n += 1  # (as next() counts the step first)
            fwd = s.forward_next(fwd, duration, fwd_s if fwd else 0.0)
            seen.append(fwd)
        return seen

    s = _Sampler(0.01, 0.10, 0.005)
    seen = run(s, 16 + 160, 0.030, 0.0006)  # 2% of a 30 ms step: 2 x 2% / 0.5% = 8
    assert all(seen[:16]) and s.fwd_every == 8 and seen[16:].count(True) == 20, seen
    assert [d["kind"] for d in s.decisions] == ["forward"] and s.decisions[0]["every"] == 8
    s.alarm()  # every forward observed for the next 1,000 steps, then the rule decides again
    assert all(run(s, 999, 0.030, 0.0006)) and s.fwd_every == 1
    assert run(s, 40, 0.030, 0.0006).count(True) == 5 and s.fwd_every == 8
    cheap = _Sampler(0.01, 0.10, 0.005)
    assert all(run(cheap, 200, 0.030, 0.00003)) and cheap.fwd_every == 1  # 0.1%: every forward
    fast = _Sampler(0.01, 0.10, 0.005)
    assert all(run(fast, 200, 0.003, 0.0006)) and fast.fwd_every == 1  # fast steps: the probe's business
    gpu = _Sampler(0.01, 0.10, 0.005)
    gpu.fast_s = _Sampler.FAST_S_GPU
    assert all(run(gpu, 200, 0.030, 0.0006)) and gpu.fwd_every == 1
    off = _Sampler(0.01, 0.10, 0.0)
    assert all(run(off, 200, 0.030, 0.0006))


def test_the_hooks_own_time_reaches_the_sampler_with_each_checked_step(rec: Recorder) -> None:
    """What the slow-step decision goes by: the time the module hooks and the step's read took in
    place, part of the step's time, and nothing for a step whose forward was not observed."""
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[tuple[bool, float, float]] = []
    decide = iter([True, False, True, True])

    def record(observed: bool, duration: float, hook_s: float = 0.0) -> bool:
        seen.append((observed, duration, hook_s))
        return next(decide)

    rec.inst._sampler.next = record
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        optimizer.step()
    (_, _, first), (_, d2, h2), (obs3, _, h3), (_, d4, h4) = seen
    assert first > 0 and 0 < h2 < d2 and 0 < h4 < d4  # checked steps (the first has no duration yet)
    assert obs3 is False and h3 == 0.0  # sampled out: no hooks ran


def test_slow_steps_whose_checks_cost_a_few_percent_are_all_checked() -> None:
    """A CNN or a transformer on the CPU: its hooks take ~2% of a step (a smaller one's up to 8%),
    within the slow budget: every step is checked (the module named on its step) and none is taken
    out to probe. The same for a costly model when max_overhead_slow or max_overhead is 0."""
    from tui_debug.instrument.hooks import _Sampler

    for budget, slow_budget, check_s, hook_s in ((0.01, 0.10, 0.0006, 0.0004), (0.01, 0.10, 0.003, 0.0018),
                                                 (0.01, 0.0, 0.006, 0.004), (0.0, 0.10, 0.006, 0.004)):
        s = _Sampler(budget, slow_budget)
        for _ in range(6000):
            assert s.next(True, 0.02 + check_s, hook_s)
        assert not s.decisions and s.every == 1


def test_the_sampler_times_a_gpu_that_the_host_runs_ahead_of() -> None:
    """Until the launch queue fills, the host runs ahead of the GPU: an 8 ms GPU step "takes" its
    0.3 ms of launches, and a check's 0.3 ms of Python looks like doubling it. The probe's steps are
    timed by CUDA events too: a check that costs the GPU 1% is not sampled; one that costs the host's
    (GPU-idle, host-bound) step 100% still is."""
    from tui_debug.instrument.hooks import _Sampler

    for gpu_checked, gpu_unchecked, sampled in ((0.00808, 0.008, False), (0.0006, 0.0003, True)):
        s = _Sampler(0.03)
        s.fast_s = _Sampler.FAST_S_GPU
        marks: list[tuple[int, bool]] = []

        def durations() -> tuple[list[float], list[float]]:
            timed = [(n, obs) for (n0, _), (n, obs) in zip(marks, marks[1:]) if n == n0 + 1]
            marks.clear()
            return ([gpu_checked for _, obs in timed if obs], [gpu_unchecked for _, obs in timed if not obs])

        s.gpu_durations = durations
        checked, timed_steps = True, []
        for _ in range(200):
            if s.timed():
                marks.append((s.n + 1, checked))
                timed_steps.append(checked)
            checked = s.next(checked, 0.0006 if checked else 0.0003)  # the host's clock
        assert timed_steps.count(True) >= _Sampler.PROBE and timed_steps.count(False) == _Sampler.PROBE
        assert (s.every > 1) is sampled, (gpu_checked, s.every)


def test_the_sampler_counts_the_periodic_heavier_checks_once_it_samples() -> None:
    """Every 25th checked step also takes activation statistics, every 100th update ratios, and a
    snapshot comes now and then: a median of checked steps misses them, so checks cost more than the
    budget. Once sampling, the sampler decides again from means that count them (not GC pauses)."""
    from tui_debug.instrument.hooks import _Sampler

    def run(heavy: float, pause_every: int = 0) -> tuple[int, float]:
        s = _Sampler(0.02)
        s.fast_s = _Sampler.FAST_S_GPU
        checked, n_checked, spent, plain = True, 0, 0.0, 0.0
        for i in range(40_000):
            extra = 0.0
            if checked:
                n_checked += 1
                extra = 0.001 + (heavy if n_checked % 4 == 0 else 0.0)  # 1 ms a check, a quarter heavier
            pause = 0.05 if pause_every and i % pause_every == 0 else 0.0  # GC pauses, checked or not
            if i >= 10_000:
                spent, plain = spent + 0.005 + extra, plain + 0.005
            checked = s.next(checked, 0.005 + extra + pause)
        return s.every, spent / plain - 1

    every_light, cost_light = run(0.0)
    every_heavy, cost_heavy = run(0.002)  # the mean check costs 1.5 ms, the median one 1 ms
    # (within 10% of the budget: each probe decides by medians, and the steady means correct it
    # only RECHECK checked steps later; the medians alone gave 3%)
    assert every_light in (10, 11) and cost_light <= 0.022, (every_light, cost_light)
    assert every_heavy >= 15 and cost_heavy <= 0.022, (every_heavy, cost_heavy)
    every_paused, _ = run(0.0, pause_every=97)  # a 50 ms pause now and then is no check's cost
    assert every_paused == every_light, every_paused


def test_the_sampler_charges_a_check_with_what_it_leaves_to_the_next_steps() -> None:
    """A check slows the few steps after it too (its garbage, the caches it cooled: on the toy 176 us
    on its own step and 45 us over the next three). Compared with all unchecked steps, that part is
    spread thin and missed: checks costing twice what the sampler counted took 4% on a 2% budget."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    s.fast_s = _Sampler.FAST_S_GPU
    checked, since, spent, plain = True, 99, 0.0, 0.0
    for i in range(40_000):
        since = 0 if checked else since + 1
        extra = 0.001 if checked else (0.0004 if since <= 3 else 0.0)  # 1 ms, then 3 x 0.4 ms
        if i >= 10_000:
            spent, plain = spent + 0.005 + extra, plain + 0.005
        checked = s.next(checked, 0.005 + extra)
    steady = [d for d in s.decisions if d["kind"] == "steady"]
    assert steady and abs(steady[-1]["spill_s"] - 0.0012) < 0.0002, steady[-1]
    assert s.every >= 20 and spent / plain - 1 <= 0.022, (s.every, spent / plain - 1)


def test_a_probe_alternates_so_a_lag_after_the_checked_steps_does_not_make_checks_look_free() -> None:
    """On an H100 the transformer's first probe, 16 unchecked steps right after 32 checked ones, found
    the unchecked steps slower (6.3 against 5.2 ms): checks looked free, and every step was checked.
    A lag that follows the first checked steps (the launch queue filling, the consumer folding their
    records) must fall on checked and unchecked probe steps alike."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    s.fast_s = _Sampler.FAST_S_GPU
    checked = True
    for _ in range(300):
        n = s.n + 1  # the step ending now
        lag = 0.0013 if 33 <= n <= 48 else 0.0
        checked = s.next(checked, 0.005 + lag + (0.0012 if checked else 0.0))
    probe = s.decisions[0]
    assert probe["kind"] == "probe" and probe["every"] >= 10, probe  # 1.2 ms on 5 ms at 2%: 1 in 12


def test_a_probe_of_alternating_optimizers_times_each_of_them_both_ways() -> None:
    """A GAN steps D and G in turn: a probe alternating one step at a time would check only one of
    them and compare its steps with the other's. It alternates in runs of one step per optimizer."""
    from tui_debug.instrument.hooks import _Sampler

    for start in (0, 1):  # which optimizer's step the probe begins on
        s = _Sampler(0.02)
        s.fast_s = _Sampler.FAST_S_GPU
        s.optimizers = 2
        checked = True
        for i in range(start, 400 + start):
            base = 0.003 if i % 2 == 0 else 0.005  # D steps 3 ms, G steps 5 ms
            checked = s.next(checked, base + (0.001 if checked else 0.0))
        probe = s.decisions[0]
        assert probe["kind"] == "probe" and 9 <= probe["every"] <= 17, (start, probe)  # 1 ms on ~4 ms at 2%


def test_steps_that_become_fast_are_sampled_soon_after() -> None:
    """Steps that start slow (warm-up, autotuning) or sit at the threshold (a 0.95 ms GAN step) are
    looked at again a few hundred steps on, not 5,000: until then every step pays for its checks."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    checked, first_sampled = True, None
    for i in range(3000):
        base = 0.0012 if i < 1000 else 0.0006  # 1.2 ms, then 0.6 ms steps; checks cost 0.3 ms
        checked = s.next(checked, base + (0.0003 if checked else 0.0))
        if i >= 1000 and not checked and first_sampled is None:
            first_sampled = i
    assert first_sampled is not None and first_sampled < 1000 + 2 * _Sampler.FREE_REPROBE, first_sampled
    assert s.every > 1


def test_a_later_probe_does_not_undercut_the_steady_figure() -> None:
    """Part of a check's cost falls on the step after it (the toy: a probe measured 60 us where steady
    sampling measured 96 us). Alternating, a probe charges that part to its unchecked steps and takes
    checks for cheaper than they are; the last steady figure stands until the next steady decision."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    s.fast_s = _Sampler.FAST_S_GPU
    checked, after_check = True, False
    for _ in range(12_000):
        duration = 0.005 + (0.001 if checked else 0.0) + (0.0005 if after_check else 0.0)
        after_check = checked
        checked = s.next(checked, duration)
    probes = [d for d in s.decisions if d["kind"] == "probe"]
    steady = [d for d in s.decisions if d["kind"] == "steady"]
    assert len(probes) >= 2 and steady, s.decisions
    assert probes[0]["every"] < steady[0]["every"], (probes[0], steady[0])  # the first probe: too cheap
    assert probes[1]["every"] >= steady[0]["every"] - 1, (probes[1], steady)


def test_a_probe_that_finds_checks_free_is_repeated_soon() -> None:
    """A probe misled into finding checks free would leave every step checked until the next one,
    5,000 steps on: one that finds them free is repeated after 256 steps (then 512, ...)."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    s.fast_s = _Sampler.FAST_S_GPU
    checked = True
    for _ in range(400):
        # the first probe's unchecked steps are slowed by something else: checks look free
        slow = 0.002 if s.probe_left > 0 and not checked and not s.decisions else 0.0
        checked = s.next(checked, 0.005 + slow + (0.0012 if checked else 0.0))
    kinds = [(d["kind"], d["every"]) for d in s.decisions]
    assert kinds[0] == ("probe", 1) and ("probe", 1) != kinds[1] and kinds[1][1] >= 10, kinds
    assert s.decisions[1]["step"] - s.decisions[0]["step"] <= _Sampler.FREE_REPROBE + 2 * _Sampler.PROBE, kinds


def test_steps_that_run_faster_after_a_check_do_not_make_checks_look_free() -> None:
    """On an H100 (session 15) the CNN's unchecked steps right after a check ran faster than the
    others (the launch queue catching up on the time the check's step took): a steady decision
    charged the check a negative spill (-0.97 ms), found checks free, and every step was then
    checked until the next probe, thousands of steps on (a check costs half the step there)."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    s.fast_s = _Sampler.FAST_S_GPU
    checked, since, late_checked = True, 99, 0
    for i in range(20_000):
        since = 0 if checked else since + 1
        # a check adds 1 ms to its step; the 3 steps after one give 0.4 ms each back
        duration = 0.005 + (0.001 if checked else (-0.0004 if since <= 3 else 0.0))
        checked = s.next(checked, duration)
        late_checked += checked and i >= 10_000
    steady = [d for d in s.decisions if d["kind"] == "steady"]
    assert steady and all(d["every"] >= 5 for d in steady), steady
    assert late_checked <= 10_000 / 5, late_checked
    # A steady decision with nothing to compare (no unchecked step timed) checks every step, and is
    # probed again soon: while every step is checked no steady decision comes to correct it
    s.recent_skip.clear()
    s.next_probe, soon = s.n + 10**6, s.n + s.free_reprobe
    s._decide(steady=True)
    assert s.every == 1 and s.next_probe <= soon, (s.n, s.next_probe)


def test_the_samplers_fast_path_for_a_sampled_out_step_decides_as_next_does() -> None:
    """``skipped`` (the sampled-out step's few lines) must leave the sampler as ``next(False, d)``
    would, through warm-up, probes, steady decisions, slow spells and an alarm."""
    import random

    from tui_debug.instrument.hooks import _Sampler

    rng = random.Random(3)
    a, b = _Sampler(0.02), _Sampler(0.02)
    checked_a = checked_b = True
    for i in range(30_000):
        base = 0.0005 if (i // 3000) % 3 else 0.003  # fast spells and slow ones
        d = base * rng.uniform(0.8, 1.3) + (0.0002 if checked_a else 0.0)
        if i == 17_000:
            a.alarm(), b.alarm()
        checked_a = a.next(checked_a, d)
        checked_b = b.next(True, d) if checked_b else b.skipped(d)
        assert checked_a == checked_b, i
    assert [(d["kind"], d["every"]) for d in a.decisions] == [(d["kind"], d["every"]) for d in b.decisions]
    assert (a.n, a.every, a.next_probe, list(a.recent_skip)) == (b.n, b.every, b.next_probe, list(b.recent_skip))
    kinds = {d["kind"] for d in a.decisions}
    assert kinds == {"probe", "steady"} and max(d["every"] for d in a.decisions) > 5, a.decisions  # (sampled)


def test_a_probe_cut_by_a_re_install_starts_again() -> None:
    """A probe's unchecked steps on either side of a gap (the instrumentation uninstalled and
    installed again, as bench/workloads.py --ab does) would compare across it: it starts again."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.02)
    s.fast_s = _Sampler.FAST_S_GPU
    checked = True
    while s.probe_left == 0:
        checked = s.next(checked, 0.006 if checked else 0.005)
    s.next(checked, 0.005)
    s.restart_probe()
    assert s.probe_left == 0 and s.next_probe == s.n + 2  # a fresh timing window (one step) first
    decided = None
    for _ in range(4 * _Sampler.PROBE):
        checked = s.next(checked, 0.006 if checked else 0.005)
        if s.probe_left:
            decided = False
        elif decided is False:
            decided = True
            break
    assert decided and s.every > 1, (decided, s.every)


def test_the_sampler_decides_on_its_probe_not_on_unchecked_steps_of_long_ago() -> None:
    """Unchecked steps of an earlier, slower phase (another model, a bigger batch) must not make
    today's checks look free: a probe compares its own unchecked steps with recent checked ones."""
    from tui_debug.instrument.hooks import _Sampler

    s = _Sampler(0.03)
    s.fast_s = _Sampler.FAST_S_GPU
    checked = True
    for _ in range(100):  # phase 1: 7.5 ms steps whose checks cost 2 ms: sampled
        checked = s.next(checked, 0.0095 if checked else 0.0075)
    assert s.every > 1
    for _ in range(3 * s.every + 3):  # phase 2: another model, its first steps slow (cudnn autotuning)
        checked = s.next(checked, 0.05)
    assert s.every == 1
    for _ in range(100):  # then 2.6 ms steps whose checks cost 1.1 ms: sampled again after the next probe
        checked = s.next(checked, 0.0037 if checked else 0.0026)
    assert s.every > 10, s.every


def test_gpu_step_times_pair_consecutive_boundaries_of_one_device() -> None:
    """The CUDA events of a probe window become step times: each from the step's start mark (the last
    boundary) to its end mark, split by checked/unchecked; a gap (a window no probe followed) and a
    change of device are no step."""
    import types

    from tui_debug.config import DebugConfig
    from tui_debug.instrument.hooks import Instrumentation, _OptState

    clock = [0.0]

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t: float | None = None

        def record(self, stream: object) -> None:
            self.t = clock[0]

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: "Event") -> float:
            return (end.t - self.t) * 1e3  # milliseconds, as torch's

    cuda = types.SimpleNamespace(Event=Event, current_stream=lambda device: device)
    inst = Instrumentation(DebugConfig(), lambda batch: None)
    inst.torch = types.SimpleNamespace(cuda=cuda)
    gpu0, gpu1 = types.SimpleNamespace(type="cuda", index=0), types.SimpleNamespace(type="cuda", index=1)
    st = _OptState(0, None, [], devices=[gpu0], on_cpu=False)

    def boundary(observed: bool, step_s: float, n: int, device: object = gpu0) -> None:
        clock[0] += step_s
        st.devices = [device]
        inst._sampler.n = n - 1  # the step ending now is n
        inst._gpu_mark(observed, st)

    boundary(True, 0.010, 5)  # a window no probe followed: dropped at the gap below
    boundary(True, 0.010, 6)
    boundary(True, 0.008, 40)  # the first mark of a new window: no step time yet
    for n in range(41, 45):
        boundary(True, 0.008, n)
    boundary(False, 0.007, 45)
    boundary(False, 0.007, 46, gpu1)  # another device: its time is not this device's
    boundary(False, 0.007, 47, gpu1)
    checked, unchecked = inst._gpu_durations()
    assert [round(d, 6) for d in checked] == [0.008] * 4
    assert [round(d, 6) for d in unchecked] == [0.007, 0.007]
    assert inst._gpu_marks == [] and inst._gpu_durations() == ([], [])


class TinyLM(nn.Module):
    """The bench's transformer LM, smaller: torch's TransformerEncoder (containers run without hooks)
    over 65,536-value activations (large: summed, or held for a later sum's proof)."""

    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 128)  # 65,536 logits: large too

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(idx)))


@pytest.mark.parametrize("param,bad", [
    ("emb.weight", "model.emb (Embedding)"),
    ("encoder.layers.0.norm2.weight", "model.encoder.layers.0.norm2 (LayerNorm)"),
    ("encoder.layers.1.norm2.weight", "model.encoder.layers.1.norm2 (LayerNorm)"),
    ("encoder.layers.1.linear1.bias", "model.encoder.layers.1.linear1 (Linear)")])
def test_outputs_passing_through_torch_containers_still_name_the_first_bad_module(
        monkeypatch: pytest.MonkeyPatch, param: str, bad: str) -> None:
    """The embedding's and each layer's last output leave through TransformerEncoderLayer and
    TransformerEncoder (run without hooks) to the module that reads them, and wait there for a
    later sum's proof; a NaN put in their parameter before step 4 is still named on its module."""
    calls: collections.Counter[str] = collections.Counter()
    pre = Instrumentation._pre_hook

    def counting_pre(self: Instrumentation, *hook_args: Any) -> None:  # (no local names the module)
        calls[type(hook_args[0]).__name__] += 1
        pre(self, *hook_args)

    monkeypatch.setattr(Instrumentation, "_pre_hook", counting_pre)
    batches: list[list[Any]] = []
    rec = Recorder(Instrumentation(DebugConfig(), batches.append), batches)
    rec.inst.install(torch)
    try:
        _train_lm(rec, param, calls)
    finally:
        rec.inst.uninstall()
    assert [f for f in rec.findings() if f.step < 4] == []
    blamed = [f.context["module"] for f in rec.findings(step=4) if f.category in ("model_error", "input_validation")]
    assert blamed == [bad], rec.findings(step=4)


def _train_lm(rec: Recorder, param: str, calls: collections.Counter[str]) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    idx, target = torch.randint(0, 128, (8, 64)), torch.randint(0, 128, (8, 64))
    for step in range(1, 6):
        if step == 4:
            with torch.no_grad():
                model.get_parameter(param).view(-1)[0] = float("nan")
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(idx).reshape(-1, 128), target.reshape(-1)).backward()
        optimizer.step()
        if step == 3:  # the cheaper path is in use
            learned = {module_id for module_id, _ in rec.inst._defer_ok}
            names = {rec.inst.module_label(m) for m in model.modules() if id(m) in learned}
            assert {"model.emb (Embedding)", "model.encoder.layers.0.norm2 (LayerNorm)",
                    "model.encoder.layers.1.norm2 (LayerNorm)"} <= names, names
            assert calls["LayerNorm"] and not {"TransformerEncoder", "TransformerEncoderLayer"} & set(calls)


def _train_switched(model: nn.Module, before: Any, steps: int = 3) -> None:
    """``steps`` SGD steps on random (8, 4) inputs; ``before(step)`` runs before each."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, steps + 1):
        before(step)
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()


def test_a_container_whose_hook_changes_its_output_keeps_its_hooks(rec: Recorder) -> None:
    """A Sequential with a user hook runs hooked: the NaN its hook puts in the output is its own."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    state = {"on": False}
    inner.register_forward_hook(lambda mod, inp, out: torch.log(out - 1e3) if state["on"] else out)
    model = nn.Sequential(nn.Linear(4, 8), inner, nn.Linear(8, 1))
    _train_switched(model, lambda step: state.update(on=step == 2))
    blamed = [f.context["module"] for f in rec.findings(step=2) if f.category == "model_error"]
    assert blamed == ["model.1 (Sequential)"], rec.findings(step=2)


def test_an_exception_inside_a_transformer_layer_names_every_running_module(rec: Recorder) -> None:
    model = TinyLM()
    model.encoder.layers[1].linear2 = Raiser()
    with pytest.raises(RuntimeError) as info:
        model(torch.randint(0, 128, (2, 8)))
    assert rec.inst.failing_modules(info.value) == [
        "model.encoder.layers.1.linear2 (Raiser)", "model.encoder.layers.1 (TransformerEncoderLayer)",
        "model.encoder (TransformerEncoder)", "model (TinyLM)"]


class HeadAfterOwnCode(nn.Module):
    """The parent's own code makes the NaN, then hands it to a Sequential whose first child runs
    without hooks (a classifier head: dropout, then a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.bad = nn.Linear(4, 8), nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 1)), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.bad:
            h = h / torch.zeros_like(h) * 0
        return self.head(h)


class InplaceAfterBlock(nn.Module):
    """A container's large output changed in place by the parent (a ResNet-style ``out += h``)."""

    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(d, d), nn.Sequential(nn.Linear(d, d)), nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        out = self.block(h)
        out += h
        return self.head(out)


def test_a_container_without_hooks_still_measures_its_input(rec: Recorder) -> None:
    """What a container's hooks did, it still does: its input, made by its parent's code, is
    measured as it enters (the NaN is the parent's); a large output leaving it for its parent's code
    is summed on the way out (next test: the parent's in-place add would hide who made the NaN)."""
    model = HeadAfterOwnCode()
    _train_switched(model, lambda step: setattr(model, "bad", step == 2))
    blamed = [f.context["module"] for f in rec.findings(step=2) if f.category == "model_error"]
    assert blamed == ["model (HeadAfterOwnCode)"], rec.findings(step=2)


def test_a_containers_large_output_is_summed_before_its_parent_edits_it_in_place(rec: Recorder) -> None:
    torch.manual_seed(0)
    model = InplaceAfterBlock()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 256)
    for step in range(1, 5):
        if step == 3:
            with torch.no_grad():
                model.block[0].weight[0, 0] = float("nan")
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    blamed = [f.context["module"] for f in rec.findings(step=3) if f.category == "model_error"]
    assert blamed == ["model.block.0 (Linear)"], rec.findings(step=3)


def test_step_records_wait_for_the_next_backward_but_never_longer_than_one_more_slice(
        rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A due slice of fast steps is handed over as the next backward starts; an evaluation loop
    (no backward) gets it at its next module call once another slice has passed; a slow step at once.
    (The instrumentation's clock is the test's: on a loaded machine the real one made it depend on
    how fast a step ran.)"""
    import types

    from tui_debug.instrument import hooks

    now = [1000.0]
    monkeypatch.setattr(hooks, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)

    def step() -> None:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()

    step()
    rec.inst.flush()
    rec.inst._last_flush = now[0]
    handed = len(rec.batches)
    now[0] += 0.2  # a slice (0.15 s) later
    rec.inst._last_step_time = now[0]  # and the step was fast
    step()
    assert rec.inst._flush_due and len(rec.batches) == handed  # waiting for a backward
    with torch.no_grad():
        model(x)
    assert len(rec.batches) == handed  # an evaluation forward right away: still waiting
    now[0] += 0.15
    with torch.no_grad():
        model(x)  # one more slice later: handed over
    assert len(rec.batches) == handed + 1 and not rec.inst._flush_due
    assert any(isinstance(e, StepRecord) and e.step == 2 for e in rec.batches[-1])
    now[0] += 0.2
    rec.inst._last_step_time = now[0] - 0.2  # a slow step: at once
    step()
    assert len(rec.batches) == handed + 2 and not rec.inst._flush_due


def test_the_learning_rate_reported_is_the_current_one() -> None:
    """A scheduler (or a recovery action) changes the rate: the optimizer's record follows it."""
    from tui_debug.events import OptimizerEvent

    batches: list[list[Any]] = []
    inst = Instrumentation(DebugConfig(sample_fast_steps=False), batches.append)
    inst.install(torch)
    try:
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for _ in range(51):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        inst.finish()
    finally:
        inst.uninstall()
    events = [e for b in batches for e in b if isinstance(e, OptimizerEvent)]
    assert [round(math.log10(e.lr[0])) for e in events] == [-1, -2, -3, -4, -5, -6], events
    assert {e.index for e in events} == {0}


def test_time_waiting_for_the_user_is_no_steps_but_only_the_training_threads(rec: Recorder) -> None:
    """The script's input under the UI: the training thread's wait is taken out of its step's time;
    another thread's (a "press Enter to stop" reader) is none of the steps' business."""
    import threading

    inst = rec.inst
    inst._last_step_time, inst._sample_last, inst._step_end = 100.0, 100.0, None
    other = threading.Thread(target=inst.exclude_wait, args=(5.0,))
    other.start()
    other.join()
    assert (inst._last_step_time, inst._sample_last) == (100.0, 100.0)
    inst.exclude_wait(5.0)  # (the fixture's thread is the training thread)
    assert (inst._last_step_time, inst._sample_last) == (105.0, 105.0)


class SparseLookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.fc = nn.Linear(8, 1)
        self.poison = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self.emb(idx)
        out = self.fc(e)
        if self.poison:  # NaN in the embedding's gradient only: sqrt's gradient at a negative value
            out = out + torch.where(e > 100, torch.sqrt(e - 100), torch.zeros_like(e)).sum()
        return out


def test_a_nan_in_a_sparse_gradient_is_named_on_its_step_and_the_step_skipped(rec: Recorder) -> None:
    """An Embedding(sparse=True)'s gradient was left out of the norms: its NaN went unseen, the step
    was not skipped, and the table stayed NaN for the rest of the run."""
    torch.manual_seed(0)
    model = SparseLookup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 7):
        model.poison = step == 4
        optimizer.zero_grad()
        model(torch.randint(0, 50, (16,))).pow(2).mean().backward()
        optimizer.step()
    bad = [f for f in rec.findings() if f.category == "gradient_error"]
    assert len(bad) == 1 and bad[0].step == 4 and "model.emb.weight" in bad[0].message, bad
    assert rec.inst.skipped_steps == 1
    assert bool(model.emb.weight.isfinite().all())


def test_clipping_scales_a_sparse_gradient_itself(rec: Recorder) -> None:
    torch.manual_seed(0)
    model = SparseLookup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rec.inst.clip_norm = 1e-3
    for _ in range(3):
        optimizer.zero_grad()
        (model(torch.randint(0, 50, (16,))) * 1e3).pow(2).mean().backward()
        optimizer.step()
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)


class ScaleThenInplaceReLU(nn.Module):
    """Its own code scales the Linear's output in place (to inf on the bad step), then an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(8, 8), nn.ReLU(inplace=True)
        self.scale = 1.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        o = self.lin(h)
        o.mul_(self.scale)
        return self.act(o)


def test_a_nan_made_just_before_an_inplace_relu_is_put_on_the_code_that_made_it(rec: Recorder) -> None:
    """The ReLU's (small) input waited for its chunk's reduction while relu_ changed it: stale, so the
    inf was put on the ReLU, which cannot make one ("its input was not measured")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), ScaleThenInplaceReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(1, 6):
        model[1].scale = 1e39 if step == 4 else 1.0
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
    named = [f.context["module"] for f in rec.findings(step=4) if f.category == "model_error"]
    assert named == ["model.1 (ScaleThenInplaceReLU)"], rec.findings(step=4)


def test_jagged_nested_tensor_batches_leave_the_monitor_on(rec: Recorder) -> None:
    """A jagged batch's activations went into _foreach_norm, which has no kernel for them
    (NotImplementedError): the monitor switched itself off at the first step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        batch = torch.nested.nested_tensor([torch.randn(n, 4) for n in (2, 3, 5)], layout=torch.jagged)
        loss = torch.cat([o.pow(2).mean().reshape(1) for o in model(batch).unbind()]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert rec.inst.broken is None and rec.findings() == []
    assert rec.inst.step == 6


class InfOnce(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("inf") if self.on else x * 1.0


def test_a_gans_discriminator_fed_the_generators_output_is_not_told_its_data_is_bad(rec: Recorder) -> None:
    """D(fake.detach()) and D(fake) take G's output, not data: G's module is named, and no
    input_validation finding sends the user to the data pipeline."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), InfOnce(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    for step in range(1, 6):
        G[2].on = step == 4
        fake = G(torch.randn(16, 4))
        d_loss = bce(D(torch.randn(16, 2) + 3), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(D(fake), torch.ones(16, 1))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
    found = rec.findings()
    assert [f for f in found if f.category == "input_validation"] == [], found
    assert [f.context["module"] for f in found if f.category == "model_error"][:1] == ["G.2 (InfOnce)"], found


def test_an_optimizer_without_gradients_is_resolved_once_they_come(rec: Recorder) -> None:
    """A linear probe first (the backbone's features detached), then fine-tuning: the backbone's
    optimizer had no gradients for its first steps, then has them; the finding stops holding."""
    from tui_debug.errors import ErrorTracker
    from tui_debug.session import Session

    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Linear(16, 1)
    opt_b, opt_h = torch.optim.SGD(backbone.parameters(), lr=1e-3), torch.optim.SGD(head.parameters(), lr=1e-3)
    for i in range(10):
        features = backbone(torch.randn(8, 6))
        if i < 5:
            features = features.detach()
        opt_b.zero_grad()
        opt_h.zero_grad()
        head(features).pow(2).mean().backward()
        opt_b.step()
        opt_h.step()
    rec.inst.finish()
    config = DebugConfig()
    session = Session(config, ErrorTracker(config))
    session.handle([e for b in rec.batches for e in b])
    [found] = [f for f in session.tracker.snapshot() if f.category.value == "optimization_error"]
    assert found.key == "gradless|0" and found.resolved


def test_training_in_a_thread_of_the_scripts_own_is_monitored(rec: Recorder) -> None:
    """torch imported in one thread, the loop run in another: every call was ignored (0 steps, no
    finding). The thread of the first backward becomes the training thread."""
    import threading

    def train() -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(1, 8):
            x = torch.randn(8, 4)
            if step == 5:
                x[0, 0] = float("nan")
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()

    worker = threading.Thread(target=train, name="trainer")
    worker.start()
    worker.join()
    assert rec.inst.step == 7
    found = rec.findings()
    assert [(f.category, f.step) for f in found if f.severity == "info"] == [("system_error", 0)], found
    assert {f.category for f in found if f.step == 5} >= {"loss_error", "input_validation"}, found


def test_a_nan_loss_before_any_optimizer_step_is_reported_at_its_backward(rec: Recorder) -> None:
    """Parameters updated by hand beside an optimizer kept for zero_grad(): its backwards count as steps
    only after ACCUMULATION_MAX of them (they may be micro-batches), and until then a NaN loss went unseen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # only for zero_grad
    for i in range(1, 11):
        x = torch.randn(8, 4)
        if i == 6:
            x[0, 0] = float("nan")
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * torch.nan_to_num(p.grad)
    [found] = [f for f in rec.findings() if f.category == "loss_error"]
    assert found.context["backward"] == 6 and found.context["value"] == "nan", found


class DepthProbe(nn.Module):
    """Records the Python stack depth at each level of a recursion through module calls."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.lin, self.levels, self.depths = nn.Linear(4, 4), levels, []

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        import sys

        frame, depth = sys._getframe(), 0
        while frame is not None:
            depth, frame = depth + 1, frame.f_back
        self.depths.append(depth)
        return x if level == self.levels else self(torch.tanh(self.lin(x)), level + 1)


def test_a_module_call_costs_as_many_python_frames_as_under_plain_torch(rec: Recorder) -> None:
    """The wrapper called torch's _wrapped_call_impl: 4 frames a level against plain torch's 3, and a
    model nested ~200 deep hit the recursion limit where plain Python did not."""
    probe = DepthProbe(levels=3)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.01)
    for _ in range(2):  # the second step is checked as the first, with every hook
        probe.depths.clear()
        optimizer.zero_grad()
        probe(torch.randn(2, 4)).pow(2).mean().backward()
        optimizer.step()
    monitored = [b - a for a, b in zip(probe.depths, probe.depths[1:])]
    rec.inst.uninstall()
    probe.depths.clear()
    probe(torch.randn(2, 4))
    plain = [b - a for a, b in zip(probe.depths, probe.depths[1:])]
    assert monitored == plain == [3, 3, 3], (monitored, plain)


def test_outputs_beyond_the_sentinel_cap_are_said_once_not_silently_left_out() -> None:
    """8 Linears and max_sentinels_per_step=3: a NaN made in the 7th was named by no finding, and nothing
    said that most outputs were not checked."""
    batches: list[list[Any]] = []
    inst = Instrumentation(DebugConfig(max_sentinels_per_step=3), batches.append)
    inst.install(torch)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(8)])
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for _ in range(4):
            optimizer.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            optimizer.step()
        inst.finish()
    finally:
        inst.uninstall()
    said = [e for b in batches for e in b if isinstance(e, FindingEvent) and e.key == "sentinels-capped"]
    assert len(said) == 1 and said[0].context["max_sentinels_per_step"] == 3, said
    assert said[0].context["unchecked_outputs"] > 0 and "max_sentinels_per_step" in said[0].recommendation


ENCODER = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))  # a module-level model


class HeadOverEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(ENCODER(x))  # not a submodule: a model used inside another's forward


def test_a_model_called_only_inside_another_models_forward_is_named(rec: Recorder) -> None:
    """Its parameters were optimizer0.param2... and its NaN was put on "Linear", with no path."""
    torch.manual_seed(0)
    model = HeadOverEncoder()
    optimizer = torch.optim.SGD(list(model.parameters()) + list(ENCODER.parameters()), lr=1e-3)
    saved = ENCODER[2].weight.detach().clone()
    try:
        for step in range(1, 8):
            if step == 5:
                with torch.no_grad():
                    ENCODER[2].weight[0, 0] = float("nan")
            optimizer.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            optimizer.step()
    finally:
        with torch.no_grad():
            ENCODER[2].weight.copy_(saved)
    named = [f.context.get("module") for f in rec.findings(step=5) if f.category == "model_error"]
    assert named == ["ENCODER.2 (Linear)"], rec.findings(step=5)
    assert rec.events(StepRecord)[-1].grad_names[-4:] == ["ENCODER.0.weight", "ENCODER.0.bias", "ENCODER.2.weight",
                                                          "ENCODER.2.bias"]


def test_losses_taking_turns_at_one_optimizer_are_filed_under_their_own_names_on_sampled_out_steps(
        rec: Recorder) -> None:
    """loss_a on even steps, loss_b on odd ones: a sampled-out step's loss was filed under the loss of
    the optimizer's last checked step, so their counts and extremes mixed, and loss_b's NaN was
    reported as loss_a's."""
    from tui_debug.errors import ErrorTracker
    from tui_debug.session import Session

    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for i in range(3000):
        optimizer.zero_grad()
        if i % 2 == 0:
            loss_a = (model(x) - y).pow(2).mean()
            loss_a.backward()
        else:
            loss_b = (model(x) - y).abs().mean() * 10
            if i == 2501:
                loss_b = loss_b * float("nan")
            loss_b.backward()
        optimizer.step()
    rec.inst.finish()
    assert rec.inst._observed_steps < 1500, "the steps were not sampled: the test tests nothing"
    config = DebugConfig(enable_file_output=False, enable_console_output=False)
    session = Session(config, ErrorTracker(config))
    session.handle([e for b in rec.batches for e in b])
    stats = {s.name: s for s in session.losses.values()}
    assert stats["loss_a"].count == stats["loss_b"].count == 1500
    assert stats["loss_a"].max < stats["loss_b"].min, (stats["loss_a"], stats["loss_b"])  # never mixed
    nan = [f for f in rec.findings(step=2502) if f.category == "loss_error"]
    assert [f.context["loss"] for f in nan] == ["loss_b"], nan
