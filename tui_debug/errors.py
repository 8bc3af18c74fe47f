"""Error tracking as the design document describes it, with its mistakes fixed.

Fixed here: ids are unique (a counter, not ``int(time.time())``); the traceback comes from the
exception object, not ``format_exc()`` outside an except block; the store is bounded and repeats
coalesce into one entry with a count; every method is thread-safe; log files rotate per
``DebugConfig`` and are written by a logging listener thread, never by the caller.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
import logging.handlers
import os
import queue
import threading
import time
import traceback as tb_module
from typing import Any, Callable

from .config import DebugConfig

_TRACKER_NUMBERS = itertools.count(1)


class ErrorSeverity(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return list(ErrorSeverity).index(self)

    @property
    def log_level(self) -> int:
        return {
            "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
            "error": logging.ERROR, "critical": logging.CRITICAL,
        }[self.value]


class ErrorCategory(enum.Enum):
    INPUT_VALIDATION = "input_validation"
    MODEL_ERROR = "model_error"
    TRAINING_ERROR = "training_error"
    EVALUATION_ERROR = "evaluation_error"
    DATA_ERROR = "data_error"
    MEMORY_ERROR = "memory_error"
    SYSTEM_ERROR = "system_error"
    NETWORK_ERROR = "network_error"
    TIMEOUT_ERROR = "timeout_error"
    GRADIENT_ERROR = "gradient_error"
    LOSS_ERROR = "loss_error"
    OPTIMIZATION_ERROR = "optimization_error"


_ids = itertools.count(1)
_id_lock = threading.Lock()


def _new_error_id() -> str:
    with _id_lock:
        n = next(_ids)
    return f"E{os.getpid()}-{n:06d}"


@dataclasses.dataclass
class ErrorInfo:
    """One finding. Repeats of the same finding (same ``key``) share one ErrorInfo with a count."""

    error_id: str
    timestamp: float
    severity: ErrorSeverity
    category: ErrorCategory
    message: str
    traceback: str | None = None
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    user_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    recovery_action: str | None = None
    resolved: bool = False
    step: int | None = None
    count: int = 1
    first_step: int | None = None
    last_step: int | None = None
    last_timestamp: float | None = None
    key: str | None = None
    recommendation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_id": self.error_id,
            "timestamp": self.timestamp,
            "last_timestamp": self.last_timestamp if self.last_timestamp is not None else self.timestamp,
            "step": self.step,
            "severity": self.severity.value,
            "category": self.category.value,
            "message": self.message,
            "traceback": self.traceback,
            "context": _jsonable(self.context),
            "user_data": _jsonable(self.user_data),
            "recovery_action": self.recovery_action,
            "resolved": self.resolved,
            "count": self.count,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "recommendation": self.recommendation,
        }

    def one_line(self) -> str:
        step = f"at step {self.step}" if self.step is not None else "before the first step"
        span = f", steps {self.first_step}-{self.last_step}" if self.first_step is not None else ""
        repeat = f" (x{self.count}{span})" if self.count > 1 else ""
        return f"{self.severity.value.upper()} {self.category.value} {step}: {self.message}{repeat}"


class _LogFile(logging.handlers.RotatingFileHandler):
    """``backup_count`` 0 keeps no old file: the log starts over at ``max_log_size`` (Python's handler
    never rolls over without a backup, and the file grew without bound)."""

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115


# One handler per log file in the process, shared by the trackers that write it (the API's
# DebuggingInterface and Debugger, each with a tracker, both on ./debug.log): two handlers renamed the
# file under each other at rotation ("--- Logging error --- FileNotFoundError") and lost lines.
_LOG_FILES: dict[str, list[Any]] = {}  # absolute path -> [handler, trackers using it]
_LOG_FILES_LOCK = threading.Lock()


def _shared_log_file(path: str, max_bytes: int, backups: int, delay: bool, level: int,
                     fmt: logging.Formatter) -> logging.Handler:
    key = os.path.abspath(path)
    with _LOG_FILES_LOCK:
        entry = _LOG_FILES.get(key)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        handler = _LogFile(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=delay)
        handler.setLevel(level)
        handler.setFormatter(fmt)
        _LOG_FILES[key] = [handler, 1]
        return handler


def _release_log_file(handler: logging.Handler) -> None:
    """Close ``handler`` once no tracker writes through it any more (the console one at once)."""
    with _LOG_FILES_LOCK:
        for key, entry in list(_LOG_FILES.items()):
            if entry[0] is handler:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _LOG_FILES[key]
                break
    handler.close()


DROPPED_KEPT = 1024  # findings given up by a full store whose repeats still coalesce (at least)


class _NamedQueueListener(logging.handlers.QueueListener):
    """Its thread named: an unnamed one takes a number from threading's counter, and the script's first
    thread was "Thread-2" instead of "Thread-1"."""

    def start(self) -> None:
        self._thread = t = threading.Thread(target=self._monitor, name="tui_debug-log", daemon=True)
        t.start()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return repr(value)  # JSON has no NaN/Inf
        return value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    return repr(value)


def format_exception(exc: BaseException) -> str:
    """The exception's own traceback, as Python prints it (works outside an except block)."""
    return "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))


