"""Trend detectors: warn before the run is lost. They run in the consumer (main) thread on the
values the training thread already read, so they add no device work and no training-thread time.

Each detector returns ``Verdict``s: a finding to track, or a key to mark resolved. Thresholds live
in ``DebugConfig`` and are documented (with their reasons) in the README.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Any, Callable

from ..config import DebugConfig
from ..events import FindingEvent, StepRecord


@dataclasses.dataclass
class Verdict:
    finding: FindingEvent | None = None
    resolve: str | None = None
    action: str | None = None  # an automatic recovery the finding calls for (auto mode)


def _finite(v: float) -> bool:
    return v == v and v not in (math.inf, -math.inf)


def loss_rose(values: list[float], min_points: int = 20) -> tuple[float, float] | None:
    """(start, end) when a loss ended clearly higher than it started: medians of its first and last
    tenth (at least 5 values each), not its first and last values, which for noisy mini-batch losses
    said "ended higher" on a healthy run at its optimum (0.25 -> 1.26, medians 0.86 -> 0.84)."""
    finite = [v for v in values if _finite(v)]
    if len(finite) < min_points:
        return None
    k = max(5, len(finite) // 10)
    start, end = statistics.median(finite[:k]), statistics.median(finite[-k:])
    if end > start * 1.5 and end - start > 1e-6:
        return start, end
    return None


def all_finite(values: Any) -> bool:
    """Every value finite: one C-level sum in the common case (NaN and +-inf make the sum
    non-finite; finite values summing past the float range are told apart one by one)."""
    total = sum(values)
    return total - total == 0 or all(v - v == 0 for v in values)


def _median(values: Any) -> float:
    """statistics.median without its overhead (these run once per step)."""
    data = sorted(values)
    n = len(data)
    mid = n // 2
    return data[mid] if n % 2 else (data[mid - 1] + data[mid]) / 2


class LossExplosion:
    """A loss that grows by orders of magnitude over a few steps, while still finite.

    Baseline: the best (lowest) median-of-``window`` seen so far, after ``warmup`` points, so one
    noisy batch or the first steps of training do not count. Fires when the current median-of-window
    exceeds the baseline by ``loss_explosion_factor`` and the last ``window`` values rose overall.
    """

    def __init__(self, config: DebugConfig) -> None:
        self.factor = config.loss_explosion_factor
        self.window = config.loss_window
        self.warmup = config.loss_warmup
        self.state: dict[str, dict[str, Any]] = {}

    def forget(self, name: str) -> None:
        """A new model trains through this loss (a new fold): its baseline starts again."""
        self.state.pop(name, None)

    def observe(self, name: str, step: int, value: float) -> list[Verdict]:
        st = self.state.get(name)
        if st is None:  # (not setdefault: its default, built on every call, was most of this method's time)
            st = self.state[name] = {"recent": collections.deque(maxlen=self.window), "n": 0, "best": None,
                                     "best_step": None, "firing": False, "fired_at": 0.0, "first": None}
        if not _finite(value):
            return []
        st["recent"].append(value)
        st["n"] += 1
        if len(st["recent"]) < self.window:
            return []
        med = _median(st["recent"])
        key = f"loss-explosion|{name}"
        if st["first"] is None:
            st["first"] = med
        if st["n"] <= self.warmup or st["best"] is None:
            if st["n"] > self.window and (st["best"] is None or abs(med) < abs(st["best"])):
                st["best"], st["best_step"] = med, step
            return []
        best = st["best"]
        scale = max(abs(best), 0.01 * abs(st["first"]), 1e-8)  # a loss near 0 may wobble 100x: not an explosion
        rising = st["recent"][-1] > st["recent"][0]
        again = st["firing"] and rising and med > self.factor * max(st["fired_at"], 1e-8)
        if (not st["firing"] and med > best + (self.factor - 1) * scale and rising) or again:
            st["firing"] = True
            st["fired_at"] = med  # a further factor of growth fires again (recovery did not help yet)
            ratio = (med - best) / scale + 1
            return [Verdict(FindingEvent(
                severity="warning", category="loss_error", step=step, key=key,
                message=f"loss '{name}' is exploding: {med:.4g} now vs {best:.4g} at step {st['best_step']} "
                        f"({ratio:.3g}x) while still finite",
                context={"loss": name, "current_median": med, "best_median": best, "best_step": st["best_step"],
                         "ratio": ratio, "window": self.window},
                recommendation="Lower the learning rate (by 10x to start), add gradient clipping, or check the "
                               "warm-up schedule; --recover auto halves the learning rate."), action="lower_lr")]
        if st["firing"] and med < best + (self.factor / 10) * scale:
            st["firing"] = False
            return [Verdict(resolve=key)]
        if not st["firing"] and abs(med) < abs(best):
            st["best"], st["best_step"] = med, step
        return []


class GradientNorms:
    """Exploding and vanishing gradients, per layer, against their own history.

    Exploding: the total norm exceeds ``grad_explosion_factor`` x its running median (last 100
    steps, after ``grad_warmup`` steps) on 2 consecutive steps; the layers that grew most are named.
    Vanishing: a layer whose norm stays below ``vanishing_ratio`` x the largest layer's norm and
    below ``vanishing_abs`` for ``vanishing_steps`` consecutive steps (0 counts: it gets no signal);
    not when every layer's is that small and the losses have converged (``converged``: an exact fit
    has no gradient left, a loss of 1e-33 gave "no gradient at all").
    """

    CANCELLED = 1e-6  # a bias gradient this small against its own weight's: what rounding leaves of a 0

    def __init__(self, config: DebugConfig) -> None:
        self.factor = config.grad_explosion_factor
        self.warmup = config.grad_warmup
        self.v_ratio = config.vanishing_ratio
        self.v_abs = config.vanishing_abs
        self.v_steps = config.vanishing_steps
        self.totals: dict[int, collections.deque[float]] = {}
        self.layer_med: dict[str, float] = {}
        self.over: dict[int, int] = {}
        self.firing: set[int] = set()
        self.low: dict[str, int] = {}
        self.vanishing_reported: set[str] = set()
        self.no_signal_expected: set[str] = set()  # parameters whose gradient is ~0 by design (redundant biases)
        # consecutive checked steps with a gradient of 0, or (a bias) under CANCELLED of its weight's
        self.zero: dict[str, int] = {}
        self.converged: Callable[[], bool] = lambda: False  # every loss fell 1000x (the session's UpdateRatio)
        self.seen = 0
        self._med: dict[int, tuple[int, float]] = {}  # optimizer -> (appends when computed, median)
        self._appends: dict[int, int] = {}

    def observe(self, rec: StepRecord) -> list[Verdict]:
        names, norms = rec.grad_names, rec.grad_norms
        if not names or not norms:
            return []
        out: list[Verdict] = []
        if not all_finite(norms):
            return []  # non-finite: the nonfinite detector speaks
        total = math.hypot(*norms)
        hist = self.totals.get(rec.optimizer)
        if hist is None:
            hist = self.totals[rec.optimizer] = collections.deque(maxlen=100)
        key = f"grad-explosion|{rec.optimizer}"
        if len(hist) >= self.warmup:
            med = self._median(rec.optimizer, hist)
            if med > 0 and total > self.factor * med:
                med = self._median(rec.optimizer, hist, exact=True)
            if med > 0 and total > self.factor * med:
                self.over[rec.optimizer] = self.over.get(rec.optimizer, 0) + 1
                if self.over[rec.optimizer] == 2 and rec.optimizer not in self.firing:
                    self.firing.add(rec.optimizer)
                    growth = sorted(((v / max(self.layer_med.get(n, v), 1e-30), n) for n, v in zip(names, norms)), reverse=True)
                    top = [f"{n} ({g:.3g}x)" for g, n in growth[:3]]
                    out.append(Verdict(FindingEvent(
                        severity="warning", category="gradient_error", step=rec.step, key=key,
                        message=f"exploding gradients: total norm {total:.4g} is {total / med:.3g}x its recent "
                                f"median {med:.4g}; grew most in {', '.join(top)}",
                        context={"total_norm": total, "median": med, "ratio": total / med,
                                 "layers": [n for _, n in growth[:10]]},
                        recommendation="Clip gradients (torch.nn.utils.clip_grad_norm_) at a few times the usual "
                                       "norm, lower the learning rate, or check for a bad batch; --recover auto "
                                       "enables clipping."), action="enable_clipping"))
            else:
                self.over[rec.optimizer] = 0
                if rec.optimizer in self.firing and total < 3 * med:
                    self.firing.discard(rec.optimizer)
                    out.append(Verdict(resolve=key))
            if total <= self.factor * med:
                hist.append(total)
                self._appends[rec.optimizer] = self._appends.get(rec.optimizer, 0) + 1
        else:
            hist.append(total)
            self._appends[rec.optimizer] = self._appends.get(rec.optimizer, 0) + 1
        self.seen += 1
        if self.seen <= self.warmup or self.seen % 8 == 0:
            for n, v in zip(names, norms):  # per-layer typical norms (an EMA of the log, sampled: it only names layers)
                prev = self.layer_med.get(n)
                self.layer_med[n] = v if prev is None or prev <= 0 or v <= 0 else math.exp(
                    0.8 * math.log(prev) + 0.2 * math.log(v))
        if self.low or min(norms) < self.v_abs:  # (no layer is low, nor was: nothing to count)
            out.extend(self._vanishing(rec, list(zip(names, norms))))
        return out

    def _median(self, opt: int, hist: collections.deque[float], exact: bool = False) -> float:
        """The running median, recomputed every 8 new values (exactly before it fires)."""
        n = self._appends.get(opt, 0)
        cached = self._med.get(opt)
        if exact or cached is None or n - cached[0] >= 8:
            cached = self._med[opt] = (n, _median(hist))
        return cached[1]

    def _vanishing(self, rec: StepRecord, finite: list[tuple[str, float]]) -> list[Verdict]:
        largest = max(v for _, v in finite)
        if largest <= 0 or (largest < self.v_abs and self.converged()):
            return []
        out = []
        newly = []
        skip = self.no_signal_expected
        norm_of: dict[str, float] | None = None
        for n, v in finite:
            if v < self.v_abs and v < self.v_ratio * largest and n not in skip:
                c = self.low[n] = self.low.get(n, 0) + 1
                weight = 0.0
                if n.endswith(".bias"):
                    norm_of = norm_of if norm_of is not None else dict(finite)
                    weight = norm_of.get(n[:-4] + "weight", 0.0)
                if v == 0 or weight > self.v_abs and v < self.CANCELLED * weight:
                    self.zero[n] = self.zero.get(n, 0) + 1
                else:
                    self.zero.pop(n, None)
                if c == self.v_steps and n not in self.vanishing_reported:
                    if self.zero.get(n, 0) >= self.v_steps and weight > self.v_abs:
                        # its weight learns: the loss cancels this bias
                        out.append(self._cancelled_bias(rec, n, n[:-4] + "weight"))
                        skip.add(n)
                        continue
                    newly.append((n, v))
            elif n in self.low:
                self.zero.pop(n, None)
                if n in self.vanishing_reported and v > 10 * self.v_abs:
                    self.vanishing_reported.discard(n)
                    out.append(Verdict(resolve=f"vanishing|{n}"))  # resolves when its group's first layer recovers
                del self.low[n]
        if newly:
            for n, _ in newly:
                self.vanishing_reported.add(n)
            n0, v0 = newly[0]
            ratio = v0 / largest
            more = f" and {len(newly) - 1} more layers" if len(newly) > 1 else ""
            what = (f"no gradient at all (norm 0; the largest layer's is {largest:.3g})" if v0 == 0 else
                    f"norm {v0:.3g}, {ratio:.2g} of the largest layer's ({largest:.3g})")
            out.append(Verdict(FindingEvent(
                severity="warning", category="gradient_error", step=rec.step, key=f"vanishing|{n0}",
                message=f"vanishing gradient in {n0}{more}: {what} for {self.v_steps} steps",
                context={"parameters": [[n, v, v / largest] for n, v in newly[:50]], "largest": largest,
                         "steps": self.v_steps},
                recommendation="Use a non-saturating activation (ReLU/GELU instead of sigmoid/tanh), residual "
                               "connections or normalisation layers, and a proper initialisation "
                               "(kaiming/xavier); a layer with no gradient at all may be disconnected from the "
                               "loss, or behind dead ReLUs.")))
        return out


    def _cancelled_bias(self, rec: StepRecord, bias: str, weight: str) -> Verdict:
        """A bias whose gradient is 0 step after step while its layer's weight learns: the loss does
        not depend on it (a WGAN critic's last bias cancels in mean(D(fake)) - mean(D(real))), as a
        bias before a BatchNorm does: nothing vanishes, and the vanishing-gradient advice was wrong.
        Attention's key bias too (softmax ignores what it adds to every score of a query), where
        rounding leaves 1e-9 to 1e-12 (CANCELLED of its weight's): every BERT was warned of it."""
        return Verdict(FindingEvent(
            severity="info", category="model_error", step=rec.step, key=f"cancelled-bias|{bias}",
            message=f"{bias} does nothing: its gradient has been 0 (to rounding) for {self.v_steps} steps while "
                    f"{weight} learns, so the loss does not depend on it (it adds a constant the loss "
                    "cancels, as in a difference of means or attention's softmax)",
            context={"parameter": bias, "weight": weight, "steps": self.v_steps},
            recommendation="If the loss is meant to cancel it (a WGAN critic's output layer), create the layer "
                           "with bias=False; otherwise check that this layer's output reaches the loss."))


class SlowSteps:
    """Step-time outliers: more than ``slow_step_factor`` x the recent median and over 0.25 s (shorter
    hiccups come from the machine, not the run). The median is computed only for a step over 0.25 s,
    so a run at thousands of steps per second pays one comparison per step."""

    MIN_S = 0.25

    def __init__(self, config: DebugConfig) -> None:
        self.factor = config.slow_step_factor
        self.recent: collections.deque[float] = collections.deque(maxlen=200)

    def observe(self, rec: StepRecord) -> list[Verdict]:
        d = rec.duration
        if d <= 0:
            return []
        out = []
        if d > self.MIN_S and len(self.recent) >= 20:
            med = statistics.median(self.recent)
            if d > self.factor * med:
                out.append(Verdict(FindingEvent(
                    severity="info", category="timeout_error", step=rec.step, key="slow-step",
                    message=f"step {rec.step} took {d:.3g}s, {d / med:.3g}x the median {med:.3g}s",
                    context={"duration_s": d, "median_s": med, "ratio": d / med},
                    recommendation="Occasional slow steps come from evaluation, checkpointing, garbage "
                                   "collection or data-loader stalls; regular ones from variable input sizes "
                                   "(recompilation, allocator growth).")))
        self.recent.append(d)
        return out


class MemoryGrowth:
    """Steady RSS (or CUDA allocated) growth across steps: a leak, e.g. losses kept with their graphs.

    A least-squares line through the last samples (step, bytes): fires when it explains the data well
    (R^2 >= 0.9), the growth over the window is at least ``leak_min_bytes``, and the series spans at
    least 50 steps. Also warns when RSS passes 90% of the system's memory.
    """

    def __init__(self, config: DebugConfig) -> None:
        self.min_bytes = config.leak_min_bytes
        self.samples: dict[str, collections.deque[tuple[int, float]]] = {}
        self.fired: set[str] = set()
        self.capacity_fired = False

    def observe(self, kind: str, step: int, value: float, total: float | None = None) -> list[Verdict]:
        buf = self.samples.setdefault(kind, collections.deque(maxlen=30))
        if buf and buf[-1][0] == step:
            buf[-1] = (step, value)
        else:
            buf.append((step, value))
        out = []
        if total and kind == "rss" and value > 0.9 * total and not self.capacity_fired:
            self.capacity_fired = True
            out.append(Verdict(FindingEvent(
                severity="warning", category="memory_error", step=step, key="memory-capacity|rss",
                message=f"process memory {value / 2**30:.2f} GiB is over 90% of the system's {total / 2**30:.2f} GiB",
                context={"rss_bytes": value, "system_total_bytes": total},
                recommendation="Reduce the batch size or the data kept in memory; an out-of-memory kill is near.")))
        if len(buf) < 8 or kind in self.fired:
            return out
        xs = [float(s) for s, _ in buf]
        ys = [v for _, v in buf]
        span = xs[-1] - xs[0]
        if span < 50:
            return out
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            return out
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        ss_tot = sum((y - my) ** 2 for y in ys)
        ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
        r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 0.0
        growth = slope * span
        if slope > 0 and r2 >= 0.9 and growth >= self.min_bytes:
            self.fired.add(kind)
            what = "process RSS" if kind == "rss" else "CUDA allocated memory"
            out.append(Verdict(FindingEvent(
                severity="warning", category="memory_error", step=step, key=f"memory-leak|{kind}",
                message=f"{what} grows steadily: +{slope * 100 / 2**20:.2f} MiB per 100 steps "
                        f"(+{growth / 2**20:.1f} MiB over steps {int(xs[0])}-{int(xs[-1])})",
                context={"kind": kind, "bytes_per_step": slope, "growth_bytes": growth, "r2": r2,
                         "first_step": int(xs[0]), "last_step": int(xs[-1])},
                recommendation="Something keeps tensors alive across steps: a list of losses kept with their "
                               "graphs (append loss.item(), not loss), metrics accumulated as tensors, or a "
                               "growing cache.")))
        return out


class Plateau:
    """A loss that stopped improving: its best value improved by less than 0.1% over the last
    ``plateau_steps`` steps (info: convergence, or a learning rate far too small)."""

    def __init__(self, config: DebugConfig) -> None:
        self.steps = config.plateau_steps
        self.state: dict[str, dict[str, Any]] = {}
        self.converged: Callable[[], bool] = lambda: False  # every loss fell 1000x (the session's UpdateRatio)
        self.adversarial: Callable[[], bool] = lambda: False  # losses of their own per optimizer (a GAN)

    def forget(self, name: str) -> None:
        """A new model trains through this loss (a new fold): its best so far starts again."""
        self.state.pop(name, None)

    def observe(self, name: str, step: int, value: float) -> list[Verdict]:
        if not _finite(value):
            return []
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"best": value, "marks": collections.deque(), "fired": False, "start": step}
        if value < st["best"]:
            st["best"] = value
        marks = st["marks"]  # (step, best so far), one per ~1% of the window
        if not marks or step - marks[-1][0] >= max(1, self.steps // 100):
            marks.append((step, st["best"]))
        while len(marks) > 1 and step - marks[1][0] >= self.steps:
            marks.popleft()
        then_step, then_best = marks[0]
        if step - then_step < self.steps:
            return []
        improvement = then_best - st["best"]
        stalled = improvement < 1e-3 * max(abs(st["best"]), 1e-12)
        key = f"plateau|{name}"
        if stalled and not st["fired"]:
            st["fired"] = True
            if self.adversarial():
                return []
            if self.converged():
                return [Verdict(FindingEvent(
                    severity="info", category="optimization_error", step=step, key=key,
                    message=f"loss '{name}' has converged: it fell 1000x or more and improved by only "
                            f"{improvement:.3g} over the last {step - then_step} steps (best {st['best']:.4g})",
                    context={"loss": name, "best": st["best"], "improvement": improvement,
                             "window": step - then_step, "converged": True},
                    recommendation="Training has converged: stop early, or lower the learning rate for a last "
                                   "refinement."))]
            return [Verdict(FindingEvent(
                severity="info", category="optimization_error", step=step, key=key,
                message=(f"loss '{name}' did not improve" if improvement <= 0 else
                         f"loss '{name}' improved by only {improvement:.3g} "
                         f"({improvement / max(abs(then_best), 1e-12):.2%})") + " "
                        f"over the last {step - then_step} steps (best {st['best']:.4g})",
                context={"loss": name, "best": st["best"], "improvement": improvement, "window": step - then_step},
                recommendation="If the loss is still high, the learning rate may be too small or too large "
                               "(try a learning-rate range test), or the model lacks capacity; if it is "
                               "low, training has converged: stop early."))]
        if not stalled and st["fired"]:
            st["fired"] = False
            return [Verdict(resolve=key)]
        return []


class DataStall:
    """Steps dominated by waiting for the next batch: over the last 50 steps, the median share of the
    step spent between the end of the previous step and the next forward is over one half (info: a
    performance finding). One stall is not a pattern, hence the median; it resolves below a quarter.

    The median is tracked with two running counts (shares over 1/2, shares under 1/4), so each step
    costs O(1) at any step rate.
    """

    WINDOW = 50

    def __init__(self, config: DebugConfig) -> None:
        self.recent: collections.deque[tuple[float, float]] = collections.deque()
        self.wait = 0.0
        self.total = 0.0
        self.over_half = 0  # steps in the window with wait/duration > 0.5
        self.under_quarter = 0  # ... < 0.25
        self.fired = False

    def observe(self, rec: StepRecord) -> list[Verdict]:
        d = rec.duration
        if d <= 0:
            return []
        w = rec.wait
        recent = self.recent
        recent.append((w, d))
        self.wait += w
        self.total += d
        self.over_half += w > 0.5 * d
        self.under_quarter += w < 0.25 * d
        if len(recent) > self.WINDOW:
            ow, od = recent.popleft()
            self.wait -= ow
            self.total -= od
            self.over_half -= ow > 0.5 * od
            self.under_quarter -= ow < 0.25 * od
        n = len(recent)
        if n < self.WINDOW:
            return []
        if not self.fired and 2 * self.over_half > n and self.total / n > 0.002:
            self.fired = True
            share = statistics.median(min(1.0, w / d) for w, d in recent)
            return [Verdict(FindingEvent(
                severity="info", category="data_error", step=rec.step, key="data-stall",
                message=f"{share:.0%} of each step is spent between the optimizer step and the next forward "
                        f"(waiting for data, or the script's own code there)",
                context={"wait_share": share, "mean_wait_s": max(0.0, self.wait) / n, "mean_step_s": self.total / n},
                recommendation="If it is data loading: raise DataLoader num_workers, use pin_memory=True and "
                               "persistent_workers=True, or move heavy transforms offline; otherwise look at "
                               "what the loop does before its forward (logging, evaluation, sleeps)."))]
        if self.fired and 2 * self.under_quarter > n:
            self.fired = False
            return [Verdict(resolve="data-stall")]
        return []


class ActivationHealth:
    """Dead ReLU units and saturated tanh/sigmoid layers, from sampled activation statistics.

    Dead: a unit (channel/feature) with no positive output in any of ``activation_window`` sampled
    batches (every ``activation_stats_every`` checked steps); fires when more than ``dead_fraction`` of
    a layer's units are dead. Saturated: the share of outputs within 1e-3 of the asymptotes, averaged
    over the same number of samples, above ``saturation_fraction``.
    """

    def __init__(self, config: DebugConfig) -> None:
        self.dead = config.dead_fraction
        self.sat = config.saturation_fraction
        self.window = config.activation_window
        self.sat_hist: dict[str, collections.deque[float]] = {}
        self.fired: set[str] = set()

    def observe(self, rec: StepRecord) -> list[Verdict]:
        out: list[Verdict] = []
        for label, kind, n, value in rec.act_stats or []:
            if value != value:
                continue
            if kind == "relu":
                if n != self.window:
                    continue
                key = f"dead-units|{label}"
                if value > self.dead and key not in self.fired:
                    self.fired.add(key)
                    out.append(Verdict(FindingEvent(
                        severity="warning", category="model_error", step=rec.step, key=key,
                        message=f"{label}: {value:.0%} of units never active over the last {self.window} "
                                f"sampled batches (dead ReLUs)",
                        context={"module": label, "dead_share": value, "samples": self.window},
                        recommendation="Lower the learning rate, use LeakyReLU/GELU, check the initialisation "
                                       "(kaiming) and the bias init; a large negative bias kills units.")))
                elif key in self.fired and value < self.dead / 2:
                    self.fired.discard(key)
                    out.append(Verdict(resolve=key))
            else:
                hist = self.sat_hist.setdefault(label, collections.deque(maxlen=self.window))
                hist.append(value)
                key = f"saturated|{label}"
                if len(hist) < self.window:
                    continue
                share = sum(hist) / len(hist)
                if share > self.sat and key not in self.fired:
                    self.fired.add(key)
                    out.append(Verdict(FindingEvent(
                        severity="warning", category="model_error", step=rec.step, key=key,
                        message=f"{label}: {share:.0%} of outputs saturated ({kind} within 1e-3 of its limits)",
                        context={"module": label, "saturated_share": share, "samples": len(hist)},
                        recommendation="Saturated units pass almost no gradient: normalise the inputs, lower "
                                       "the initial weight scale, or use ReLU/GELU.")))
                elif key in self.fired and share < self.sat / 2:
                    self.fired.discard(key)
                    out.append(Verdict(resolve=key))
        return out


class UpdateRatio:
    """|update| / |weight| per layer, sampled every ``update_ratio_every`` checked steps. The median over
    layers above ``update_ratio_high`` means a learning rate far too large; below ``update_ratio_low``
    on 3 samples in a row, far too small (healthy training sits around 1e-4..1e-2) - unless every loss
    has fallen 1000x from its first value: a run that converged has tiny gradients and tiny updates."""

    CONVERGED = 1e-3
    SHRUNK = 1000.0  # gradients this many times smaller than their largest: they shrank (see observe)

    def _grad_shrink(self, names: list[str]) -> float | None:
        """The median over ``names`` of (largest gradient norm seen) / (latest one)."""
        shrink = []
        for n in names:
            g = self.grads.get(n)
            if g is None or not g.count or not 0 < g.max < math.inf:
                continue
            shrink.append(g.max / g.last if g.last > 0 else math.inf)
        return statistics.median(shrink) if shrink else None

    def __init__(self, config: DebugConfig) -> None:
        self.high = config.update_ratio_high
        self.low = config.update_ratio_low
        self.low_count = 0
        self.fired: set[str] = set()
        self.first_loss: dict[int, float] = {}
        self.last_loss: dict[int, float] = {}
        # the session's gradient figures by parameter name (``max`` and ``last`` norm over checked steps)
        self.grads: dict[str, Any] = {}

    def observe_losses(self, rec: StepRecord) -> None:
        """Every checked step's losses (cheap): the first and the latest size of each."""
        for site, v in rec.losses:
            if _finite(v):
                self.first_loss.setdefault(site, abs(v))
                self.last_loss[site] = abs(v)

    def forget(self, site: int) -> None:
        """A new model trains through this loss (a new fold): its first value is the new model's."""
        self.first_loss.pop(site, None)
        self.last_loss.pop(site, None)

    def converged(self) -> bool:
        first = self.first_loss
        return bool(first) and all(self.last_loss[s] <= self.CONVERGED * f for s, f in first.items())

    def observe(self, rec: StepRecord) -> list[Verdict]:
        ratios = [r for _, r in rec.update_ratios or []]
        if not ratios or not all(_finite(r) for r in ratios):
            return []  # non-finite weights: the nonfinite detector speaks
        med = statistics.median(ratios)
        out: list[Verdict] = []
        top = sorted(rec.update_ratios or [], key=lambda nr: -nr[1])[:3]
        ctx = {"median_ratio": med, "largest": [[n, r] for n, r in top]}
        if med > self.high and "update-high" not in self.fired:
            self.fired.add("update-high")
            out.append(Verdict(FindingEvent(
                severity="warning", category="optimization_error", step=rec.step, key="update-ratio|high",
                message=f"updates are {med:.2g}x the size of the weights (median over layers): the learning "
                        f"rate is far too large",
                context=ctx, recommendation="Lower the learning rate by 10-100x; healthy updates are about "
                                            "1e-3 of the weights."), action="lower_lr"))
        self.low_count = self.low_count + 1 if med < self.low and not self.converged() else 0
        if self.low_count == 3 and "update-low" not in self.fired:
            self.fired.add("update-low")
            size = ("no longer change the weights (too small for float32 to add)" if med == 0
                    else f"are {med:.2g}x the size of the weights")
            shrink = self._grad_shrink([n for n, _ in rec.update_ratios or []])
            if shrink is not None and shrink >= self.SHRUNK:
                # Their gradients were 1000x larger earlier in the run: a run at its minimum looks like this
                # (a regression down to its noise: the loss flat, not 1000x lower), as do gradients that
                # vanish; a learning rate far too small leaves the gradients as large as they were.
                ctx["gradient_shrink"] = shrink if math.isfinite(shrink) else None  # (None: now exactly 0)
                shrank = ("their gradients are 0 now" if math.isinf(shrink)
                          else f"their gradients {shrink:.2g}x smaller than their largest")
                out.append(Verdict(FindingEvent(
                    severity="info", category="optimization_error", step=rec.step, key="update-ratio|low",
                    message=f"updates {size} (median over layers) and {shrank}: as when a run has converged, "
                            f"or gradients vanish",
                    context=ctx, recommendation="Nothing to do if the loss is where it should be. If it is still "
                                                "too high, look for dead or saturated units and check that "
                                                "gradients reach the weights.")))
            else:
                out.append(Verdict(FindingEvent(
                    severity="warning", category="optimization_error", step=rec.step, key="update-ratio|low",
                    message=f"updates {size} (median over layers): the learning rate is far too small, or "
                            f"gradients vanish",
                    context=ctx, recommendation="Raise the learning rate; check that gradients reach the weights.")))
        return out
