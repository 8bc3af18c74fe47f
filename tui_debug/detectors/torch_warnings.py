"""PyTorch's warnings of silent training bugs, as findings (the script's output still shows them).

A warning is printed once per place and scrolls away with the output, yet some say that the run
computes something else than was meant: a loss broadcasting its target over its input, a scheduler
stepped before its optimizer, a softmax over a dimension torch guessed, a GradScaler switched off.
What shows a warning is wrapped (``warnings._showwarnmsg``), chained to what it was, so what Python
prints is unchanged; a script that filters warnings out (or turns them into errors) gets no finding
from them.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from typing import Any, Callable

from ..events import FindingEvent
from ..instrument import naming


# (pattern of the warning's text, what it means) -> severity, category, name, message, recommendation
Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], tuple[str, str, str, str, str]]]

RULES: list[Rule] = [
    (re.compile(r"Using a target size \(torch\.Size\((\[[^\]]*\])\)\) that is different to the input size "
                r"\(torch\.Size\((\[[^\]]*\])\)\)"),
     lambda m: ("warning", "loss_error", "loss-broadcast",
                f"the loss broadcasts its target {m[1]} against its input {m[2]}: it compares every output "
                "with every target, not each with its own",
                "Give both the same shape: out.squeeze(-1) for an (N, 1) output against (N,) targets, or "
                "target.unsqueeze(-1). The loss still decreases, toward the wrong optimum.")),
    (re.compile(r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"),
     lambda m: ("warning", "optimization_error", "scheduler-order",
                "lr_scheduler.step() was called before optimizer.step(): the schedule's first value is skipped",
                "Call optimizer.step() first, then scheduler.step(). (Under a GradScaler whose first steps are "
                "skipped for overflow this is expected, and harmless.)")),
    (re.compile(r"Implicit dimension choice for (\w+) has been deprecated"),
     lambda m: ("info", "model_error", f"implicit-dim-{m[1]}",
                f"{m[1]} without dim=: torch guesses the dimension from the input's number of dimensions, and "
                "for 0-, 1- and 3-dimensional inputs normalises over dimension 0 (the batch for 3-d)",
                f"Pass dim= to {m[1]} (dim=-1 for the classes of (N, C) or (N, T, C) logits).")),
    (re.compile(r"GradScaler is enabled, but CUDA is not available\.\s+Disabling"),
     lambda m: ("warning", "optimization_error", "scaler-disabled",
                "the GradScaler is disabled (CUDA is not available): losses are not scaled, so float16 "
                "gradients can underflow to zero",
                "On the CPU use torch.amp.GradScaler('cpu'), or bfloat16 autocast, which needs no scaling.")),
    (re.compile(r"This DataLoader will create (\d+) worker processes in total\. Our suggested max number of "
                r"worker in current system is (\d+)"),
     lambda m: ("info", "data_error", "dataloader-workers",
                f"the DataLoader starts {m[1]} worker processes on a machine with {m[2]} CPUs for them: they "
                "compete for the cores (slower batches, more memory, possibly a hang)",
                f"Use num_workers={m[2]} or fewer.")),
    (re.compile(r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
     lambda m: ("info", "gradient_error", "nonleaf-grad",
                "the .grad of a tensor that is not a leaf was read: it is None, autograd keeps the gradients "
                "of leaves (parameters) only",
                "Call .retain_grad() on that tensor before backward(), or read the parameter's .grad.")),
    (re.compile(r"RNN module weights are not part of single contiguous chunk of memory"),
     lambda m: ("info", "model_error", "rnn-weights",
                "an RNN's weights are not in one contiguous chunk: cuDNN copies them at every call",
                "Call rnn.flatten_parameters() after moving or replicating the model.")),
]


class TorchWarnings:
    """Findings from the warnings of ``RULES``, at most one per rule and place (then coalesced)."""

    def __init__(self, emit: Callable[[list[Any]], None], step: Callable[[], int]) -> None:
        self._emit = emit
        self._step = step
        self._orig: Any = None
        self._library_codes: dict[Any, bool] = {}
        self._lock = threading.Lock()
        self._fork_hook = False
        self._active = False
        self._attr = "_showwarnmsg"

    def install(self) -> None:
        """Wraps ``warnings._showwarnmsg``, which every shown warning goes through (C ``_warnings``
        included) whatever ``showwarning`` is: ``logging.captureWarnings(True)`` replaces that one
        without chaining. (A Python without it: ``showwarning``.)"""
        if self._orig is not None:
            return
        self._attr = "_showwarnmsg" if callable(getattr(warnings, "_showwarnmsg", None)) else "showwarning"
        self._orig = orig = getattr(warnings, self._attr)
        self._active = True

        def shown(*args: Any, **kwargs: Any) -> Any:
            if self._active:
                try:
                    msg = args[0] if args else None
                    text = str(getattr(msg, "message", msg)) if self._attr == "_showwarnmsg" else str(msg)
                    self.observe(text, sys._getframe(1))
                except Exception:  # never in the way of the warning itself
                    pass
            return orig(*args, **kwargs)

        shown.__wrapped__ = orig  # type: ignore[attr-defined]
        setattr(warnings, self._attr, shown)
        if not self._fork_hook:  # a forked child (a DataLoader worker) has no consumer to emit to
            os.register_at_fork(after_in_child=self.uninstall)
            self._fork_hook = True

    def uninstall(self) -> None:
        """Puts the original back; a wrapper of the script's above ours keeps ours, which goes quiet."""
        self._active = False
        if self._orig is not None and getattr(getattr(warnings, self._attr, None), "__wrapped__", None) is self._orig:
            setattr(warnings, self._attr, self._orig)
        self._orig = None

    def observe(self, text: str, frame: Any = None) -> FindingEvent | None:
        for pattern, make in RULES:
            m = pattern.search(text)
            if m is None:
                continue
            severity, category, name, message, recommendation = make(m)
            where = self._script_line(frame)
            context: dict[str, Any] = {"warning": text.split("\n", 1)[0][:300]}
            if where:
                context["source"] = where
                message += f" (at {where})"
            finding = FindingEvent(severity=severity, category=category, step=self._step(),
                                   key=f"warning|{name}|{where}", message=message, context=context,
                                   recommendation=recommendation)
            self._emit([finding])
            return finding
        return None

    def _script_line(self, frame: Any) -> str:
        """``file:line`` of the first frame outside torch and the standard library: the script's call."""
        with self._lock:
            while frame is not None:
                code = frame.f_code
                lib = self._library_codes.get(code)
                if lib is None:
                    lib = self._library_codes[code] = naming.is_library_frame(code)
                if not lib:
                    return f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
                frame = frame.f_back
        return ""
