"""The consumer side of a run: folds the event stream into run state every sink reads.

Lives in the main thread (the UI or the headless loop). Findings go through the ErrorTracker
(so the API and the CLI share one store); sinks subscribe to the tracker and to progress.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from typing import Any, Callable

from .classify import classify_exception, memory_context, raised_mid_step
from .config import DebugConfig
from .errors import ErrorCategory, ErrorSeverity, ErrorTracker, format_exception
from .events import (GilYield, FindingEvent, LateLosses, LossSiteEvent, ModelEvent, OptimizerEvent, RedundantBias, Resolved,
                     ScalerSkips, ScriptEnded, StepRecord, StepSpan)
from .detectors.trends import all_finite, ActivationHealth, DataStall, UpdateRatio, GradientNorms, LossExplosion, MemoryGrowth, Plateau, SlowSteps, Verdict
from .history import DownsampledHistory, Reservoir
from .recovery.actions import ActionResult


@dataclasses.dataclass
class LossStats:
    name: str
    source: str
    count: int = 0
    first: float | None = None
    last: float | None = None
    min: float | None = None
    max: float | None = None
    nonfinite: int = 0
    history: DownsampledHistory = dataclasses.field(default_factory=DownsampledHistory)

    def add_many(self, last_step: int, values: list[float]) -> None:
        """Finite values of sampled-out steps up to ``last_step``: counted, one history point."""
        self.count += len(values)
        if self.first is None:
            self.first = values[0]
        self.last = values[-1]
        self.history.add(last_step, values[-1])
        lo, hi = min(values), max(values)
        self.min = lo if self.min is None or lo < self.min else self.min
        self.max = hi if self.max is None or hi > self.max else self.max

    def add(self, step: int, value: float) -> None:
        self.count += 1
        if self.first is None:
            self.first = value
        self.last = value
        self.history.add(step, value)
        if not math.isfinite(value):
            self.nonfinite += 1
            return
        self.min = value if self.min is None or value < self.min else self.min
        self.max = value if self.max is None or value > self.max else self.max


@dataclasses.dataclass(slots=True)
class GradStats:
    last: float = 0.0
    last_step: int = 0
    min: float = math.inf
    max: float = 0.0
    nonfinite: int = 0
    count: int = 0


class Session:
    """Run state: steps, losses, gradients, models, optimizers, memory, performance, findings."""

    WARM_STEPS = 3  # a model that starts mid-run: its first steps are no slow steps (cuDNN autotuning...)
    MAX_LISTED = 64  # models and optimizers kept for the report: the latest

    def __init__(self, config: DebugConfig, tracker: ErrorTracker, script: str = "", argv: list[str] | None = None,
                 run_dir: str | None = None, report_path: str | None = None) -> None:
        self.config = config
        self.tracker = tracker
        self.script = script
        self.argv = list(argv or [])
        self.run_dir = run_dir
        self.report_path = report_path
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self.ended_at: float | None = None
        self.status = "running"
        self.exit_code: int | None = None
        self.steps = 0
        # steps whose forward, gradients and loss were checked (fast steps may be sampled: see hooks._Sampler)
        self.checked_steps = 0
        self._last_checked_step = -1
        self.losses: dict[int, LossStats] = {}
        self.grads: dict[str, GradStats] = {}
        self.grad_order: list[str] = []
        self._model_order: list[str] = []
        self._model_order_key: tuple[Any, ...] = ()
        self.models: dict[str, ModelEvent] = {}
        self.optimizers: dict[int, OptimizerEvent] = {}
        self.step_times = Reservoir(10_000)
        self._first_step_time: float | None = None
        self._last_step_time: float | None = None
        self._steps_at_first = 0
        self.rss = DownsampledHistory(config.history_points)
        self.rss_peak = 0
        self.rss_last = 0
        self.cuda: dict[str, Any] = {}
        # (steps, minor page faults) at the first memory sample after a step, and at the latest
        self._faults_first: tuple[int, int] | None = None
        self._faults_last: tuple[int, int] | None = None
        self.output_tail: Callable[[], list[tuple[str, str]]] = lambda: []
        self.dropped_events: Callable[[], int] = lambda: 0
        self.actions: list[dict[str, Any]] = []
        self.scaler_skips = 0  # iterations a GradScaler skipped (no optimizer step)
        self.actions_dropped = 0
        self.action_listeners: list[Callable[[ActionResult], None]] = []
        self.ended: ScriptEnded | None = None
        self.loss_explosion = LossExplosion(config)
        self.plateau = Plateau(config)
        self._site_optimizer: dict[int, int] = {}  # loss site -> the optimizer whose step first read it
        # Losses that step optimizers of their own (a GAN's d_loss and g_loss): they settle at an
        # equilibrium, not fall, and "did not improve over 1,000 steps" was said of a healthy GAN
        self.plateau.adversarial = lambda: len(set(self._site_optimizer.values())) >= 2
        self.grad_detector = GradientNorms(config)
        self.slow_steps = SlowSteps(config)
        self.data_stall = DataStall(config)
        self.activation_health = ActivationHealth(config)
        self.update_ratio = UpdateRatio(config)
        self.update_ratio.grads = self.grads  # (its low finding tells shrunk gradients apart)
        self.grad_detector.converged = self.plateau.converged = self.update_ratio.converged
        self._finite_streak = 0
        self._gil = GilYield()
        self.memory_growth = MemoryGrowth(config)
        # auto mode: (action, finding key) -> description of what was done, or None
        self.auto_recover: Callable[[str, str], str | None] | None = None
        self._last_grad_names: list[str] | None = None
        self._last_grad_stats: list[GradStats] = []  # parallel to _last_grad_names
        self.redundant: set[str] = set()  # biases a BatchNorm cancels (no gradient by construction)
        # The models (the first name of a checked step's gradients) each loss site has trained: a site
        # that trains a model it has not trained before, after another, is a new model (a k-fold run's
        # next fold, a sweep's next trial), and its trends start again (its first loss was taken for
        # an explosion). Not a new optimizer over the same model (a script making one per step).
        self._site_models: dict[int, set[str]] = {}
        self._newest_opt = -1
        self._newest_opt_step = 0
        self._warm_until = 0  # the first steps of an optimizer that starts mid-run are not slow steps

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def steps_per_second(self) -> float | None:
        if self._first_step_time is None or self._last_step_time is None:
            return None
        span = self._last_step_time - self._first_step_time
        n = self.steps - self._steps_at_first
        return n / span if span > 0 and n > 0 else None

    # -- events -------------------------------------------------------------------------------
    def handle(self, batch: list[Any]) -> None:
        self._gil.begin()
        for ev in batch:
            try:
                if isinstance(ev, StepRecord):
                    self._on_step(ev)
                    if self.ended is None:  # (once the script has ended, no thread waits for the GIL)
                        self._gil.maybe()
                elif isinstance(ev, StepSpan):
                    self._on_span(ev)
                elif isinstance(ev, ScalerSkips):
                    self.scaler_skips += ev.count
                elif isinstance(ev, LateLosses):
                    verdicts = self._late_losses(ev.losses)
                    if verdicts:
                        self._apply(verdicts)
                elif isinstance(ev, FindingEvent):
                    self._on_finding(ev)
                elif isinstance(ev, Resolved):
                    self.tracker.resolve(ev.key)
                elif isinstance(ev, LossSiteEvent):
                    self.losses[ev.index] = LossStats(ev.name, ev.source,
                                                      history=DownsampledHistory(self.config.history_points))
                elif isinstance(ev, ModelEvent):
                    self.models[ev.name] = ev
                    if len(self.models) > self.MAX_LISTED:  # a model per trial of a long sweep: the latest
                        del self.models[next(iter(self.models))]
                elif isinstance(ev, RedundantBias):
                    self._on_redundant_bias(ev)
                elif isinstance(ev, OptimizerEvent):
                    self.optimizers[ev.index] = ev
                    if len(self.optimizers) > self.MAX_LISTED:  # (a script making one per step)
                        del self.optimizers[next(iter(self.optimizers))]
                elif isinstance(ev, ScriptEnded):
                    self._on_end(ev)
                elif isinstance(ev, ActionResult):
                    self.record_action(ev.action, {"ok": ev.ok, "message": ev.message, "action_step": ev.step,
                                                   "request_id": ev.request_id, **ev.detail})
                    for listener in list(self.action_listeners):
                        listener(ev)
            except Exception as exc:  # a bad event must not stop the consumer
                self.tracker.track_error(exc, ErrorSeverity.WARNING, ErrorCategory.SYSTEM_ERROR,
                                         context={"event": type(ev).__name__}, key=f"consumer|{type(exc).__name__}")
        self._gil.end()

    def _on_step(self, rec: StepRecord) -> None:
        if rec.step > self.steps:
            self.steps = rec.step
        if rec.checked and rec.step != self._last_checked_step:  # several optimizers: one step
            self._last_checked_step = rec.step
            self.checked_steps += 1
        if self._first_step_time is None:
            self._first_step_time = rec.time
            self._steps_at_first = rec.step
        self._last_step_time = rec.time
        if rec.duration > 0:
            self.step_times.add(rec.duration)
        verdicts: list[Verdict] = []
        if rec.optimizer > self._newest_opt:
            self._newest_opt = rec.optimizer
            if rec.step > 1 and rec.step - self._newest_opt_step > 10 * self.WARM_STEPS:  # (not one per step)
                self._warm_until = rec.step + self.WARM_STEPS
            self._newest_opt_step = rec.step
        if rec.grad_names and rec.losses and not rec.grad_names[0].startswith("optimizer"):  # (unnamed: no model)
            model = rec.grad_names[0].partition(".")[0]
            for site, _ in rec.losses:
                trained = self._site_models.setdefault(site, set())
                if model not in trained:
                    if trained:
                        self._new_model_at(site)
                    if len(trained) < 1000:
                        trained.add(model)
        if rec.late_losses:
            verdicts += self._late_losses(rec.late_losses)
        for site, value in rec.losses:
            if site not in self._site_optimizer and len(self._site_optimizer) < 1000:
                self._site_optimizer[site] = rec.optimizer
            stats = self.losses.get(site)
            if stats is not None:
                stats.add(rec.step, value)
                verdicts += self.loss_explosion.observe(stats.name, rec.step, value)
                verdicts += self.plateau.observe(stats.name, rec.step, value)
        verdicts += self.grad_detector.observe(rec)
        if rec.step >= self._warm_until:
            verdicts += self.slow_steps.observe(rec)
        verdicts += self.data_stall.observe(rec)
        if rec.act_stats:
            verdicts += self.activation_health.observe(rec)
        if rec.losses:
            self.update_ratio.observe_losses(rec)
        if rec.update_ratios:
            verdicts += self.update_ratio.observe(rec)
        if rec.losses or rec.grad_norms:
            verdicts += self._nonfinite_resolution(rec)
        if verdicts:
            self._apply(verdicts)
        if rec.grad_norms is not None and rec.grad_names is not None:
            names = rec.grad_names
            if names is not self._last_grad_names:
                for n in names:
                    if n not in self.grads:
                        self.grads[n] = GradStats()
                        self.grad_order.append(n)
                self._last_grad_names = names
                self._last_grad_stats = [self.grads[n] for n in names]
            step = rec.step
            for g, v in zip(self._last_grad_stats, rec.grad_norms):
                g.last = v
                g.last_step = step
                g.count += 1
                if v != v or v == math.inf:
                    g.nonfinite += 1
                else:
                    if v > g.max:
                        g.max = v
                    if v < g.min:
                        g.min = v

    def _new_model_at(self, site: int) -> None:
        stats = self.losses.get(site)
        if stats is not None:
            self.loss_explosion.forget(stats.name)
            self.plateau.forget(stats.name)
        self.update_ratio.forget(site)

    def grads_in_model_order(self) -> list[str]:
        """Parameter names by the models' order (as they first ran: a GAN's G before D even when D's
        optimizer stepped first), each model's in its own order; cached until either list grows."""
        key = (len(self.grad_order), len(self.models), next(reversed(self.models), None))
        if self._model_order_key != key:
            rank = {name: i for i, name in enumerate(self.models)}
            self._model_order = sorted(self.grad_order, key=lambda n: rank.get(n.partition(".")[0], len(rank)))
            self._model_order_key = key
        return self._model_order

    def _late_losses(self, late: list[tuple[int, int, float]]) -> list[Verdict]:
        """Earlier sampled-out steps' losses, in step order, read with a later step."""
        verdicts: list[Verdict] = []
        for step, site, value in late:
            stats = self.losses.get(site)
            if stats is not None:
                stats.add(step, value)
                verdicts += self.loss_explosion.observe(stats.name, step, value)
                verdicts += self.plateau.observe(stats.name, step, value)
        return verdicts

    def _on_span(self, span: StepSpan) -> None:
        """Sampled-out fast steps: they count, and their times feed the performance figures."""
        if span.last_step > self.steps:
            self.steps = span.last_step
        if self._first_step_time is None:
            self._first_step_time = span.time
            self._steps_at_first = span.last_step
        self._last_step_time = span.time
        self.step_times.extend([d for d in span.durations if d > 0])
        if span.losses:  # their values count in the loss's figures; its history gets the latest
            by_site: dict[int, list[float]] = {}
            for site, value in span.losses:
                by_site.setdefault(site, []).append(value)
            for site, values in by_site.items():
                stats = self.losses.get(site)
                if stats is not None:
                    stats.add_many(span.last_step, values)

    def _nonfinite_resolution(self, rec: StepRecord) -> list[Verdict]:
        """Non-finite findings stop holding after 20 checked steps with everything finite."""
        if not (all_finite([v for _, v in rec.losses]) and all_finite(rec.grad_norms or ())):
            self._finite_streak = 0
            return []
        self._finite_streak += 1
        if self._finite_streak != 20:
            return []
        return [Verdict(resolve=info.key) for info in self.tracker.snapshot()
                if info.key and info.key.startswith("nonfinite-") and not info.resolved]

    def _on_finding(self, ev: FindingEvent) -> None:
        info = self.tracker.track_error(ev.message, ErrorSeverity(ev.severity), ErrorCategory(ev.category),
                                        context=ev.context, step=ev.step, key=ev.key, traceback=ev.traceback,
                                        recommendation=ev.recommendation)
        if ev.recovery_action:
            info.recovery_action = ev.recovery_action

    def _on_redundant_bias(self, ev: RedundantBias) -> None:
        self.redundant.add(ev.parameter)
        self.grad_detector.no_signal_expected.add(ev.parameter)
        self._on_finding(FindingEvent(
            severity="info", category="model_error", step=ev.step, key=f"redundant-bias|{ev.parameter}",
            message=f"{ev.parameter} does nothing: {ev.module} feeds {ev.norm}, which subtracts each channel's "
                    "batch mean, so this bias cancels out and its gradient is ~0 by construction",
            context={"parameter": ev.parameter, "module": ev.module, "norm": ev.norm},
            recommendation=f"Create {ev.module.split(' ')[0]} with bias=False: the same model with fewer "
                           "parameters and no optimizer state for them."))

    def _apply(self, verdicts: list[Verdict]) -> None:
        for v in verdicts:
            if v.finding is not None:
                self._on_finding(v.finding)
                if v.action and self.config.recover == "auto" and self.auto_recover is not None:
                    done = self.auto_recover(v.action, v.finding.key)
                    if done:
                        self.tracker.set_recovery_action(v.finding.key, done)
            if v.resolve is not None:
                self.tracker.resolve(v.resolve)

    def _on_end(self, ev: ScriptEnded) -> None:
        self.ended = ev
        self.status = ev.status
        self.exit_code = ev.exit_code
        self.ended_at = time.time()
        self.steps = max(self.steps, ev.step)
        exc = ev.exception
        already = exc is not None and getattr(exc, "__tui_debug_info__", None) is not None  # the API tracked it
        if exc is not None and not isinstance(exc, KeyboardInterrupt) and not already:
            c = classify_exception(exc, ev.failing_modules, evaluating=ev.evaluating)
            mid_step = raised_mid_step(exc, ev.failing_modules) and not ev.evaluating
            step = self.steps + 1 if mid_step else self.steps
            self.tracker.track_error(c.message, ErrorSeverity(c.severity), ErrorCategory(c.category),
                                     context=c.context, step=step or None,
                                     key=f"exception|{c.category}|{c.message}", traceback=format_exception(exc),
                                     recommendation=c.recommendation)
        self.sample_memory()

    def mark_interrupted(self, signum: int) -> None:
        self.status = "interrupted"
        self.exit_code = 128 + signum
        self.ended_at = time.time()

    def record_action(self, action: str, detail: dict[str, Any]) -> None:
        if len(self.actions) >= 10_000:  # bounded; the count of what was cut is kept
            del self.actions[:1000]
            self.actions_dropped += 1000
        self.actions.append({"time": time.time(), "step": self.steps, "action": action, **detail})

    # -- sampling -------------------------------------------------------------------------------
    def sample_memory(self) -> None:
        ctx = memory_context()
        rss = ctx.get("rss_bytes")
        verdicts: list[Verdict] = []
        if rss:
            self.rss_last = rss
            self.rss_peak = max(self.rss_peak, rss)
            self.rss.add(self.steps, float(rss))
            if self.steps:
                verdicts += self.memory_growth.observe("rss", self.steps, float(rss), ctx.get("system_total_bytes"))
        faults = ctx.get("minor_faults")
        if faults is not None and self.steps:
            self._faults_last = (self.steps, faults)
            if self._faults_first is None:
                self._faults_first = self._faults_last
        cuda = {k: v for k, v in ctx.items() if k.startswith("cuda_")}
        if cuda:
            self.cuda = cuda
            if self.steps and "cuda_allocated_bytes" in cuda:
                verdicts += self.memory_growth.observe("cuda", self.steps, float(cuda["cuda_allocated_bytes"]))
        if verdicts and self.ended is None:
            self._apply(verdicts)

    # -- views ----------------------------------------------------------------------------------
    def page_faults_per_step(self) -> float | None:
        """Minor page faults of the whole process per training step, over at least 20 steps: memory
        the allocator gave back to the OS and touched again (on the CPU, glibc trims its heap)."""
        first, last = self._faults_first, self._faults_last
        if first is None or last is None or last[0] - first[0] < 20:
            return None
        return (last[1] - first[1]) / (last[0] - first[0])

    def loss_by_name(self) -> dict[str, LossStats]:
        return {s.name: s for s in self.losses.values()}

    def progress_line(self) -> str:
        parts = [f"step {self.steps}"]
        sps = self.steps_per_second()
        if sps:
            parts.append(f"{sps:.1f} steps/s")
        for s in list(self.losses.values())[:3]:
            if s.last is not None:
                parts.append(f"{s.name}={s.last:.4g}")
        summary = self.tracker.get_error_summary()
        unique, total = summary["unique_errors"] + summary["dropped_errors"], summary["total_errors"]
        # as the closing line counts them: distinct findings (occurrences when repeats add up)
        parts.append(f"{unique} finding{'s' if unique != 1 else ''}" + (f" ({total} times)" if total > unique else ""))
        if self.rss_last:
            parts.append(f"rss {self.rss_last / 2**20:.0f} MiB")
        return " | ".join(parts)

    def environment(self) -> dict[str, Any]:
        torch = sys.modules.get("torch")
        devices: list[dict[str, Any]] = [{"type": "cpu", "name": platform.processor() or platform.machine(),
                                          "count": os.cpu_count()}]
        versions = {"python": platform.python_version(), "torch": getattr(torch, "__version__", None)}
        try:
            from . import __version__

            versions["tui_debug"] = __version__
        except Exception:
            pass
        try:
            if torch is not None and torch.cuda.is_initialized():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    devices.append({"type": "cuda", "index": i, "name": p.name, "total_memory": p.total_memory})
        except Exception:
            pass
        return {"versions": versions, "devices": devices}
