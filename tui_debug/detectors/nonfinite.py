"""Non-finite loss, gradients and activations, named by loss, parameter and first producing module.

Runs in the training thread on the values the step already read (no device access of its own),
and only when the step's values are not all finite, so healthy steps pay one ``sum``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from ..events import FindingEvent


# A module call in completion (post-)order: (module, input sentinel index or -1, output sentinel index).
ActivationCall = tuple[Any, int, int]


@dataclasses.dataclass
class StepObservation:
    step: int
    losses: list[tuple[str, float]]
    grad_names: list[str]
    grad_norms: list[float]
    sentinels: list[float | None]  # None: modified in place after it was measured (unknown)
    calls: list[ActivationCall]
    module_label: Callable[[Any], str]
    root_inputs: list[tuple[Any, int, str]]  # (module, sentinel index, "input" | "target" of a loss)
    forward_checked: bool = True  # False: a sampled-out step, read for its non-finite loss
    replay_finite: bool = False  # its forward was replayed and its modules made nothing non-finite


_BAD_INPUT = ("Check the data pipeline: NaN/Inf in the dataset or produced by a transform (normalisation by "
              "a zero std, log of zero).")
_BAD_TARGET = ("Check the labels in the data pipeline, or the code that computes the target if it is not "
               "data (a teacher or EMA model run without gradients, a target transform).")


def _kind(value: float) -> str:
    return "nan" if value != value else ("inf" if value > 0 else "-inf")


class NonFiniteDetector:
    """NaN/Inf in the loss (loss_error), gradients (gradient_error) or activations (model_error)."""

    def _bad_parameters(self, module: Any, label: str) -> list[str]:
        """The module's own parameters and buffers that are not finite: a weight gone bad (an earlier
        step wrote it, or it was loaded so) is the cause, not the forward's arithmetic. CPU modules only:
        there the step is read before the optimizer steps; a GPU step's values arrive a step late, when
        the optimizer may have written this step's NaN into weights that were finite for the forward."""
        try:
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            tensors = [(n, t) for n, t in tensors if t.is_floating_point() and t.numel()]
            if any(not t.is_cpu for _, t in tensors):
                return []
            return [n for n, t in tensors if not bool(t.detach().isfinite().all())]
        except Exception:  # a module we cannot read is still named
            return []

    def check(self, obs: StepObservation) -> list[FindingEvent]:
        findings: list[FindingEvent] = []
        for name, value in obs.losses:
            if not math.isfinite(value):
                if obs.forward_checked:
                    where, note, extra = "the model_error finding names the module", "", {}
                elif obs.replay_finite:
                    where = ("the model's modules made nothing non-finite when this step's forward was "
                             "replayed: look at the code between the model's output and the loss, and at "
                             "what else the loss is given; dropout's other masks in the replay can also hide it")
                    note = " (a sampled-out step: its forward, replayed, stayed finite)"
                    extra = {"sampled_out": True, "replayed_finite": True}
                else:
                    where = ("this step's forward was not checked, as checks are sampled: every step is from "
                             "here on, and a model_error finding names a module that does it again")
                    note, extra = " (a sampled-out step: its forward was not checked)", {"sampled_out": True}
                findings.append(FindingEvent(
                    severity="error", category="loss_error", step=obs.step, key=f"nonfinite-loss|{name}",
                    message=f"loss '{name}' is {_kind(value)}" + note,
                    context={"loss": name, "value": _kind(value)} | extra,
                    recommendation=f"Find where the loss first went non-finite ({where}); lower the learning "
                                   "rate, add gradient clipping, or guard log/div/sqrt against zero and "
                                   "negative inputs."))
        bad = [(n, v) for n, v in zip(obs.grad_names, obs.grad_norms) if not math.isfinite(v)]
        if bad:
            names = [n for n, _ in bad]
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            findings.append(FindingEvent(
                severity="error", category="gradient_error", step=obs.step, key=f"nonfinite-grad|{names[0]}",
                message=f"non-finite gradient ({_kind(bad[0][1])}) in {names[0]}{more}",
                context={"parameters": names[:50], "count": len(bad), "of": len(obs.grad_names)},
                recommendation="Skip steps with non-finite gradients (--recover safe does), clip gradients "
                               "(torch.nn.utils.clip_grad_norm_), or use a GradScaler with mixed precision."))
        finding = self._activation(obs)
        if finding is not None:
            findings.append(finding)
        return findings

    def _activation(self, obs: StepObservation) -> FindingEvent | None:
        sent = obs.sentinels
        if all(v is None or math.isfinite(v) for v in sent):
            return None
        for module, in_idx, out_idx in obs.calls:
            out = sent[out_idx]
            if out is None or math.isfinite(out):
                continue
            inp = sent[in_idx] if in_idx >= 0 else None
            if inp is not None and not math.isfinite(inp):
                continue  # passed on, not produced here
            label = obs.module_label(module)
            where = "from a finite input" if inp is not None else "(its input was not measured)"
            context: dict[str, Any] = {"module": label, "value": _kind(out)}
            source = _forward_source(module)
            if source is not None:
                context["forward"] = source
                where += f" (its forward: {os.path.basename(source)})"
            bad_params = self._bad_parameters(module, label)
            if bad_params:
                context["nonfinite_parameters"] = bad_params
                where += f": its {', '.join(bad_params[:3])} {'is' if len(bad_params) == 1 else 'are'} non-finite"
            return FindingEvent(
                severity="error", category="model_error", step=obs.step, key=f"nonfinite-activation|{label}",
                message=f"{label} produced a non-finite output ({_kind(out)}) {where}",
                context=context,
                recommendation=f"Inspect {label}: its weights may have blown up (lower the learning rate, "
                               "clip gradients) or its forward divides, exponentiates or takes a log "
                               "without a guard.")
        for module, idx, role in obs.root_inputs:
            if sent[idx] is not None and not math.isfinite(sent[idx]):
                label = obs.module_label(module)
                what = "the target given to" if role == "target" else "the input to"
                return FindingEvent(
                    severity="error", category="input_validation", step=obs.step,
                    key=f"nonfinite-{role}|{label}",
                    message=f"{what} {label} contains {_kind(sent[idx])} values",
                    context={"module": label, "argument": role},
                    recommendation=_BAD_TARGET if role == "target" else _BAD_INPUT)
        return None


def _forward_source(module: Any) -> str | None:
    """``file:line`` of the module's forward (the code to look at), when it is Python's (torch.compile's
    wrapper: the forward of the model it runs)."""
    module = getattr(module, "_orig_mod", module)
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    return None if code is None else f"{code.co_filename}:{code.co_firstlineno}"
