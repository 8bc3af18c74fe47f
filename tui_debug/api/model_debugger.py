"""``ModelDebugger``: checked forward passes and training steps, parameter analysis."""

from __future__ import annotations

import collections
import math
import time
from typing import Any

from ..config import DebugLevel
from ..errors import ErrorCategory, ErrorInfo, ErrorSeverity
from . import _common
from .debugger import Debugger

MAX_MODEL_STATES = 100


class StepFailed(RuntimeError):
    """A training step that could not run; already tracked as a finding (not counted again)."""


class ModelDebugger:
    """The design document's ``ModelDebugger(debugger)``.

    - ``debug_model_forward(model, input, expected_output_shape=None)``: NaN/Inf in the input ->
      ``input_validation``; a shape mismatch, or NaN/Inf in the output -> ``model_error``; returns the output.
    - ``debug_training_step(model, optimizer, loss_fn, data, target)``: one checked step; returns the loss.
    - ``analyze_model_parameters(model)``: per parameter ``shape``, ``dtype``, ``requires_grad``,
      ``has_nan``, ``has_inf``, ``norm``, ``mean``, ``std``, ``min``, ``max``; kept in ``model_states``.

    Differences from the design document, on purpose:

    - one device read per call: the training step stacks the loss, the max |x| of the inputs, targets
      and outputs, and every gradient norm into one tensor read once (the document calls ``.item()``
      and ``isnan().any()`` per tensor, a GPU sync each);
    - a step whose loss or gradients are not finite is NOT applied (``optimizer.step()`` is skipped and the
      gradients cleared, as AMP's GradScaler does), so one bad batch cannot destroy the parameters; the
      finding names the root cause once: bad data (``input_validation``, also for NaN targets), then a
      non-finite model output (``model_error``), then the loss (``loss_error``), then the gradients
      (``gradient_error``);
    - a loss that is not a scalar, or that does not require grad (a model with no trainable parameters),
      is a clear finding instead of autograd's error;
    - ``model_states`` keys are unique (``"<label>#<n>"``, not a timestamp that can collide), each value
      is ``{"timestamp", "step", "parameters": <the analysis>}``, and only the last 100 analyses are kept.
    """

    def __init__(self, debugger: Debugger | None = None) -> None:
        self.debugger = debugger if debugger is not None else Debugger()
        self.model_states: dict[str, dict[str, Any]] = collections.OrderedDict()
        self._n_states = 0

    # -- forward ------------------------------------------------------------------------------------
    def debug_model_forward(self, model: Any, input_data: Any, expected_output_shape: Any = None) -> Any:
        dbg = self.debugger
        if not dbg.enabled():
            return model(input_data)
        torch = dbg.torch
        with dbg.debug_context("model_forward"):
            ins = [t for t in _common.iter_tensors(input_data, torch.Tensor) if _common.is_float(t)]
            output = model(input_data)
            outs = [t for t in _common.iter_tensors(output, torch.Tensor) if _common.is_float(t)]
            values = _common.read(torch, _common.max_abs(torch, ins + outs))
            in_bad = _first_bad(values[:len(ins)])
            out_bad = _first_bad(values[len(ins):])
            covered = _common.monitor_covers(dbg.monitor, "activation")
            if in_bad is not None:
                self._report_input(model, "input", in_bad, covered)
            elif out_bad is not None:
                self._report_output(model, out_bad, covered)
            if expected_output_shape is not None:
                self._check_shape(model, output, expected_output_shape)
            return output

    def _check_shape(self, model: Any, output: Any, expected: Any) -> None:
        got = getattr(output, "shape", None)
        if got is None or tuple(got) != tuple(expected):
            self.debugger.report(
                f"{type(model).__name__} output shape mismatch: expected {tuple(expected)}, got "
                f"{tuple(got) if got is not None else type(output).__name__}",
                ErrorSeverity.ERROR, ErrorCategory.MODEL_ERROR,
                {"check": "shape", "expected": list(expected), "got": list(got) if got is not None else None},
                key=f"api-shape|{type(model).__name__}|{tuple(expected)}|{tuple(got) if got is not None else None}",
                recommendation="Check the model's last layer and any reshape/view/flatten against the "
                               "target's shape.")

    def _report_input(self, model: Any, what: str, value: float, covered: bool,
                      extra: dict[str, Any] | None = None) -> ErrorInfo:
        return self.debugger.report(
            f"the {what} fed to {type(model).__name__} contains {_common.kind(value)}",
            ErrorSeverity.ERROR, ErrorCategory.INPUT_VALIDATION,
            {"check": f"nonfinite_{what}", "value": _common.kind(value), **(extra or {})},
            key=f"api-nonfinite-{what}|{type(model).__name__}", covered=covered,
            step=(extra or {}).get("step"),  # the training step's, as its loss finding (not the last one done)
            recommendation="Clean the data: look for NaN/Inf in the dataset or a transform (division by a "
                           "zero std, log of 0); the batch was skipped.")

    def _report_output(self, model: Any, value: float, covered: bool,
                       extra: dict[str, Any] | None = None) -> ErrorInfo:
        return self.debugger.report(
            f"{type(model).__name__} produced a non-finite output ({_common.kind(value)}) from a finite input",
            ErrorSeverity.ERROR, ErrorCategory.MODEL_ERROR,
            {"check": "nonfinite_output", "value": _common.kind(value), **(extra or {})},
            key=f"api-nonfinite-output|{type(model).__name__}", covered=covered, step=(extra or {}).get("step"),
            recommendation="Parameters or activations overflowed: lower the learning rate, clip gradients, "
                           "guard log/div/sqrt/exp in the forward, or run python -m tui_debug to name the layer.")

    # -- training step ------------------------------------------------------------------------------
    def debug_training_step(self, model: Any, optimizer: Any, loss_fn: Any, data: Any, target: Any,
                            *, record_loss: bool = True) -> float:
        """zero_grad, forward, loss, backward, checks, step; returns the loss value (float).

        ``record_loss``: also append the loss to ``debug_data["losses"]`` (``debug_training_loop``
        records every 10th batch; every step's loss is checked regardless). Raises what the step
        raised (tracked once), or ``StepFailed`` for a loss that cannot be backpropagated.
        """
        dbg = self.debugger
        if not dbg.enabled():
            optimizer.zero_grad()
            loss = loss_fn(model(data), target)
            loss.backward()
            optimizer.step()
            dbg.step += 1
            return float(loss.item())
        rm = dbg.recovery_manager
        if rm is not None:
            rm.begin_step(model, optimizer)
        finite = False
        try:
            with dbg.debug_context("training_step"):
                value, finite = self._step(model, optimizer, loss_fn, data, target, record_loss)
            return value
        finally:
            if rm is not None:
                rm.end_step(finite)

    def _step(self, model: Any, optimizer: Any, loss_fn: Any, data: Any, target: Any,
              record_loss: bool) -> tuple[float, bool]:
        dbg = self.debugger
        torch = dbg.torch
        T = torch.Tensor
        step = dbg.step + 1
        optimizer.zero_grad(set_to_none=True)
        ins = [t for t in _common.iter_tensors(data, T) if _common.is_float(t)]
        tgts = [t for t in _common.iter_tensors(target, T) if _common.is_float(t)]
        output = model(data)
        outs = [t for t in _common.iter_tensors(output, T) if _common.is_float(t)]
        loss = loss_fn(output, target)
        if not isinstance(loss, T):
            self._fail(f"loss_fn returned {type(loss).__name__}, not a tensor", ErrorCategory.LOSS_ERROR,
                       {"type": type(loss).__name__}, "api-loss-not-tensor",
                       "Return a tensor from the loss function (not loss.item()).")
        if loss.numel() != 1:
            self._fail(f"the loss is not a scalar (shape {tuple(loss.shape)}): backward needs one value",
                       ErrorCategory.LOSS_ERROR, {"shape": list(loss.shape)}, f"api-loss-shape|{tuple(loss.shape)}",
                       "Reduce the loss to one value (.mean() or .sum(), or reduction='mean' in the loss "
                       "module).")
        if not loss.requires_grad:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad) if hasattr(model, "parameters") else 0
            why = ("the model has no trainable parameters" if n == 0 else
                   "the graph was cut (no_grad, .detach() or .item() on the way)")
            self._fail(f"the loss does not require grad: {why}", ErrorCategory.TRAINING_ERROR,
                       {"trainable_parameters": n}, "api-loss-no-grad",
                       "Make sure the loss is computed from the model's output with grad enabled and that "
                       "the model has parameters with requires_grad=True.")
        loss.backward()
        names = {id(p): n for n, p in model.named_parameters()} if hasattr(model, "named_parameters") else {}
        params = [p for g in optimizer.param_groups for p in g["params"]
                  if p.grad is not None and not p.grad.is_sparse]
        grads = [p.grad for p in params]
        norms = _common.grouped_norms(torch, grads) if grads else []
        scalars = [loss.detach().reshape(())]
        scalars += _common.max_abs(torch, ins + tgts + outs)
        scalars += norms
        values = _common.read(torch, scalars)  # the step's one host read
        value = values[0]
        k = 1
        in_v, k = values[k:k + len(ins)], k + len(ins)
        tgt_v, k = values[k:k + len(tgts)], k + len(tgts)
        out_v, k = values[k:k + len(outs)], k + len(outs)
        norm_v = values[k:]
        bad_in, bad_tgt, bad_out = _first_bad(in_v), _first_bad(tgt_v), _first_bad(out_v)
        bad_grads = [i for i, v in enumerate(norm_v) if not math.isfinite(v)]
        if bad_grads:  # an L2 norm of finite values can overflow: confirm with max |g| (bad steps only)
            confirm = _common.read(torch, _common.max_abs(torch, [grads[i] for i in bad_grads]))
            bad_grads = [i for i, v in zip(bad_grads, confirm) if not math.isfinite(v)]
        finite = (math.isfinite(value) and bad_in is None and bad_tgt is None and bad_out is None
                  and not bad_grads)
        ctx = {"step": step, "loss_value": value if math.isfinite(value) else _common.kind(value)}
        if not finite:
            optimizer.zero_grad(set_to_none=True)  # skip the step: parameters stay as they were
            dbg.skipped_steps += 1
            ctx["action"] = "optimizer step skipped"
            mon = dbg.monitor
            if bad_in is not None:
                self._report_input(model, "input", bad_in, _common.monitor_covers(mon, "activation"), ctx)
            elif bad_tgt is not None:
                self._report_input(model, "target", bad_tgt, False, ctx)
            elif bad_out is not None:
                self._report_output(model, bad_out, _common.monitor_covers(mon, "activation"), ctx)
            elif not math.isfinite(value):
                dbg.observe_loss(value, step, record=record_loss, covered=_common.monitor_covers(mon, "loss"),
                                 extra=ctx)
            else:
                names_bad = [names.get(id(params[i]), f"param{i}") for i in bad_grads]
                dbg.report_bad_gradients(names_bad, "nan/inf", total=len(params), extra=ctx)
            return value, False
        rm = dbg.recovery_manager
        total = math.sqrt(sum(v * v for v in norm_v)) if norm_v else 0.0
        if rm is not None:
            rm.state.recent_total_norms.append(total)
            clip = rm.state.clip_norm
            if clip is not None and grads and total > clip:
                torch._foreach_mul_(grads, clip / (total + 1e-6))  # clip with the norms already read
        optimizer.step()
        dbg.step = step
        dbg.observe_loss(value, step, record=record_loss)
        if dbg.config.enable_gradient_tracking:
            if dbg.enabled(DebugLevel.VERBOSE):
                dbg.track_gradients(model)
            elif dbg.enabled(DebugLevel.DETAILED):
                dbg.debug_data["gradients"] = {names.get(id(p), f"param{i}"): {"norm": v}
                                               for i, (p, v) in enumerate(zip(params, norm_v))}
            dbg.debug_data["grad_total_norm"] = total
        return value, True

    def _fail(self, message: str, category: ErrorCategory, context: dict[str, Any], key: str,
              recommendation: str) -> None:
        info = self.debugger.report(message, ErrorSeverity.ERROR, category, context, key=key,
                                    recommendation=recommendation)
        exc = StepFailed(message)
        _common.mark_tracked(exc, info)
        raise exc

    # -- parameters ---------------------------------------------------------------------------------
    def analyze_model_parameters(self, model: Any, label: str | None = None) -> dict[str, dict[str, Any]]:
        """Statistics of every parameter (one device read); a non-finite parameter is a ``model_error``.

        Under ``DebugLevel.NONE`` nothing is computed and ``{}`` is returned.
        """
        dbg = self.debugger
        if not dbg.enabled():
            return {}
        named = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
        analysis: dict[str, dict[str, Any]] = {}
        if named:
            stats = _common.tensor_stats(dbg.torch, [p for _, p in named], full=True)
            for (name, p), s in zip(named, stats):
                entry = {"shape": list(p.shape), "dtype": str(p.dtype), "requires_grad": bool(p.requires_grad),
                         "has_nan": False, "has_inf": False, "norm": None, "mean": None, "std": None,
                         "min": None, "max": None}
                entry.update(s)
                analysis[name] = entry
        bad = [n for n, e in analysis.items() if e["has_nan"] or e["has_inf"]]
        if bad:
            what = "nan" if analysis[bad[0]]["has_nan"] else "inf"
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            dbg.report(f"parameter {bad[0]}{more} contains {what}", ErrorSeverity.ERROR, ErrorCategory.MODEL_ERROR,
                       {"check": "nonfinite_parameter", "parameters": bad[:50], "count": len(bad)},
                       key=f"api-nonfinite-param|{bad[0]}",
                       recommendation="The parameters are lost: roll back to a checkpoint (recover='auto' "
                                      "does) and lower the learning rate or clip gradients.")
        self._n_states += 1
        key = f"{label or 'analysis'}#{self._n_states}"
        self.model_states[key] = {"timestamp": time.time(), "step": dbg.step, "parameters": analysis}
        while len(self.model_states) > MAX_MODEL_STATES:
            self.model_states.pop(next(iter(self.model_states)))  # type: ignore[call-arg]
        return analysis


def _first_bad(values: list[float]) -> float | None:
    for v in values:
        if not math.isfinite(v):
            return v
    return None
