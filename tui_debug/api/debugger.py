"""``Debugger``: the design document's core debugging object, on tui_debug's engine.

Every finding goes through an :class:`~tui_debug.errors.ErrorTracker` (the same store, log files and
recommendations as ``python -m tui_debug``); exceptions are classified by
:func:`~tui_debug.classify.classify_exception`. Under ``python -m tui_debug`` the Debugger uses the
running monitor's tracker, so the script's API findings appear once in the monitor's output and report.
"""

from __future__ import annotations

import cProfile
import collections
import contextlib
import gc
import io
import logging
import math
import pstats
import re
import statistics
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterator

from ..classify import classify_exception, memory_context
from ..config import DebugConfig, DebugLevel
from ..errors import ErrorCategory, ErrorInfo, ErrorSeverity, ErrorTracker, format_exception
from . import _common

MAX_MEMORY_SNAPSHOTS = 100
MAX_TIMINGS_PER_CONTEXT = 10_000
MAX_CONTEXT_NAMES = 1_000
MAX_LOSS_HISTORY = 1_000
MAX_PROFILES = 32
EXPLOSION_FACTOR = 10.0  # x the median of the last EXPLOSION_WINDOW losses: a sudden jump
EXPLOSION_FACTOR_START = 100.0  # x the first losses' median: a steady divergence
EXPLOSION_WINDOW = 10
EXPLOSION_WARMUP = 5
OTHER_CONTEXTS = "(other contexts)"

_MB = 1024 * 1024


def _rank(level: DebugLevel) -> int:
    return list(DebugLevel).index(level)


