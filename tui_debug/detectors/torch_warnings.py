"""PyTorch's warnings of silent training bugs, as findings (the script's output still shows them).

A warning is printed once per place and scrolls away with the output, yet some say that the run
computes something else than was meant: a loss broadcasting its target over its input, a scheduler
stepped before its optimizer, a softmax over a dimension torch guessed, a GradScaler switched off.
``warnings.showwarning`` is wrapped, chained to whatever it was, so what Python prints is unchanged;
a script that filters warnings out (or turns them into errors) gets no finding from them.
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

_STDLIB = os.path.dirname(os.__file__) + os.sep  # (warnings.py and the like: not the script's call)

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

    def install(self) -> None:
        if self._orig is not None:
            return
        self._orig = warnings.showwarning
        orig = self._orig

        def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                        file: Any = None, line: str | None = None) -> None:
            try:
                self.observe(str(message), sys._getframe(1))
            except Exception:  # never in the way of the warning itself
                pass
            orig(message, category, filename, lineno, file, line)

        showwarning.__wrapped__ = orig  # type: ignore[attr-defined]
        warnings.showwarning = showwarning
        if not self._fork_hook:  # a forked child (a DataLoader worker) has no consumer to emit to
            os.register_at_fork(after_in_child=self.uninstall)
            self._fork_hook = True

    def uninstall(self) -> None:
        if self._orig is not None and getattr(warnings.showwarning, "__wrapped__", None) is self._orig:
            warnings.showwarning = self._orig
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
                    fn = code.co_filename
                    lib = self._library_codes[code] = naming.is_library_frame(code) or fn.startswith(
                        "<frozen") or fn.startswith(_STDLIB) or "site-packages" in fn or "dist-packages" in fn
                if not lib:
                    return f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
                frame = frame.f_back
        return ""
