"""``RecoveryManager``: the design document's recovery strategies, doing real work.

The strategies call the same actions as ``python -m tui_debug --recover`` and the UI's keys
(:mod:`tui_debug.recovery.actions`: clear the cache, scale the learning rate, gradient clipping,
last-good snapshots and rollback, checkpoints) on an API-side ``TrainingState`` built from the
model and optimizer the program hands over.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

from .. import distributed
from ..errors import ErrorCategory, ErrorInfo
from ..recovery import actions
from ..recovery.actions import ActionResult, Snapshots
from .debugger import Debugger

Strategy = Callable[[ErrorInfo], Any]
MAX_ACTIONS_KEPT = 1_000
# a finding's recoveries that change the training's math: not applied in a multi-process run
CHANGE_THE_RUN = frozenset(("lower_lr", "raise_lr", "toggle_clipping", "enable_clipping", "rollback"))


class APITrainingState:
    """The ``TrainingState`` protocol of :mod:`tui_debug.recovery.actions` for models/optimizers given by code."""

    def __init__(self, debugger: Debugger) -> None:
        self._debugger = debugger
        self.clip_norm: float | None = None
        self.recent_total_norms: collections.deque[float] = collections.deque(maxlen=200)
        self._models: dict[str, Any] = {}
        self._optimizers: list[Any] = []

    @property
    def torch(self) -> Any:
        return self._debugger.torch

    @property
    def step(self) -> int:
        return self._debugger.step

    def bind(self, model: Any = None, optimizer: Any = None, name: str = "model") -> None:
        if model is not None:
            self._models = {name: model}
        if optimizer is not None:
            self._optimizers = [optimizer]

    def bound(self, model: Any, optimizer: Any) -> bool:
        return (any(m is model for m in self._models.values())
                and any(o is optimizer for o in self._optimizers))

    def models(self) -> dict[str, Any]:
        return dict(self._models)

    def optimizers(self) -> list[Any]:
        return list(self._optimizers)


class RecoveryManager:
    """``RecoveryManager(debugger)``: strategies by ``ErrorCategory`` in ``recovery_strategies``.

    Creating it attaches it to the debugger's ``ErrorTracker``, which then calls ``handle(info)`` on
    every ``track_error``; what a strategy does depends on ``DebugConfig.recover``:

    - ``off``: nothing, custom strategies included;
    - ``safe`` (default; never changes the math of a healthy run): memory errors -> ``gc.collect()`` +
      ``torch.cuda.empty_cache()``; a step with non-finite values was already skipped by
      ``ModelDebugger.debug_training_step`` (noted on the finding); a last-good snapshot of the model
      and optimizer is kept every ``snapshot_interval`` healthy steps (CPU copy);
    - ``auto`` adds: non-finite loss / model output / parameters -> roll back to the last good snapshot
      and halve the learning rate; loss explosion -> halve the learning rate; non-finite gradients ->
      halve the learning rate and clip gradients at twice the recent median norm. Learning-rate halvings
      are bounded (``max_lr_halvings``, default 5), and one action runs at most once per step.

    Actions change the model only at a step boundary, in the training thread: a finding raised inside
    ``debug_training_step`` (or from another thread) queues its actions, applied when the step ends.
    ``register_strategy(category, fn)`` adds or replaces a strategy (``fn(error_info)``, returning a
    description of what it did, or a false value for nothing); ``request(name)`` runs an action on
    demand (``clear_cache``, ``lower_lr``, ``raise_lr``, ``toggle_clipping``, ``enable_clipping``,
    ``rollback``, ``snapshot``, ``checkpoint``). Every action is logged, kept in ``actions_taken`` and
    written on the finding (``recovery_action``, ``resolved``).

    Under ``python -m tui_debug`` the monitor keeps its own recovery for what its instrumentation
    finds; this manager then acts only on what the API finds (including the steps the API skips, which
    the monitor never sees), and its actions also appear in the monitor's report and output.
    """

    def __init__(self, debugger: Debugger | None = None, model: Any = None, optimizer: Any = None,
                 *, attach: bool = True) -> None:
        self.debugger = debugger if debugger is not None else Debugger()
        self.config = self.debugger.config
        self.logger = self.debugger.logger
        self.state = APITrainingState(self.debugger)
        self.snapshots = Snapshots(keep=1)
        self.recovery_strategies: dict[ErrorCategory, Strategy] = {}
        self.actions_taken: list[dict[str, Any]] = []
        self.max_lr_halvings = int(getattr(self.config, "max_lr_halvings", 5))
        self.lr_halvings = 0
        self._pending: collections.deque[tuple[ErrorInfo | None, str, Callable[[], ActionResult]]] = \
            collections.deque()
        self._lock = threading.RLock()
        self._in_step = False
        self._owner: int | None = None  # the training thread
        self._done: dict[str, int] = {}  # action -> step it last ran (or was queued) for
        self._last_snapshot_step = -1
        self.setup_recovery_strategies()
        self.debugger.recovery_manager = self
        if attach and self.debugger.monitor is None:
            self.debugger.error_tracker.recovery_manager = self
        if model is not None or optimizer is not None:
            self.bind(model, optimizer)

    # -- strategies ---------------------------------------------------------------------------------
    def setup_recovery_strategies(self) -> None:
        self.recovery_strategies = {
            ErrorCategory.MEMORY_ERROR: self._recover_memory_error,
            ErrorCategory.GRADIENT_ERROR: self._recover_gradient_error,
            ErrorCategory.LOSS_ERROR: self._recover_loss_error,
            ErrorCategory.MODEL_ERROR: self._recover_model_error,
            ErrorCategory.DATA_ERROR: self._recover_data_error,
            ErrorCategory.INPUT_VALIDATION: self._recover_data_error,
        }

    def register_strategy(self, category: ErrorCategory | str, strategy: Strategy) -> Strategy | None:
        """Use ``strategy(error_info)`` for ``category``; returns the strategy it replaces (to chain it)."""
        cat = ErrorCategory(category) if isinstance(category, str) else category
        with self._lock:
            previous = self.recovery_strategies.get(cat)
            self.recovery_strategies[cat] = strategy
        return previous

    def handle(self, error_info: ErrorInfo) -> bool:
        """Called by ``ErrorTracker.track_error``: run the category's strategy per ``DebugConfig.recover``."""
        if self.config.recover == "off":
            return False
        strategy = self.recovery_strategies.get(error_info.category)
        if strategy is None:
            return False
        try:
            result = strategy(error_info)
        except Exception:
            self.logger.exception("recovery strategy for %s failed", error_info.category.value)
            return False
        if result and getattr(strategy, "__self__", None) is not self:  # a custom strategy: note what it did
            _note(error_info, result if isinstance(result, str) else getattr(strategy, "__name__", "custom strategy"))
        return bool(result)

    attempt_recovery = handle  # the design document's name

    def _auto(self) -> bool:
        return self.config.recover == "auto"

    def _recover_memory_error(self, info: ErrorInfo) -> str | None:
        return self.schedule(info, "clear_cache", lambda: actions.clear_cache(self.state))

    def _recover_data_error(self, info: ErrorInfo) -> str | None:
        # Only what did happen: a batch of debug_training_loop that raised (it goes on to the next one,
        # its finding has the batch's index) or a step the model debugger skipped. Any other data finding
        # (an empty epoch, the user's own track_error) had been told "batch skipped" too.
        skipped_step = info.context.get("action") == "optimizer step skipped"
        if skipped_step or (info.category is ErrorCategory.DATA_ERROR and "batch_idx" in info.context):
            _note(info, "batch skipped; training went on")
            return "batch skipped"
        return None

    def _recover_loss_error(self, info: ErrorInfo) -> str | None:
        done = []
        if info.context.get("action") == "optimizer step skipped":
            _note(info, "optimizer step skipped: parameters left unchanged")
            done.append("step skipped")
        if self._auto():  # non-finite or exploding: the state is poisoned, go back to the last good one
            done.append(self.schedule(info, "rollback", self._rollback))
            done.append(self.lower_lr(info))
        return "; ".join(d for d in done if d) or None

    def _recover_model_error(self, info: ErrorInfo) -> str | None:
        if info.context.get("check") not in ("nonfinite_output", "nonfinite_parameter"):
            return None  # e.g. a shape mismatch: nothing to repair automatically
        done = []
        if info.context.get("action") == "optimizer step skipped":
            _note(info, "optimizer step skipped: parameters left unchanged")
            done.append("step skipped")
        if self._auto():
            done.append(self.schedule(info, "rollback", self._rollback))
            done.append(self.lower_lr(info))
        return "; ".join(d for d in done if d) or None

    def _rollback(self) -> ActionResult:
        result = actions.rollback(self.state, self.snapshots)
        if result.ok:
            self.debugger.reset_loss_baseline()
        return result

    def _recover_gradient_error(self, info: ErrorInfo) -> str | None:
        done = []
        if info.context.get("action") == "optimizer step skipped":
            _note(info, "optimizer step skipped: parameters left unchanged")
            done.append("step skipped")
        if self._auto():
            done.append(self.lower_lr(info))
            if self.state.clip_norm is None:
                done.append(self.schedule(info, "clipping", lambda: actions.set_clipping(
                    self.state, actions.default_clip_norm(self.state))))
        return "; ".join(d for d in done if d) or None

    def lower_lr(self, info: ErrorInfo | None = None) -> str | None:
        """Halve every learning rate (bounded by ``max_lr_halvings``)."""
        with self._lock:
            if self.lr_halvings >= self.max_lr_halvings or self._done.get("lower_lr") == self.state.step:
                return None
            self.lr_halvings += 1
        return self.schedule(info, "lower_lr", lambda: actions.scale_lr(self.state, 0.5))

    # -- actions at step boundaries -------------------------------------------------------------------
    def schedule(self, info: ErrorInfo | None, name: str, fn: Callable[[], ActionResult]) -> str | None:
        """Run ``fn`` now if we are at a step boundary in the training thread, else at the next one.

        At most once per step per action name. Returns a description, or None when skipped.
        """
        world = distributed.world_size() if info is not None and name in CHANGE_THE_RUN else 1
        if world > 1:  # a finding's recovery, decided on this rank alone (see tui_debug/distributed.py)
            result = ActionResult(name, False, "not applied: " + distributed.why_not(world), self.state.step)
            self._record(info, result)
            return result.message
        with self._lock:
            if name != "lower_lr" and self._done.get(name) == self.state.step:
                return None
            self._done[name] = self.state.step
            now = not self._in_step and (self._owner is None or self._owner == threading.get_ident())
            if not now:
                self._pending.append((info, name, fn))
                return f"{name} scheduled"
        return self._apply(info, fn).message

    def apply_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                info, _, fn = self._pending.popleft()
            self._apply(info, fn)

    def _apply(self, info: ErrorInfo | None, fn: Callable[[], ActionResult]) -> ActionResult:
        try:
            result = fn()
        except Exception as exc:
            result = ActionResult("error", False, f"recovery action failed: {type(exc).__name__}: {exc}",
                                  self.state.step)
        self._record(info, result)
        return result

    def _record(self, info: ErrorInfo | None, result: ActionResult) -> None:
        entry = {"action": result.action, "ok": result.ok, "message": result.message, "step": result.step,
                 "finding": info.error_id if info is not None else None, **result.detail}
        with self._lock:
            self.actions_taken.append(entry)
            if len(self.actions_taken) > MAX_ACTIONS_KEPT:
                del self.actions_taken[:-MAX_ACTIONS_KEPT]
        self.logger.warning("recovery: %s", result.message)
        if info is not None:
            _note(info, result.message)
            if result.ok:
                info.resolved = True
        monitor = self.debugger.monitor
        if monitor is not None:  # into the monitor's report ("actions") and output
            try:
                monitor.bus.emit([result])
            except Exception:
                pass

    def request(self, name: str, folder: str = ".") -> str | None:
        """An action on demand (applied now at a step boundary, else when the current step ends)."""
        fns: dict[str, Callable[[], ActionResult]] = {
            "clear_cache": lambda: actions.clear_cache(self.state),
            "lower_lr": lambda: actions.scale_lr(self.state, 0.5),
            "raise_lr": lambda: actions.scale_lr(self.state, 2.0),
            "toggle_clipping": lambda: actions.toggle_clipping(self.state),
            "enable_clipping": lambda: actions.set_clipping(self.state, actions.default_clip_norm(self.state)),
            "rollback": self._rollback,
            "snapshot": self._snapshot_action,
            "checkpoint": lambda: actions.save_checkpoint(self.state, folder),
        }
        if name not in fns:
            raise ValueError(f"unknown action {name!r}; one of {', '.join(fns)}")
        with self._lock:
            self._done.pop(name, None)
        return self.schedule(None, name, fns[name])

    def _snapshot_action(self) -> ActionResult:
        snap = self.snapshots.take(self.state)
        ok = snap is not None
        return ActionResult("snapshot", ok, f"snapshot of step {self.state.step} kept" if ok else
                            "nothing bound to snapshot", self.state.step)

    # -- the training loop's side ----------------------------------------------------------------------
    def bind(self, model: Any = None, optimizer: Any = None, name: str = "model") -> None:
        """The model and optimizer the actions work on (``debug_training_loop`` binds them)."""
        self.state.bind(model, optimizer, name)
        self._owner = threading.get_ident()
        if self.config.recover != "off" and model is not None:
            self.snapshots.take(self.state)
            self._last_snapshot_step = self.state.step

    def begin_step(self, model: Any, optimizer: Any) -> None:
        if not self.state.bound(model, optimizer):
            self.bind(model, optimizer)
        self._owner = threading.get_ident()
        self.apply_pending()
        self._in_step = True

    def end_step(self, finite: bool) -> None:
        self._in_step = False
        interval = int(getattr(self.config, "snapshot_interval", 200))
        step = self.state.step
        healthy = finite and self.debugger.last_loss_healthy
        if (healthy and self.config.recover != "off" and interval > 0 and step % interval == 0
                and step != self._last_snapshot_step and not self._pending):
            self._last_snapshot_step = step
            self.snapshots.take(self.state)
        self.apply_pending()


MAX_NOTE = 400


def _note(info: ErrorInfo, text: str) -> None:
    """Append to the finding's ``recovery_action`` (bounded: a finding repeated all run keeps the latest)."""
    if not info.recovery_action:
        info.recovery_action = text
    elif text not in info.recovery_action:
        note = f"{info.recovery_action}; {text}"
        if len(note) > MAX_NOTE:
            note = "...; " + note[-(MAX_NOTE - 5):].split("; ", 1)[-1]
        info.recovery_action = note