class Debugger:
    """Times and measures code blocks, tracks memory, gradients and losses, profiles functions.

    ``Debugger(config)`` as in the design document. Attributes: ``error_tracker``, ``logger``,
    ``debug_data`` (``losses``, ``gradients``, ``profiling``, ...), ``performance_metrics`` (context
    name -> list of seconds), ``memory_snapshots`` (the last 100: ``timestamp``, ``memory_usage`` in MB,
    ``gpu_memory``, ``gc_stats``).

    ``DebugLevel`` decides how much is computed: ``NONE`` computes and logs nothing (every method is
    a pass-through; only exceptions that ``DebuggingInterface.debug_training_loop`` catches are still
    tracked, since that costs nothing on a healthy run); ``BASIC`` times contexts and checks losses,
    gradient norms and model inputs/outputs for NaN/Inf; ``DETAILED`` (default) adds the memory
    change of each context and mean/std/min/max of every gradient in ``track_gradients``;
    ``VERBOSE`` adds a debug-log line per context and full gradient statistics at every training step;
    ``PROFILING`` adds cProfile in ``profile_function`` (as ``enable_profiling=True`` does at any
    level but ``NONE``).

    Where the design document is unsafe this class differs, on purpose:

    - no ``.item()`` per parameter: gradient and parameter statistics of all tensors are stacked and
      read from the device ONCE (``torch._foreach_norm`` per device/dtype group); a second read
      happens only for tensors found non-finite, to tell NaN from Inf;
    - bounded memory: ``memory_snapshots`` keeps 100 entries, each ``performance_metrics`` list the
      last 10,000 timings (at most 1,000 context names; more share ``"(other contexts)"``),
      ``debug_data["losses"]`` the last 1,000 points;
    - finding ids are unique (a counter, not ``int(time.time())``) and repeats of a finding are one
      entry with a count;
    - an exception is tracked once, by the innermost ``debug_context`` it crosses, and re-raised; the
      enclosing contexts and ``debug_training_loop`` do not count it again;
    - GPU figures are read only if the program already initialised CUDA (never initialised here).
    """

    def __init__(self, config: DebugConfig | None = None, *, log_dir: str | None = None,
                 error_tracker: ErrorTracker | None = None) -> None:
        self.config = config if config is not None else DebugConfig()
        self.monitor = _common.active_monitor()
        self._owns_tracker = False
        if error_tracker is not None:
            self.error_tracker = error_tracker
        elif self.monitor is not None:
            # python -m tui_debug: one store for the run; the monitor prints findings and writes the report.
            self.error_tracker = self.monitor.tracker
        else:
            self.error_tracker = ErrorTracker(self.config, log_dir=log_dir)
            self._owns_tracker = True
            self._finalizer = weakref.finalize(self, self.error_tracker.stop)
        self.logger = self.error_tracker.logger
        if not self.logger.handlers:  # no file or console output: silence, not logging's last resort
            self.logger.addHandler(logging.NullHandler())
        self.debug_data: dict[str, Any] = {}
        self.performance_metrics: dict[str, list[float]] = collections.defaultdict(list)
        self.memory_snapshots: list[dict[str, Any]] = []
        self.profile_stats: dict[str, pstats.Stats] = {}
        self.recovery_manager: Any = None  # set by RecoveryManager(debugger)
        self.step = 0  # optimizer steps taken through ModelDebugger.debug_training_step
        self.skipped_steps = 0
        self._lock = threading.RLock()
        self._recent_losses: collections.deque[float] = collections.deque(maxlen=EXPLOSION_WINDOW)
        self._initial_loss: float | None = None
        self._first_loss: float | None = None
        self.last_loss_healthy = True
        self.last_explosion_step = -1
        self._torch: Any = None

    # -- configuration ------------------------------------------------------------------------------
    @property
    def level(self) -> DebugLevel:
        return self.config.debug_level

    def enabled(self, minimum: DebugLevel = DebugLevel.BASIC) -> bool:
        """Whether the current ``DebugLevel`` is at least ``minimum``."""
        return _rank(self.level) >= _rank(minimum)

    @property
    def torch(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch

    @property
    def profiling(self) -> bool:
        return self.level is DebugLevel.PROFILING or (self.config.enable_profiling and self.enabled())

    # -- findings -----------------------------------------------------------------------------------
    def report(self, message: str, severity: ErrorSeverity, category: ErrorCategory,
               context: dict[str, Any] | None = None, *, key: str | None = None, step: int | None = None,
               recommendation: str | None = None, traceback: str | None = None,
               covered: bool = False) -> ErrorInfo:
        """Track a finding and offer it to recovery; the one door every API finding goes through.

        ``covered``: the CLI's instrumentation already reports this very finding (we run under
        ``python -m tui_debug``): it is not tracked a second time, only offered to recovery.
        """
        step = self.step if step is None else step
        rm = self.recovery_manager
        if covered and self.monitor is not None:
            info = ErrorInfo(error_id="(reported by the monitor)", timestamp=time.time(), severity=severity,
                             category=category, message=message, context=dict(context or {}), step=step,
                             first_step=step, last_step=step, key=key)
            if rm is not None:
                rm.handle(info)
            return info
        auto = rm is not None and self.error_tracker.recovery_manager is rm
        info = self.error_tracker.track_error(message, severity, category, context, step=step, key=key,
                                              traceback=traceback, recommendation=recommendation, recover=auto)
        if rm is not None and not auto:
            rm.handle(info)
        return info

    def track_exception(self, exc: BaseException, context: dict[str, Any] | None = None,
                        step: int | None = None) -> ErrorInfo:
        """Classify and track ``exc`` once (a second call for the same exception returns the first entry)."""
        info = _common.tracked_info(exc)
        if info is not None:
            return info
        failing = None
        if self.monitor is not None:
            try:
                failing = self.monitor.instr.failing_modules(exc)
            except Exception:
                failing = None
        c = classify_exception(exc, failing)
        ctx = dict(c.context)
        ctx.update(context or {})
        category = c.category
        words = re.split(r"[^a-z]+", str(ctx.get("context_name", "")).lower())
        if category == "training_error":
            # what the user called the block says what failed: debug_context("data_loading") raising
            # OSError is the data's, debug_context("validation") the evaluation's (both were training_error)
            if any(w.startswith("eval") or w in ("validation", "validate", "valid", "val", "test", "testing")
                   for w in words):
                category = "evaluation_error"
            elif any(w in ("data", "dataset", "dataloader", "loader") for w in words):
                category = "data_error"
        info = self.report(c.message, ErrorSeverity(c.severity), ErrorCategory(category), ctx,
                           key=f"exception|{category}|{c.message}", step=step,
                           recommendation=c.recommendation, traceback=format_exception(exc))
        _common.mark_tracked(exc, info)
        return info

    # -- contexts -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def debug_context(self, context_name: str, **kwargs: Any) -> Iterator[None]:
        """Time (and at DETAILED, measure the RSS change of) the block; track an exception and re-raise it."""
        if not self.enabled():
            yield
            return
        measure = self.enabled(DebugLevel.DETAILED) and self.config.enable_memory_tracking
        verbose = self.enabled(DebugLevel.VERBOSE)
        if verbose:
            self.logger.debug("entering %s %s", context_name, kwargs or "")
        mem0 = _rss_mb() if measure else 0.0
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.track_exception(exc, {"context_name": context_name, **kwargs})
            raise
        finally:
            duration = time.perf_counter() - t0
            if self.config.enable_performance_tracking:
                self._add_timing(context_name, duration)
            if measure:
                delta = _rss_mb() - mem0
                self.debug_data.setdefault("context_memory_mb", {})[context_name] = delta
            if verbose:
                self.logger.debug("leaving %s after %.6f s", context_name, duration)

    def _add_timing(self, name: str, seconds: float) -> None:
        with self._lock:
            metrics = self.performance_metrics
            if name not in metrics and len(metrics) >= MAX_CONTEXT_NAMES:
                name = OTHER_CONTEXTS
            times = metrics[name]
            times.append(seconds)
            if len(times) > MAX_TIMINGS_PER_CONTEXT + MAX_TIMINGS_PER_CONTEXT // 10:
                del times[:-MAX_TIMINGS_PER_CONTEXT]

    # -- memory -------------------------------------------------------------------------------------
    def track_memory(self) -> dict[str, Any] | None:
        """Append a snapshot (RSS in MB, CUDA figures if CUDA is in use, gc stats); keeps the last 100."""
        if not self.enabled() or not self.config.enable_memory_tracking:
            return None
        snap = {"timestamp": time.time(), "memory_usage": _rss_mb(), "gpu_memory": _gpu_memory(),
                "gc_stats": gc.get_stats()}
        with self._lock:
            self.memory_snapshots.append(snap)
            if len(self.memory_snapshots) > MAX_MEMORY_SNAPSHOTS:
                del self.memory_snapshots[:-MAX_MEMORY_SNAPSHOTS]
        return snap

    # -- gradients ----------------------------------------------------------------------------------
    def track_gradients(self, model: Any) -> dict[str, dict[str, float]] | None:
        """Per-parameter gradient ``norm`` (DETAILED+: ``mean``, ``std``, ``min``, ``max``), one device read.

        A non-finite gradient is a ``gradient_error`` naming the parameters. Stored as
        ``debug_data["gradients"]`` and returned.
        """
        if not self.enabled() or not self.config.enable_gradient_tracking:
            return None
        named = [(n, p.grad) for n, p in model.named_parameters()
                 if p.grad is not None and not p.grad.is_sparse]
        stats = _common.tensor_stats(self.torch, [g for _, g in named], full=self.enabled(DebugLevel.DETAILED))
        info: dict[str, dict[str, float]] = {}
        for (name, _), s in zip(named, stats):
            if s:
                info[name] = {k: v for k, v in s.items() if k not in ("has_nan", "has_inf")}
        self.debug_data["gradients"] = info
        bad = [(n, s) for (n, _), s in zip(named, stats) if s and (s["has_nan"] or s["has_inf"])]
        if bad:
            self.report_bad_gradients([n for n, _ in bad], "nan" if bad[0][1]["has_nan"] else "inf",
                                      total=len(named))
        return info

    def report_bad_gradients(self, names: list[str], what: str, total: int,
                             extra: dict[str, Any] | None = None) -> ErrorInfo:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        return self.report(
            f"non-finite gradient ({what}) in {names[0]}{more}", ErrorSeverity.ERROR, ErrorCategory.GRADIENT_ERROR,
            {"parameters": names[:50], "count": len(names), "of": total, **(extra or {})},
            key=f"api-nonfinite-grad|{names[0]}", step=(extra or {}).get("step"),
            covered=_common.monitor_covers(self.monitor, "grad"),
            recommendation="Skip steps with non-finite gradients (the API does), clip gradients "
                           "(torch.nn.utils.clip_grad_norm_), or lower the learning rate.")

    # -- losses -------------------------------------------------------------------------------------
    def track_loss(self, loss: Any, step: int) -> float | None:
        """Record the loss; NaN/Inf (error) and a jump above 10x the recent maximum (warning) are ``loss_error``.

        Reads the loss once (``.item()``); pass a float to avoid any device read.
        """
        if not self.enabled() or not self.config.enable_loss_tracking:
            return None
        value = float(loss.detach().float().mean().item()) if hasattr(loss, "detach") else float(loss)
        backpropagated = bool(getattr(loss, "requires_grad", False))
        self.observe_loss(value, step, record=True,
                          covered=backpropagated and _common.monitor_covers(self.monitor, "loss"))
        return value

    def observe_loss(self, value: float, step: int, *, record: bool, covered: bool = False,
                     extra: dict[str, Any] | None = None) -> ErrorInfo | None:
        """Check a loss value already on the host; append it to the history when ``record``."""
        if record:
            with self._lock:
                losses = self.debug_data.setdefault("losses", [])
                losses.append({"step": step, "value": value, "timestamp": time.time()})
                if len(losses) > MAX_LOSS_HISTORY + MAX_LOSS_HISTORY // 10:
                    del losses[:-MAX_LOSS_HISTORY]
        if not math.isfinite(value):
            self.last_loss_healthy = False
            return self.report(
                f"loss is {_common.kind(value)}", ErrorSeverity.ERROR, ErrorCategory.LOSS_ERROR,
                {"step": step, "loss_value": _common.kind(value), **(extra or {})}, key="api-nonfinite-loss",
                step=step,
                covered=covered,
                recommendation="Lower the learning rate, clip gradients, or guard log/div/sqrt in the loss "
                               "against zero and negative inputs.")
        recent = self._recent_losses
        finding = None
        if len(recent) >= EXPLOSION_WARMUP:
            base = statistics.median(recent)
            initial = self._initial_loss if self._initial_loss is not None else base
            if self._initial_loss is None:
                self._initial_loss = initial
            # the lower of: a jump over the recent median, a steady climb far above where training started
            ref, factor, what = min((base, EXPLOSION_FACTOR, "recent median"),
                                    (initial, EXPLOSION_FACTOR_START, "initial loss"), key=lambda r: r[0] * r[1])
            if ref > 0 and value > ref * factor:
                finding = self.report(
                    f"loss exploded: {value:.4g} > {factor:g}x the {what} {ref:.4g}",
                    ErrorSeverity.WARNING, ErrorCategory.LOSS_ERROR,
                    {"step": step, "loss_value": value, "reference": ref, "recent_losses": list(recent)},
                    key="api-loss-explosion", step=step, covered=_common.monitor_covers(self.monitor, "explosion"),
                    recommendation="The learning rate is probably too high: lower it or add warm-up and "
                                   "gradient clipping.")
                self.last_explosion_step = step
                self.last_loss_healthy = False
                return finding  # not part of the baseline
        # A state worth a last-good snapshot: the loss is not climbing away from where it was.
        ref = statistics.median(recent) if len(recent) >= EXPLOSION_WARMUP else self._first_loss
        self.last_loss_healthy = ref is None or value <= 2 * abs(ref) + 1e-12
        if self._first_loss is None:
            self._first_loss = value
        recent.append(value)
        return finding

    def reset_loss_baseline(self) -> None:
        """Forget recent losses (after a rollback, the old ones no longer describe the model)."""
        self._recent_losses.clear()

    # -- profiling ----------------------------------------------------------------------------------
    def profile_function(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``func(*args, **kwargs)`` and return its result; with profiling on, under cProfile.

        The stats are kept in ``profile_stats[name]`` (``pstats.Stats``) and the top 20 functions by
        cumulative time as text in ``debug_data["profiling"]``. If another profiler is already active
        the function simply runs.
        """
        if not self.profiling:
            return func(*args, **kwargs)
        name = getattr(func, "__qualname__", None) or repr(func)
        profiler = cProfile.Profile()
        try:
            profiler.enable()
        except ValueError:  # another profiler is active (Python 3.12+ refuses two)
            self.logger.debug("profile_function(%s): another profiler is active; not profiled", name)
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        finally:
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
            stats.print_stats(20)
            with self._lock:
                if name not in self.profile_stats and len(self.profile_stats) >= MAX_PROFILES:
                    self.profile_stats.pop(next(iter(self.profile_stats)))
                self.profile_stats[name] = stats
                self.debug_data["profiling"] = out.getvalue()

    # -- summary ------------------------------------------------------------------------------------
    def get_debug_summary(self) -> dict[str, Any]:
        """``error_summary``, ``performance_metrics`` (per context: mean/std/min/max/count/total seconds),
        the last 10 ``memory_snapshots``, ``debug_data``, and the step counters."""
        with self._lock:
            perf = {}
            for name, times in self.performance_metrics.items():
                if times:
                    perf[name] = {"mean": statistics.fmean(times), "std": statistics.pstdev(times),
                                  "min": min(times), "max": max(times), "count": len(times), "total": sum(times)}
            data = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                    for k, v in self.debug_data.items()}
            return {
                "error_summary": self.error_tracker.get_error_summary(),
                "performance_metrics": perf,
                "memory_snapshots": list(self.memory_snapshots[-10:]),
                "debug_data": data,
                "steps": self.step,
                "skipped_steps": self.skipped_steps,
                "debug_level": self.level.value,
            }

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush and stop the log writer (not the monitor's, under ``python -m tui_debug``)."""
        if self._owns_tracker:
            self.error_tracker.stop()

    def __enter__(self) -> "Debugger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_process: Any = None


def _rss_mb() -> float:
    global _process
    try:
        if _process is None:
            import psutil

            _process = psutil.Process()
        return _process.memory_info().rss / _MB
    except Exception:
        return float(memory_context().get("rss_bytes", 0)) / _MB


def _gpu_memory() -> dict[str, float] | None:
    """CUDA allocator figures in MB, only if the program already initialised CUDA."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return {"allocated": torch.cuda.memory_allocated() / _MB, "reserved": torch.cuda.memory_reserved() / _MB,
                    "max_allocated": torch.cuda.max_memory_allocated() / _MB}
    except Exception:
        pass
    return None