Listener = Callable[[ErrorInfo, bool], None]


class ErrorTracker:
    """Keeps every finding (coalesced, bounded), logs it, and offers it to recovery.

    ``track_error`` may be called from any thread; listeners are called in the caller's thread
    and must not block (the session's listener only enqueues).
    """

    def __init__(self, config: DebugConfig | None = None, log_dir: str | os.PathLike[str] | None = None,
                 logger_name: str | None = None) -> None:
        self.config = config or DebugConfig()
        self._lock = threading.RLock()
        self._by_key: dict[str, ErrorInfo] = {}
        self._dropped: dict[str, ErrorInfo] = {}  # findings the full store could not keep: repeats coalesce here
        self.errors: list[ErrorInfo] = []  # insertion order; bounded by config.max_errors
        self.error_counts: collections.Counter[str] = collections.Counter()
        self.severity_counts: collections.Counter[str] = collections.Counter()
        self.dropped_errors = 0
        self.recovery_manager: Any = None
        self._listeners: list[Listener] = []
        # a number, not id(self): a tracker dropped without stop() leaves its handlers on its logger,
        # and a new tracker at the same address would write into the old one's files too
        self.logger = logging.getLogger(logger_name or f"tui_debug.tracker.{next(_TRACKER_NUMBERS)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self._listener: logging.handlers.QueueListener | None = None
        self._handlers: list[logging.Handler] = []
        self._setup_logging(log_dir)

    # -- logging -----------------------------------------------------------------------------
    def _setup_logging(self, log_dir: str | os.PathLike[str] | None) -> None:
        handlers: list[logging.Handler] = []
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        if self.config.enable_file_output:
            for name, level in ((self.config.log_file, logging.DEBUG), (self.config.error_file, logging.WARNING)):
                path = os.path.join(os.fspath(log_dir), name) if log_dir is not None else name
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                handlers.append(_shared_log_file(path, self.config.max_log_size, self.config.backup_count,
                                                 delay=log_dir is None,  # a run folder holds both from the start
                                                 level=level, fmt=fmt))
        if self.config.enable_console_output:
            h = logging.StreamHandler()  # resolves sys.stderr at emit time
            h.setLevel(logging.WARNING)
            h.setFormatter(logging.Formatter("tui_debug: %(levelname)s %(message)s"))
            handlers.append(h)
        self._handlers = handlers
        if handlers:
            q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
            self.logger.addHandler(logging.handlers.QueueHandler(q))
            self._listener = _NamedQueueListener(q, *handlers, respect_handler_level=True)
            self._listener.start()
        else:  # no output asked for: without a handler, logging's last resort would print to stderr
            self.logger.addHandler(logging.NullHandler())

    def set_console_output(self, enabled: bool) -> None:
        """The CLI prints findings itself; it turns the tracker's console handler off."""
        for h in self._handlers:
            if type(h) is logging.StreamHandler:
                h.setLevel(logging.WARNING if enabled else logging.CRITICAL + 1)

    def stop(self) -> None:
        """Flush and stop the logging worker; safe to call twice."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
            for h in self._handlers:
                _release_log_file(h)

    # -- tracking ------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        """``listener(info, is_new)`` on every tracked finding (new or repeated)."""
        with self._lock:
            self._listeners.append(listener)

    def track_error(
        self,
        error: BaseException | str,
        severity: ErrorSeverity = ErrorSeverity.ERROR,
        category: ErrorCategory = ErrorCategory.TRAINING_ERROR,
        context: dict[str, Any] | None = None,
        user_data: dict[str, Any] | None = None,
        *,
        step: int | None = None,
        key: str | None = None,
        traceback: str | None = None,
        recommendation: str | None = None,
        recover: bool = True,
    ) -> ErrorInfo:
        """Record a finding; a repeat of ``key`` bumps the existing entry's count."""
        if isinstance(error, BaseException):
            try:
                text = str(error)
            except Exception:  # its __str__ raised: Python's own stand-in, and the user's exception goes on
                text = "<exception str() failed>"
            message = f"{type(error).__name__}: {text}" if text else type(error).__name__
            if traceback is None and error.__traceback__ is not None:
                traceback = format_exception(error)
        else:
            message = str(error)
        now = time.time()
        key = key or f"{category.value}|{message}"
        with self._lock:
            self.error_counts[category.value] += 1
            self.severity_counts[severity.value] += 1
            info = self._by_key.get(key)
            if info is None:
                info = self._dropped.get(key)
            is_new = info is None
            if info is not None:
                info.count += 1
                info.last_step = step if step is not None else info.last_step
                info.last_timestamp = now
                info.resolved = False
                if severity.rank > info.severity.rank:
                    info.severity = severity
                if context:
                    info.context.update(context)
            else:
                info = ErrorInfo(
                    error_id=_new_error_id(), timestamp=now, severity=severity, category=category,
                    message=message, traceback=traceback, context=dict(context or {}),
                    user_data=dict(user_data or {}), step=step, first_step=step, last_step=step,
                    key=key, recommendation=recommendation)
                if len(self.errors) >= self.config.max_errors:
                    self._evict_one(severity)
                if len(self.errors) < self.config.max_errors:
                    self.errors.append(info)
                    self._by_key[key] = info
                else:
                    self._drop(info)
            listeners = list(self._listeners)
        if is_new or info.count in (10, 100, 1000) or info.count % 10_000 == 0:
            self.logger.log(severity.log_level, "%s", info.one_line().split(" ", 1)[1])  # (the level says the severity)
            if is_new and info.traceback and self.config.debug_level.rank >= 2:
                self.logger.debug("%s traceback:\n%s", info.error_id, info.traceback)
        for listener in listeners:
            try:
                listener(info, is_new)
            except Exception:  # a broken sink must not break tracking
                self.logger.exception("finding listener failed")
        if recover and self.recovery_manager is not None:
            try:
                self.recovery_manager.handle(info)
            except Exception:
                self.logger.exception("recovery for %s failed", info.error_id)
        return info

    def _evict_one(self, severity: ErrorSeverity) -> None:
        """Make room for a finding of ``severity``: give up the oldest entry of the lowest severity
        below it (a warning may also give way to a newer warning); a critical finding may take the
        latest error's place (the first errors, usually the cause, stay). Otherwise keep them all."""
        rank, error = severity.rank, ErrorSeverity.ERROR.rank
        errors = self.errors
        for r in range(rank + 1) if rank < error else range(rank):
            for i in range(len(errors)) if r < error else range(len(errors) - 1, -1, -1):
                if errors[i].severity.rank == r:
                    self._drop(errors.pop(i))
                    return

    def _drop(self, info: ErrorInfo) -> None:
        """Not kept in the store, still counted: its repeats coalesce on it (no new log line each)."""
        self._by_key.pop(info.key or "", None)
        self.dropped_errors += 1
        # (at least DROPPED_KEPT: with a small store, 20 warnings taking turns in 2 places forgot one
        # another, and each repeat was logged and counted as new, with a count of 1 on what was kept)
        if len(self._dropped) < max(4 * self.config.max_errors, DROPPED_KEPT):
            self._dropped[info.key or ""] = info

    def resolve(self, key: str, action: str | None = None) -> ErrorInfo | None:
        """Mark a finding as no longer holding (optionally with the action that fixed it)."""
        with self._lock:
            info = self._by_key.get(key)
            if info is not None:
                info.resolved = True
                if action:
                    info.recovery_action = action
        return info

    def set_recovery_action(self, key: str, action: str) -> ErrorInfo | None:
        """Record what recovery did about a finding (it still holds until resolved)."""
        with self._lock:
            info = self._by_key.get(key)
            if info is not None:
                info.recovery_action = action if not info.recovery_action else f"{info.recovery_action}; {action}"
        return info

    def get_error_summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total_errors": sum(self.error_counts.values()),
                "unique_errors": len(self.errors),
                "error_counts": dict(self.error_counts),
                "severity_counts": dict(self.severity_counts),
                "dropped_errors": self.dropped_errors,
                "recent_errors": [e.to_dict() for e in self.errors[-10:]],
            }

    def snapshot(self) -> list[ErrorInfo]:
        with self._lock:
            return list(self.errors)
