"""``DebuggingInterface``: the design document's one-stop object (training loop + report)."""

from __future__ import annotations

import importlib
import importlib.util
import threading
import os
import time
from typing import Any, Callable

from ..config import DebugConfig
from ..errors import ErrorCategory, ErrorInfo, ErrorSeverity, _jsonable
from ..detectors.trends import loss_rose
from .debugger import Debugger
from .model_debugger import ModelDebugger
from .recovery_manager import RecoveryManager

MAX_CONSECUTIVE_FAILURES = 10

# Advice by category when a finding carries none of its own (the document's _generate_recommendations).
_CATEGORY_ADVICE = {
    "memory_error": "Reduce the batch size, free tensors kept across steps, or use mixed precision.",
    "gradient_error": "Clip gradients and check the learning rate.",
    "loss_error": "Lower the learning rate and check the loss function's inputs.",
    "data_error": "Check the dataset and its transforms; run with num_workers=0 to debug in-process.",
    "input_validation": "Validate and clean the input data.",
    "model_error": "Check the model's architecture, shapes and initialisation.",
    "training_error": "Read the traceback: the training code raised.",
}


class DebuggingInterface:
    """``DebuggingInterface(config)``: ``debugger``, ``model_debugger``, ``recovery_manager``,
    ``debug_training_loop(...)`` and ``generate_debug_report(...)``.

    ``ui=True`` asks for the live terminal UI: the loop then runs in a worker thread under it when
    the UI package offers an in-process entry point (``tui_debug.tui.run_api(work, debugger)``) and the
    process has a terminal. Otherwise the loop runs in the calling thread, headless (findings go to
    the log files and, with ``enable_console_output``, to stderr) and the reason is logged. The
    documented equivalent that always has the UI: start the same script with
    ``python -m tui_debug your_script.py``; the API then reports into that run (each finding once).
    ``ui_active`` says which way it ran.
    """

    def __init__(self, config: DebugConfig | None = None, ui: bool = False, *, log_dir: str | None = None) -> None:
        self.config = config if config is not None else DebugConfig()
        self.debugger = Debugger(self.config, log_dir=log_dir)
        self.model_debugger = ModelDebugger(self.debugger)
        self.recovery_manager = RecoveryManager(self.debugger)
        self.ui = ui
        self.ui_active = False
        self.last_run: dict[str, Any] = {}

    # -- the training loop ----------------------------------------------------------------------------
    def debug_training_loop(self, model: Any, optimizer: Any, loss_fn: Any, dataloader: Any, num_epochs: int = 1,
                            *, max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES) -> dict[str, Any]:
        """Train ``num_epochs`` epochs of ``(data, target)`` batches, every batch checked and timed.

        Per batch: a ``debug_context`` and ``ModelDebugger.debug_training_step`` (every loss checked,
        every 10th recorded); memory every 50 batches; parameter analysis per epoch. A batch that
        raises (in the step or in the dataloader) is tracked once and training goes on with the next;
        after ``max_consecutive_failures`` failing batches in a row the loop stops with a critical
        finding (the same error on every batch will not fix itself). Returns a small summary
        (``epochs``, ``steps``, ``skipped_steps``, ``failed_batches``, ``last_loss``, ``stopped``).
        """
        run = lambda: self._loop(model, optimizer, loss_fn, dataloader, num_epochs, max_consecutive_failures)
        if self.ui:
            runner = self._ui_runner()
            if runner is not None:
                self.ui_active = True  # stays True afterwards: this run went through the UI
                return runner(run)
        return run()

    def _ui_runner(self) -> Callable[[Callable[[], dict[str, Any]]], dict[str, Any]] | None:
        """The UI's ``run_ui(work, ...)`` when it can be used, else None (headless, reason logged)."""
        import sys

        if self.debugger.monitor is not None:
            reason = "running under python -m tui_debug, which shows the findings itself"
        elif not (sys.stdin.isatty() and sys.stdout.isatty()):
            reason = "no terminal"
        elif threading.current_thread() is not threading.main_thread():
            reason = "the UI needs the main thread (it owns the terminal and the signals)"
        elif importlib.util.find_spec("tui_debug.tui") is None:
            reason = "the terminal UI is not installed in this version"
        else:
            try:
                mod = importlib.import_module("tui_debug.tui")
            except Exception as exc:
                reason = f"the terminal UI failed to load ({type(exc).__name__}: {exc})"
            else:
                # The UI's entry for in-process API use: run_api(work, debugger) runs ``work()`` in a
                # worker thread under the UI and returns its result. (run_ui(monitor) drives a script
                # run by python -m tui_debug, which is the way to get the UI until run_api exists.)
                run_api = getattr(mod, "run_api", None)
                if callable(run_api):
                    debugger = self.debugger
                    return lambda work: run_api(work, debugger)
                reason = ("the terminal UI has no in-process entry point yet; run "
                          "`python -m tui_debug your_script.py` to see this run in the UI")
        self.debugger.logger.info("ui=True: running headless (%s)", reason)
        return None

    def _loop(self, model: Any, optimizer: Any, loss_fn: Any, dataloader: Any, num_epochs: int,
              max_failures: int) -> dict[str, Any]:
        dbg, md = self.debugger, self.model_debugger
        self.recovery_manager.bind(model, optimizer)
        failed = consecutive = 0
        last_loss: float | None = None
        stopped: str | None = None
        epoch = -1
        for epoch in range(num_epochs):
            batches = 0
            iterator = iter(dataloader)
            batch_idx = -1
            while True:
                batch_idx += 1
                try:
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        break
                    batches += 1
                    with dbg.debug_context("training_batch", epoch=epoch, batch_idx=batch_idx):
                        data, target = _split(batch)
                        last_loss = md.debug_training_step(model, optimizer, loss_fn, data, target,
                                                           record_loss=batch_idx % 10 == 0)
                    if batch_idx % 50 == 0:
                        dbg.track_memory()
                    consecutive = 0
                except Exception as exc:  # tracked once (by the innermost context), training goes on
                    dbg.track_exception(exc, {"epoch": epoch, "batch_idx": batch_idx})
                    failed += 1
                    consecutive += 1
                    if consecutive >= max_failures:
                        stopped = f"{consecutive} batches in a row failed (last: {type(exc).__name__}: {exc})"
                        break
            if stopped is None and batches == 0:
                dbg.report(f"the dataloader yielded no batches in epoch {epoch}", ErrorSeverity.WARNING,
                           ErrorCategory.DATA_ERROR, {"epoch": epoch}, key="api-empty-dataloader",
                           recommendation="Check the dataset's length, the sampler and drop_last against the "
                                          "batch size.")
            md.analyze_model_parameters(model, label=f"epoch_{epoch}")
            if stopped is not None:
                dbg.report(f"training stopped in epoch {epoch}: {stopped}", ErrorSeverity.CRITICAL,
                           ErrorCategory.TRAINING_ERROR, {"epoch": epoch, "failed_batches": failed},
                           key="api-training-stopped",
                           recommendation="Every recent batch failed the same way: fix the error in the finding "
                                          "before it (its traceback shows where).")
                break
        self.last_run = {"epochs": epoch + 1, "steps": dbg.step, "skipped_steps": dbg.skipped_steps,
                         "failed_batches": failed, "last_loss": last_loss, "stopped": stopped}
        return dict(self.last_run)

    # -- the report ---------------------------------------------------------------------------------------
    def generate_debug_report(self, output_file: str | None = "debug_report.json") -> dict[str, Any]:
        """``timestamp``, ``debug_summary``, ``model_states``, ``recommendations`` (plus ``errors``,
        ``recovery_actions``, ``config``), written atomically to ``output_file`` (None: not written);
        returns the dict as written (JSON types; NaN/Inf as strings)."""
        errors = self.debugger.error_tracker.snapshot()
        report = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "debug_summary": self.debugger.get_debug_summary(),
            "model_states": dict(self.model_debugger.model_states),
            "recommendations": self._generate_recommendations(errors),
            "errors": [e.to_dict() for e in errors],
            "recovery_actions": list(self.recovery_manager.actions_taken),
            "config": self.config.to_dict(),
        }
        report = _jsonable(report)
        if output_file is not None:
            from ..report import write_report  # temp file + rename

            write_report(os.fspath(output_file), report)
        return report

    def _generate_recommendations(self, errors: list[ErrorInfo]) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        for info in sorted(errors, key=lambda e: (-e.severity.rank, e.first_step or 0)):
            if info.severity.rank < ErrorSeverity.WARNING.rank:
                continue
            advice = info.recommendation or _CATEGORY_ADVICE.get(info.category.value)
            if not advice or (info.category.value, advice) in seen:
                continue
            seen.add((info.category.value, advice))  # type: ignore[arg-type]
            where = f" (step {info.first_step})" if info.first_step is not None else ""
            times = f", x{info.count}" if info.count > 1 else ""
            out.append(f"[{info.category.value}] {info.message}{where}{times}: {advice}")
        dbg = self.debugger
        if dbg.skipped_steps:
            out.append(f"[training] {dbg.skipped_steps} optimizer step(s) were skipped because of non-finite values; "
                       "see the findings above for the cause.")
        losses = dbg.debug_data.get("losses") or []
        finite = [l["value"] for l in losses if isinstance(l.get("value"), float) and l["value"] == l["value"]
                  and abs(l["value"]) != float("inf")]
        rose = loss_rose(finite, min_points=10)
        if rose is not None:
            out.append(f"[loss] the loss ended higher than it started (median of its first tenth {rose[0]:.4g}, "
                       f"of its last {rose[1]:.4g}): the learning rate may be too high.")
        if not out:
            out.append("No problems found.")
        return out

    # -- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.debugger.close()

    def __enter__(self) -> "DebuggingInterface":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and len(batch) == 2:
        a, b = batch.values()
        return a, b
    raise ValueError(f"expected each batch to be (data, target), got {type(batch).__name__}"
                     f"{f' of length {len(batch)}' if hasattr(batch, '__len__') else ''}")

