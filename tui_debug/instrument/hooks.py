"""Zero-code instrumentation of a PyTorch training loop, with one device read per optimizer step.

Installed by the runner right after the script imports torch. Runs in the training thread and
never blocks it: metrics leave as batched events through ``emit`` (the EventBus).

- A wrapper of ``nn.Module.__call__`` (not global forward hooks, which put every module call on
  torch's slow path): a stack of running modules (the innermost module when an exception escapes),
  root-model discovery, and cheap finiteness sentinels (a float32 sum of each module's output and,
  when it is not the previous output, its input).
- Patched ``torch.autograd.backward``: every loss, told apart by call site.
- Global optimizer step hooks: the step boundary; per-parameter gradient norms with
  ``torch._foreach_norm`` grouped by (device, dtype); then everything the step needs is stacked
  into one tensor and read once (on CUDA asynchronously through pinned memory and an event).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import os
import random
import sys
import threading
import time
import warnings
import weakref
from types import ModuleType
from typing import Any, Callable

from .. import distributed
from ..config import DebugConfig
from ..detectors.nonfinite import ActivationCall, NonFiniteDetector, StepObservation
from ..events import (FindingEvent, LateLosses, LossSiteEvent, ModelEvent, OptimizerEvent, RedundantBias, Resolved,
                      ScalerSkips, StepRecord, StepSpan)
from . import naming
from .norms import foreach_norm

FLUSH_INTERVAL_S = 0.15  # step records are batched this long (findings go at once); each hand-over wakes the consumer
SPAN_BREAK_S = 0.1  # a sampled-out step slower than this is sent on its own (slow-step detection)
# Parameter-free modules whose output is finite whenever their input is: they can never be the
# first module to produce a non-finite value, so their outputs are not read (matched by exact type:
# a subclass may override forward). ~40% fewer bytes read on a conv net.
FINITE_PRESERVING = (
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh", "Hardtanh",
    "Hardswish", "Hardsigmoid", "Softsign", "Softplus", "Tanhshrink", "Softmax", "LogSoftmax", "Softmin",
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "Flatten", "Unflatten", "Identity", "Upsample", "UpsamplingNearest2d", "PixelShuffle", "PixelUnshuffle",
    "ChannelShuffle")
SENTINEL_CHUNK = 8
# On CUDA every reduction is a kernel launch (~10 us of the training thread's time): activations are
# queued for one _foreach_norm per chunk (or per this many elements) instead of a sum each.
SENTINEL_CHUNK_CUDA = 32
SENTINEL_CHUNK_CUDA_ELEMS = 1 << 26
# A sampled-out step whose CPU loss is this many times its optimizer's recent high is checked after
# all (its gradients, at its boundary), and so are the LOSS_JUMP_QUIET steps after it: a burst of bad
# batches shows in the loss first, and a few steps of exploding gradients fell between checks. The
# recent high is a peak that decays by LOSS_DECAY a step, not an average: batch-1 losses (mostly
# ~0.04, a misclassified sample's ~4) cleared 10x their average every ~100 steps, and a third of the
# steps were checked.
LOSS_JUMP = 10.0
LOSS_JUMP_QUIET = 16
LOSS_DECAY = 0.99
LOSS_JUMP_WARMUP = 16  # sampled-out steps of an optimizer before its losses can jump
LATE_MAX = 256  # losses of sampled-out GPU steps waiting for the next checked read (then one is forced)
PINNED_POOL = 4  # pinned host buffers (+ events) kept per read size and device, reused once read
SENTINEL_HOT = 1 << 16  # elements: a tensor this large is reduced at once, while it is in the CPU's cache
# Autograd nodes whose output is finite whenever their one input is: views and copies, activations,
# softmax. A tensor made from a measured one by a chain of these is not read again (the residual
# stream, F.relu between two Linears, a loss's reshaped input).
GRAPH_UNARY = frozenset((
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0", "CloneBackward0",
    "TransposeBackward0", "TransposeBackward1", "TBackward0", "PermuteBackward0", "ExpandBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "SliceBackward0",
    "SelectBackward0", "ReluBackward0", "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0",
    "HardtanhBackward0", "LeakyReluBackward0", "EluBackward0", "HardswishBackward0", "HardsigmoidBackward0",
    "MishBackward0", "SoftmaxBackward0", "LogSoftmaxBackward0"))
# Element-wise sums of two tensors: finite when both are, unless the sum overflows, which float32,
# float64 and bfloat16 do only above ~3.4e38 (float16 overflows at 65504: its sums are read).
GRAPH_SUM = frozenset(("AddBackward0", "SubBackward0"))
# The other way round, what a finite value tells about where it came from. These keep every element
# of their input, so a non-finite input makes a non-finite output: views and copies among the nodes,
# and, among modules, the matrix products and normalisations below (a NaN or Inf in a row reaches
# every output of that row: 0 x Inf is NaN) and the finite-preserving ones that drop nothing.
# ReLU is not one (-Inf -> 0), nor are pooling, slicing or attention (masking drops values).
# tests/test_instrument.py checks each against the installed torch.
GRAPH_PROPAGATING = frozenset((
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0", "CloneBackward0",
    "TransposeBackward0", "TransposeBackward1", "TBackward0", "PermuteBackward0", "ExpandBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0"))
PROPAGATING_MODULES = ("Linear", "LayerNorm", "RMSNorm", "GroupNorm")
PROPAGATING_SAFE = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity", "Flatten", "Unflatten")
# torch's containers whose own code only hands a tensor from one child to the next (the layers' residual
# adds aside, which the autograd graph shows): called inside a model, they run without hooks (see
# _call_container), and a large output passes through them to the module that reads it.
CONTAINERS = ("Sequential", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
              "TransformerDecoderLayer", "Transformer")
# Modules that read their input without changing it (torch's own, exact types): a large activation
# handed to one may wait for its proof (see _resolve_hot); any other module might change it in place.
SAFE_READERS = ("MultiheadAttention", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                "ConvTranspose3d", "Bilinear", "Embedding", "EmbeddingBag", "LSTM", "GRU", "RNN")
REPLAY_MAX = 16  # model calls kept per step for a replay (micro-batches x models); more: no replay
# their tensor arguments' bytes past the first call's (held longer than the script would: gradient
# accumulation over large CPU batches): more, and the step is not replayed
REPLAY_BYTES = 64 << 20
REPLAY_FINITE = object()  # a replay that made nothing non-finite (see Instrumentation._replay)
DEFER_MAX = 64  # large activations held at once, waiting for a later sum to prove them finite
LIGHT_MAX = 64  # finite-preserving module calls waiting for the next hook to record what they derive
GRAPH_DEPTH = 6  # nodes followed back from a tensor to a measured one
VIRTUAL = 1 << 40  # sentinel indices from here name a sum of other sentinels (see _node_index)
# Model forwards with gradients on whose output the script dropped with no backward (an evaluation
# loop without torch.no_grad): after this many in a row, their sentinels are dropped unread. Kept, their
# small tensors land in the holes the forwards' large activations leave, and glibc's heap then grows by
# a forward's size each time. (An RNN cell called step by step keeps its output alive: not counted.)
UNREAD_FORWARDS = 8
# Backwards before a first optimizer step, with an optimizer made, beyond which the script is taken to
# update by hand after all (an optimizer kept for zero_grad or a scheduler): gradient accumulation
# rarely goes that far
ACCUMULATION_MAX = 1024
STUCK_SKIPS = 20  # optimizer steps skipped in a row (non-finite gradients) that say training has stopped
_INF = float("inf")
_NAN = float("nan")


def _no_ref() -> None:
    """A weak reference to nothing (see _FastPath.ref)."""
    return None


class _FastPath:
    """A run of sampled-out steps of one optimizer, between two that need more (a check, a probe, a
    flush, a non-finite or jumping loss, a request): their per-step state in one small object.

    The training thread's per-step Python runs in caches that the step's kernels cooled: on the toy
    step its bookkeeping cost 9 us in place against 1.4 us in a loop, mostly misses on the
    Instrumentation's 150-entry ``__dict__``. Here the hooks read a few slots of one object, and
    what a step adds is folded into the span, the sampler and the optimizer's state when the run ends
    (``Instrumentation._fast_off``). ``armed`` may be cleared by any thread (a request); the rest is
    the training thread's."""

    __slots__ = ("armed", "tid", "ref", "st", "span", "site", "losses", "n", "every", "next_probe", "flush_at",
                 "high", "last", "durations", "values", "code", "lasti", "hops", "call")

    def __init__(self) -> None:
        self.armed = False
        self.tid = 0
        self.ref: Any = _no_ref  # the optimizer's weak reference (a freed one's id may be reused)
        self.st: Any = None
        self.span: Any = None
        self.site = 0
        self.losses: list[Any] = []
        self.n = 0
        self.every = 1
        self.next_probe = 0
        self.flush_at = 0.0
        self.high = 0.0
        self.last = 0.0
        self.durations: list[float] = []
        self.values: list[float] = []
        # where the run's loss is made: the frame ``hops`` above the backward wrapper runs ``code`` at
        # ``lasti`` (another loss ends the run: see the wrapper)
        self.code: Any = None
        self.lasti = 0
        self.hops = 0
        # the step's last model call with gradients on (module, args, kwargs): replayed should the step
        # go bad (see Instrumentation._replay); cleared at each step the run adds
        self.call: Any = None


@dataclasses.dataclass
class _OptState:
    index: int
    ref: Any  # weakref to the optimizer (None for the no-optimizer pseudo state)
    params: list[Any]
    n_params: int = -1
    generation: int = -1
    present: list[int] = dataclasses.field(default_factory=list)
    groups: list[list[int]] = dataclasses.field(default_factory=list)
    dtypes: list[Any] = dataclasses.field(default_factory=list)
    devices: list[Any] = dataclasses.field(default_factory=list)
    on_cpu: bool = True  # its first gradient group is on the CPU (the sampler's threshold)
    names: list[str] = dataclasses.field(default_factory=list)
    count: int = 0
    sites: list[int] = dataclasses.field(default_factory=list)  # loss sites of its last checked step
    lrs: tuple[Any, ...] = ()  # its learning rates as last sent (see _opt_state)
    loss_high: float = 0.0  # decaying peak of its sampled-out steps' largest |loss| (see LOSS_JUMP)
    loss_seen: int = 0  # its sampled-out steps with a CPU loss
    jump_quiet: int = 0  # no jump check before this run step
    gradless: int = 0  # its checked steps in a row, after a backward, with no gradient on any parameter
    sparse: bool = False  # some gradient is sparse (an Embedding(sparse=True)): its values are read


def _release_params(st: _OptState, _ref: Any) -> None:
    """The optimizer was freed: so are the parameters it held (a k-fold run or a sweep makes a model per
    fold; holding the finished ones' parameters and gradients kept every fold's model alive)."""
    st.params = []
    st.n_params = -1


def _median(values: Any) -> float:
    data = sorted(values)
    return data[len(data) // 2]


def _typical_mean(values: Any) -> float:
    """The mean of the values up to 3x their median: rarer heavier steps count, a GC pause does not."""
    data = sorted(values)
    cap = 3 * data[len(data) // 2]
    kept = [v for v in data if v <= cap]
    return sum(kept) / len(kept)


class _Sampler:
    """Decides which steps are checked, so that checks cost at most ``budget`` of the step time.

    Normal steps are all checked. Fast ones are eligible: under ``FAST_S`` (5 ms) on the CPU, where a
    check's cost grows with the step's data and its hooks' fixed ~20 us a module (a batch-1 CNN's
    1.6 ms step paid 21% for its checks) matter only on small steps; under
    ``FAST_S_GPU`` (10 ms) when the parameters are on a GPU, where a check costs a fixed ~0.3-1 ms of
    kernel launches and Python whatever the step. For those a probe times steps with and without
    checks, alternately (medians: robust to an evaluation pass or a GC pause; then, while sampling,
    means that count the periodic heavier checks, see ``_decide``) and, only when a check costs more
    than ``budget``, checks every k-th step (k <= 256). A probe that finds checks cheap is repeated
    soon (after 256 steps, then 512... up to REPROBE): a wrong verdict would check every step for
    long. A non-finite value seen switches back to checking every step. ``budget`` 0 disables sampling.

    Alternating, not a run of unchecked steps after a run of checked ones: on an H100 (session 12) the
    transformer's unchecked steps of such a probe, early in the run, were slower than the checked
    steps before them (6.3 ms against 5.2 ms by both clocks), so checks looked free and every step
    was checked: whatever drifts or lags (the launch queue filling, the consumer folding the checked
    steps' records) now falls on both kinds alike.

    On a GPU the host's clock alone misleads: until the launch queue fills (the first tens of steps, or
    a whole short run) the host runs ahead, and a step "takes" its launch time, not the GPU's. So the
    steps around a probe are also timed by CUDA events at the boundaries (``gpu_durations``, one wait
    per probe), and a step's time is the larger of the two clocks.

    Slower steps are all checked, unless the monitor's own hooks take more than ``slow_budget`` (10%)
    of them, timed in place on checked steps (``hook_s``): a model making hundreds of small module
    calls a step (an LSTM cell stepped through a sequence: ~20 us of hooks a call) paid 17-32% on
    27-70 ms steps. Then, parameters on the CPU, every k-th step is checked so that checks, taken as
    twice the hooks' share (the sums and norms they start, the garbage they leave), cost about half of
    ``slow_budget``. Decided from that in-place share alone, not by a probe: a probe's unchecked steps
    would leave steps unchecked in runs that check every step, and on this VM a 16-step probe put the
    same small model's checks anywhere from -7% to +20%. On a GPU the hooks' host time overlaps the
    GPU's work, so slow GPU steps are all checked.

    Below that, a slow CPU step is always read (loss and gradient norms: what says a step went bad),
    but its forward is observed one step in k while the forward's hooks, taken twice, would cost more
    than ``fwd_budget`` (``max_overhead_forward``, 0.5%): the module hooks were ~2/3 of the bench
    transformer's 3% per checked step. A step that goes non-finite in between has its forward replayed
    at its read, before the optimizer updates anything (see ``Instrumentation._replay``), so the
    module that made the NaN is still named on its step. k <= FWD_MAX_EVERY: a NaN that reaches
    neither the loss nor a gradient is seen within that many steps when it persists.
    """

    WARMUP = 32  # checked steps before the first probe
    PROBE = 16  # unchecked steps per probe (and as many checked ones, alternately)
    REPROBE = 5000  # steps between probes
    FREE_REPROBE = 256  # steps to the next probe after one found checks cheap (doubling to REPROBE), or
    # to the next look when the steps were not fast enough for a probe
    FAST_S = 0.005  # only steps faster than this are ever sampled (parameters on the CPU)
    FAST_S_GPU = 0.01  # the same, parameters on a GPU
    MAX_EVERY = 256
    SPILL = 3  # unchecked steps after a check whose extra time is the check's (see ``_decide``)
    RECHECK = 64  # checked steps between steady decisions (the window of recent checked steps)
    SLOW_WINDOW = 16  # checked slow steps whose median hook share decides (see ``_hooks_decide``)
    CHECK_PER_HOOK = 2.0  # a check's cost, as a multiple of its hooks' in-place time
    FWD_WINDOW = 16  # forward-observed slow steps whose median forward-hook share decides
    FWD_MAX_EVERY = 16

    def __init__(self, budget: float, slow_budget: float = 0.0, fwd_budget: float = 0.0) -> None:
        self.budget = budget
        self.slow_budget = slow_budget
        self.fwd_budget = fwd_budget
        self.fwd_every = 1  # slow CPU steps: one forward in fwd_every observed (see forward_next)
        self.fwd_shares: collections.deque[float] = collections.deque(maxlen=self.FWD_WINDOW)
        self.fwd_seen = 0  # forward-observed slow steps since the last decision
        self.recent_hooks: collections.deque[float] = collections.deque(maxlen=self.SLOW_WINDOW)  # (checked steps)
        self.slow_sampling = False  # slow steps checked every k-th for their hooks' cost (see _hooks_decide)
        self.slow_seen = 0  # checked slow steps since the last look at their hooks
        self.slow_hold_until = 0  # checked whole until then (a loss jump, a non-finite value)
        self.optimizers = 1
        self.every = 1
        self.n = 0
        self.recent_obs: collections.deque[float] = collections.deque(maxlen=64)
        self.recent_skip: collections.deque[float] = collections.deque(maxlen=64)  # (not just after a check)
        self.recent_after = [collections.deque(maxlen=64) for _ in range(self.SPILL)]  # 1, 2, 3 steps after one
        self.since_check = 0  # unchecked steps since the last checked one
        self.fast_s = self.FAST_S
        self.slow_checked = 0  # consecutive checked steps slower than 2 x fast_s
        self.probe_left = 0
        self.probe_obs: list[float] = []  # the probe's checked step times
        self.probe_run = 1  # steps of one kind in a row, in a probe (one per optimizer)
        self.probe_total = 0
        self.next_probe = self.WARMUP
        self.free_reprobe = self.FREE_REPROBE
        self.steady_share: float | None = None  # a check's share of a step, as the last steady decision measured
        self.quiet_until = 0
        self.since_decision = 0  # checked steps since the last decision
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=32)  # (the report's)
        self.run_step: Callable[[], int] = lambda: self.n  # the run's step (n counts every optimizer's)
        # () -> (checked, unchecked) GPU step times of the timed window (see ``timed``), or None
        self.gpu_durations: Callable[[], tuple[list[float], list[float]]] | None = None

    def timed(self) -> bool:
        """Whether the step ending now is in a probe's timing window: the probe's steps, and the one
        before (its end is the first's start)."""
        if self.budget <= 0:
            return False
        return self.probe_left > 0 or self.n + 1 >= self.next_probe

    def alarm(self) -> None:
        self.every = 1
        self.slow_sampling = False
        self.probe_left = 0
        self.fwd_every = 1
        self.fwd_seen = 0
        self.quiet_until = self.n + 1000
        self.next_probe = max(self.next_probe, self.quiet_until)
        self.slow_hold_until = self.quiet_until

    def next(self, observed: bool, duration: float, hook_s: float = 0.0) -> bool:
        """Record the step that ended (its time, boundary to boundary, and for a checked one the time
        its hooks took in place); return whether the next is checked."""
        n = self.n = self.n + 1
        after = self.since_check = 0 if observed else self.since_check + 1
        if duration <= 0:  # the first step after an install has no start: nothing to record
            pass
        elif observed:
            self.recent_obs.append(duration)
            self.recent_hooks.append(hook_s / duration)
            if duration >= self.fast_s and self.slow_budget > 0 < self.budget and self.fast_s == self.FAST_S:
                self.slow_seen += 1
                if self.slow_seen >= self.SLOW_WINDOW and n >= self.slow_hold_until and self.probe_left == 0:
                    self.slow_seen = 0
                    self._hooks_decide()
            else:
                self.slow_seen = 0
            if duration > 2 * self.fast_s:
                self.slow_checked += 1
                if self.slow_checked >= 3 and self.every > 1 and not self.slow_sampling:
                    # Steps may no longer be fast: check them all again, and probe once WARMUP checked
                    # steps show whether they are (a GC pause or a busy machine is no reason to check
                    # every step until the next REPROBE).
                    self.every = 1
                    self.recent_obs.clear()
                    for q in self.recent_after:
                        q.clear()
                    self.steady_share = None  # another regime: its checks are measured afresh
                    self.next_probe = max(n + self.WARMUP, self.quiet_until)
            else:
                self.slow_checked = 0
        elif after <= self.SPILL and self.probe_left == 0 and self.every > 2 * self.SPILL:
            self.recent_after[after - 1].append(duration)  # (a probe's alternate steps: see _decide)
        else:
            self.recent_skip.append(duration)
        if self.budget <= 0:
            return True
        if self.probe_left > 0:
            if observed and duration > 0:
                self.probe_obs.append(duration)
            self.probe_left -= 1
            if self.probe_left == 0:
                self._decide()
                self.since_decision = 0
                return True
            # unchecked, checked, unchecked, ...: in runs of one step per optimizer (a GAN's D and G
            # steps alternate, and would otherwise each be measured one way only)
            i = self.probe_total - self.probe_left  # the next step's place in the probe
            return (i // self.probe_run) % 2 == 1
        if n >= self.next_probe:
            # Steps too slow to sample (or too soon after a non-finite value): look again in a few
            # hundred steps, not 5,000 (steps speed up after warm-up; a step near the threshold is borderline)
            self.next_probe = n + self.FREE_REPROBE
            if self.recent_obs and _median(self.recent_obs) < self.fast_s and n >= self.quiet_until:
                self.next_probe = n + self.REPROBE
                self.probe_run = max(1, min(4, self.optimizers))
                self.probe_left = self.probe_total = 2 * self.PROBE * self.probe_run
                self.probe_obs = []
                self.recent_skip.clear()  # the decision compares this probe's steps, not older ones
                for q in self.recent_after:
                    q.clear()
                return False
        every = self.every
        if every == 1:
            return True
        if observed and not self.slow_sampling:
            self.since_decision += 1
            if self.since_decision >= self.RECHECK:
                self.since_decision = 0
                self._decide(steady=True)
                every = self.every
        return every == 1 or n % every == 0

    def skipped(self, duration: float) -> bool:
        """``next(False, duration)``: its common case (steady sampling) in a few lines."""
        every = self.every
        n = self.n + 1
        if self.probe_left or every == 1 or n >= self.next_probe or self.budget <= 0:
            return self.next(False, duration)
        self.n = n
        after = self.since_check = self.since_check + 1
        if duration > 0:
            if after <= self.SPILL and every > 2 * self.SPILL:
                self.recent_after[after - 1].append(duration)
            else:
                self.recent_skip.append(duration)
        return n % every == 0

    def watch(self, steps: int) -> None:
        """Check every step for the next ``steps`` (a loss jumped between checks: what follows is
        looked at whole, forwards included), then probe again."""
        if self.budget <= 0:
            return
        self.every = 1
        self.slow_sampling = False
        self.probe_left = 0
        self.next_probe = max(self.n + steps * max(1, self.optimizers), self.quiet_until)  # (n: optimizer steps)
        self.slow_hold_until = self.next_probe
        self.fwd_every = 1
        self.fwd_seen = 0

    def restart_probe(self) -> None:
        """After a gap (the instrumentation re-installed): a probe under way would compare steps
        from either side of it, so it starts again once a new timing window has filled."""
        if self.probe_left > 0 or self.n + 1 >= self.next_probe:
            self.probe_left = 0
            self.next_probe = max(self.n + 2, self.quiet_until)

    def forward_next(self, fwd_seen: bool, duration: float, fwd_s: float) -> bool:
        """The step that ended was read (``fwd_seen``: its forward observed too, its module hooks
        taking ``fwd_s`` in place); whether the next one's forward is observed."""
        if self.fwd_budget <= 0 or self.budget <= 0 or self.every > 1 or self.slow_sampling:
            self.fwd_every = 1  # (whole checks sampled already: their forwards are observed)
            return True
        if fwd_seen and duration > 0:
            if duration >= self.fast_s and self.fast_s == self.FAST_S:
                self.fwd_shares.append(fwd_s / duration)
                self.fwd_seen += 1
                if self.fwd_seen >= self.FWD_WINDOW and self.n >= self.slow_hold_until:
                    self.fwd_seen = 0
                    self._forward_decide()
            else:  # no longer a slow CPU step
                self.fwd_seen = 0
                self.fwd_every = 1
        every = self.fwd_every
        return every == 1 or self.n < self.slow_hold_until or self.n % every == 0

    def _forward_decide(self) -> None:
        share = _median(self.fwd_shares)
        every = max(1, min(self.FWD_MAX_EVERY, math.ceil(self.CHECK_PER_HOOK * share / self.fwd_budget)))
        if distributed.world_size() > 1:
            # No replay across processes: a DDP forward (buffer broadcast) or a SyncBatchNorm makes
            # collectives, which a replay on one rank alone would hang on. Every forward is observed.
            every = 1
        if every > 1 and self.optimizers > 1 and every % 2 == 0:
            every += 1  # alternating optimizers (GANs): an odd stride observes each one's forward in turn
        if every == self.fwd_every:
            return
        self.fwd_every = every
        self.decisions.append({"step": self.run_step(), "kind": "forward", "hook_share": share,
                               "budget": self.fwd_budget,
                               "checked_s": _median(self.recent_obs) if self.recent_obs else 0.0,
                               "unchecked_s": 0.0, "every": every})

    def _hooks_decide(self) -> None:
        """Slow CPU steps: checked every k-th step while their hooks take over ``slow_budget`` of them
        (a checked step's share, the median of the last SLOW_WINDOW); every step again once they take
        under half of it."""
        share = _median(self.recent_hooks)
        if share > self.slow_budget:
            every = max(2, min(self.MAX_EVERY, math.ceil(self.CHECK_PER_HOOK * share / (self.slow_budget / 2))))
            if every > 1 and self.optimizers > 1 and every % 2 == 0:
                every += 1  # alternating optimizers (GANs): an odd stride checks each of them in turn
        elif self.slow_sampling and share < self.slow_budget / 2:
            every = 1
        else:
            return
        if every == self.every and self.slow_sampling == (every > 1):
            return
        self.every = every
        self.slow_sampling = every > 1
        self.next_probe = max(self.next_probe, self.n + self.REPROBE)  # (no probe of slow steps)
        self.decisions.append({"step": self.run_step(), "kind": "hooks", "hook_share": share,
                               "budget": self.slow_budget, "checked_s": _median(self.recent_obs),
                               "unchecked_s": _median(self.recent_skip) if self.recent_skip else 0.0,
                               "every": every})

    def _decide(self, steady: bool = False) -> None:
        """A probe's decision compares the medians of its checked and unchecked steps and, on a GPU,
        takes the larger of the host's and the GPU's clocks for each. ``steady``:
        while sampling, once every RECHECK checked steps, the decision is made again from the means
        of the latest steps (up to 3x their median), which count the periodic heavier checks
        (activation statistics, update ratios, snapshots): by medians alone the sampler took checks
        for 25-45% cheaper than they were (session 12). A steady decision also charges a check with
        what the SPILL unchecked steps after it take over the others (its garbage, caches it cooled):
        on the toy a check took 176 us on its own step and 45 us more on the next three, so checks
        cost 2.5% on a 2% budget."""
        if not self.recent_obs or not self.recent_skip:
            self.every = 1  # (and looked at again soon, as below)
            again = self.n + self.free_reprobe
            self.next_probe = min(self.next_probe, again) if steady else again
            return
        record: dict[str, Any] = {"step": self.run_step(), "kind": "steady" if steady else "probe"}
        if self.recent_hooks:
            record["hook_share"] = _median(self.recent_hooks)
        spill = 0.0
        if steady:
            d_obs, d_skip = _typical_mean(self.recent_obs), _typical_mean(self.recent_skip)
            spill = sum(_typical_mean(q) - d_skip for q in self.recent_after if q)
            if spill:
                record["spill_s"] = spill
            # Steps that ran faster after a check (a GPU's launch queue catching up on the time the
            # check's step took) give back part of it at most, never more: a negative spill is no
            # credit (on an H100 one of -0.97 ms made checks look free, and every step was checked)
            spill = max(0.0, spill)
        else:
            d_obs, d_skip = _median(self.probe_obs or self.recent_obs), _median(self.recent_skip)
            gpu_obs, gpu_skip = self.gpu_durations() if self.gpu_durations is not None else ([], [])
            if len(gpu_obs) >= 4 and len(gpu_skip) >= 4:
                record.update(gpu_checked_s=_median(gpu_obs), gpu_unchecked_s=_median(gpu_skip))
                d_obs = max(d_obs, _median(gpu_obs))
                d_skip = max(d_skip, _median(gpu_skip))
        every = 1
        budget = self.budget
        if d_skip > 0:
            share = max(0.0, d_obs + spill - d_skip) / d_skip  # a check's cost, as a share of a step
            if steady:
                self.steady_share = share
            elif self.steady_share is not None and self.steady_share > share:
                # Alternating steps, a probe misses what a check leaves to the step after it (the
                # toy: checks 60 us against 96 us in steady sampling): the last steady figure stands
                # until the next steady decision shows otherwise
                record["steady_share"] = self.steady_share
                share = self.steady_share
            every = max(1, min(self.MAX_EVERY, math.ceil(share / budget)))
            if every > 1 and self.optimizers > 1 and every % 2 == 0:
                every += 1  # alternating optimizers (GANs): an odd stride checks each of them in turn
        self.every = every
        self.slow_sampling = False
        if every == 1:
            # checks look cheap: look again soon, in case this decision was misled (checking every
            # step, no steady decision comes to correct it)
            self.next_probe = min(self.next_probe, self.n + self.free_reprobe) if steady else self.n + self.free_reprobe
            self.free_reprobe = min(self.REPROBE, 2 * self.free_reprobe)
        elif not steady:
            self.free_reprobe = self.FREE_REPROBE
        record.update(checked_s=d_obs, unchecked_s=d_skip, every=every)
        self.decisions.append(record)  # complete before another thread can see it

    def summary(self) -> dict[str, Any]:
        """For the report (read from another thread: a copy, retried if an append races it)."""
        for _ in range(3):
            try:
                return {"budget": self.budget, "slow_budget": self.slow_budget, "every": self.every,
                        "forward_budget": self.fwd_budget, "forward_every": self.fwd_every,
                        "decisions": list(self.decisions)}
            except RuntimeError:  # deque mutated during iteration
                continue
        return {"budget": self.budget, "slow_budget": self.slow_budget, "every": self.every,
                "forward_budget": self.fwd_budget, "forward_every": self.fwd_every, "decisions": []}


class Instrumentation:
    """Observes the script's training: module calls, backward, optimizer steps."""

    def __init__(self, config: DebugConfig, emit: Callable[[list[Any]], None]) -> None:
        self.config = config
        self._emit = emit
        self._tid = threading.get_ident()
        self.torch: ModuleType | None = None
        self._handles: list[Any] = []
        self._fwd_on = False  # module calls observed (see _install_module_call)
        self._call_wrapper: Any = None
        self._orig_call: Any = None
        # The optimizer post-step hook is registered only around checked steps and while an action or
        # a pause waits (``wake``): a sampled-out step runs no Python after optimizer.step.
        self._post_handle: Any = None
        self._fast = _FastPath()
        self._fast_lock = threading.Lock()
        self._wake = False
        self.observed_last = True  # the step that just ended was checked (its values are known)
        self._orig_backward: Callable[..., Any] | None = None
        self._orig_scale: Callable[..., Any] | None = None
        self._installed = False
        self.detector = NonFiniteDetector()
        # forward state
        self._stack: list[Any] = []
        self._sent: list[Any] = []  # reduced sentinels (0-d float32 tensors) of this step
        self._acts: list[Any] = []  # activations waiting for the next chunked reduction
        self._acts_cuda_elems = 0
        # A large CPU activation whose sum waits one hook: if the next module is a training BatchNorm
        # fed with it, its running statistics tell its finiteness (C numbers instead of the tensor).
        # (sentinel index, tensor, its version, its producer's _hot_mod key or None), and the BatchNorm
        # that will fill it in.
        self._hot_pending: tuple[int, Any, int, tuple[int, int] | None] | None = None
        # A large CPU activation that reaches, through operations keeping every element, the input of
        # a module whose output is summed anyway (PROPAGATING_MODULES) needs no sum of its own: that
        # output finite proves it finite (see _settle). Its producer is learned on a step that summed
        # both; from then on the activation waits here, held, until the later sum says finite (no
        # read) or not (summed then, so the first module to go non-finite is still named exactly).
        self._deferred: dict[int, tuple[Any, int]] = {}  # slot -> (tensor, its version when made)
        self._implies: dict[int, tuple[int, ...]] = {}  # hot slot -> slots its being finite proves finite
        # hot slot -> (id of the module that made it, which of that module's large outputs this step it
        # is): a module called at two places (one feeding a Linear, one a ReLU) is learned per place
        self._hot_mod: dict[int, tuple[int, int]] = {}
        self._hot_calls: dict[int, int] = {}  # id(module) -> large outputs it made this step
        self._inf_kept: set[int] = set()  # hot slots whose sum was a real inf (see _sum_hot)
        self._inf_marker: Any = None  # a 0-d inf tensor: what the read's exact re-check sees for those
        self._backwards_here = 0  # backwards seen from the training thread (see _adopt_thread)
        self._in_backward = 0  # inside torch.autograd.backward (activation checkpointing recomputes there)
        self._graph_task: Callable[[], int] | None = None  # torch's: -1 outside any backward
        self._defer_ok: set[tuple[int, int]] = set()  # _hot_mod keys whose output a later sum proved finite
        self._safe_readers: frozenset[type] = frozenset()
        self._impl: tuple[int, ...] = ()  # set by _measured/_from_graph: slots the tensor's being finite proves
        self._prop_types: frozenset[type] = frozenset()
        self._prop_safe: frozenset[type] = frozenset()
        # Calls of finite-preserving leaf modules (exact types, not in place) inside a model: no hooks
        # run, only (type, input, its version, output, its version) is kept for the next hook to record
        # the output as derived from the input (see _absorb_light). Hooks cost ~10-20 us a call on a
        # CPU whose caches the last kernel flushed; this costs ~1 us.
        self._light: list[tuple[type, Any, int, Any, int]] = []
        self._light_plain: frozenset[type] = frozenset()
        self._light_inplace: frozenset[type] = frozenset()  # those with an ``inplace`` option
        self._containers: frozenset[type] = frozenset()
        self._bn_fill: Any = None
        self._BatchNorm: type | tuple[type, ...] = ()
        self._Uninitialized: type | tuple[type, ...] = ()
        self._pinned: dict[tuple[Any, ...], list[tuple[Any, Any]]] = {}
        self._n_sent = 0
        self._ver: list[int] = []  # version counter of each sentinel's tensor when it was queued
        self._refs: list[Any] = []  # weak references to those tensors
        self._weakref = weakref.ref
        self._stale: set[int] = set()
        self._max_sent = config.max_sentinels_per_step
        self._track_acts = config.enable_activation_tracking
        self._track_grads = config.enable_gradient_tracking
        self._get_ident = threading.get_ident
        self._sent_ids: dict[int, int] = {}  # id(tensor) -> index in _sent
        # Outputs of finite-preserving modules (ReLU, pooling, dropout...), not measured: finite when
        # their input was. id(tensor) -> (weak reference, version, the input's sentinel index, the
        # slots its being finite proves finite: see _impl).
        self._derived: dict[int, tuple[Any, int, int, tuple[int, ...]]] = {}
        self._safe_types: frozenset[type] = frozenset()
        # id(grad_fn) -> (that grad_fn, sentinel index, slots proven) of the tensors measured or derived
        # this forward.
        # Holding the node keeps its id from being reused; cleared when a backward or a model's
        # forward starts, so no graph is kept alive past the pass that made it.
        self._nodes: dict[int, tuple[Any, int, tuple[int, ...]]] = {}
        self._virtual: list[tuple[int, ...]] = []  # sentinel index VIRTUAL + k: the sum of these
        # (slot, parts): a real sentinel slot whose value is the sum of other sentinels (a BatchNorm's
        # input, told by its running statistics; see _bn_sentinels)
        self._alias: list[tuple[int, tuple[int, ...]]] = []
        # BatchNorms whose running statistics a read found finite: id -> (weakref, versions of
        # running_mean, running_var, num_batches_tracked then). Unchanged versions: still finite (a
        # training forward bumps num_batches_tracked), so the next step needs no sync to know it.
        self._bn_finite: dict[int, tuple[Any, tuple[int, int, int]]] = {}
        self._bn_step: list[tuple[Any, tuple[int, int, int]]] = []  # this step's, for the read to confirm
        self._bn_queued: set[int] = set()  # BatchNorms whose statistics wait in the chunk (_acts)
        # grad_fn type -> 3 GRAPH_UNARY and GRAPH_PROPAGATING, 1 GRAPH_UNARY only, 2 GRAPH_SUM, 0 other
        self._node_kinds: dict[type, int] = {}
        # (module, its input, the input's version, its sentinel index, slots proven) from the latest
        # pre-hook: a leaf module's post-hook comes right after and need not look the input up again
        self._last_in: tuple[Any, Any, int, int, tuple[int, ...]] | None = None
        self._sum_dtypes: frozenset[Any] = frozenset()
        self._calls: list[ActivationCall] = []
        self._root_inputs: list[tuple[Any, int, str]] = []  # (module, sentinel, "input" | "target")
        self._sent_overflow = 0
        self._overflow_said = False  # the first step with more outputs than the cap was reported
        self._failing: tuple[int, list[str], bool] | None = None
        # models
        self._roots: dict[int, tuple[str, Any]] = {}  # id -> (name, weakref)
        # roots with layers that behave differently in train and eval mode: id -> their classes
        self._mode_sensitive: dict[int, tuple[str, ...]] = {}
        self._eval_warned: set[int] = set()
        self._not_stepped: set[tuple[int, int, int]] = set()  # (root id, optimizer, its params' layout)
        self._dead_roots: list[Any] = []  # weak references of roots freed since (appended by their callbacks)
        self._root_ids: dict[int, tuple[int, ...]] = {}  # root id -> ids of its modules (when registered)
        self._given_names: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._name_count: dict[str, int] = {}  # a model name -> models given it (the next is name#n+1)
        self.models_made = 0  # models registered (loss modules not counted): a new fold's shows here
        self._known_modules: set[int] = set()
        self._unnamed_params: set[int] = set()  # ids of stepped parameters no model names (see _pre_hook)
        self._not_owners: set[int] = set()  # modules looked at for them, owning none
        self._bn_unchecked: set[int] = set()  # BatchNorms whose input's producer is not yet looked at
        self._module_names: dict[int, str] = {}
        self._param_names: dict[int, str] = {}
        self._generation = 0
        # losses
        self._loss_sites: dict[tuple[Any, int], int] = {}
        self._library_codes: dict[Any, bool] = {}
        self._loss_site_names: list[str] = []
        self._losses: list[tuple[int, Any]] = []
        self._scaled: dict[int, Any] = {}
        self._amp_seen = False  # a GradScaler has scaled a loss
        self._orig_update: Callable[..., Any] | None = None
        self._boundaries = 0  # optimizer step boundaries seen (pre-step hooks run)
        self._forwards_unread = 0  # see UNREAD_FORWARDS
        self._root_out: Any = None  # weak reference to the last model forward's output
        self._scaler_marks: dict[int, int] = {}  # id(scaler) -> boundaries when it first scaled this iteration
        self.scaler_skips = 0
        self._skips_unsent = 0
        # steps
        self._opts: dict[int, _OptState] = {}  # id(optimizer) -> its state (dead ones pruned, see _opt_state)
        self._opts_made = 0  # optimizers seen: the next one's index
        self._pseudo: _OptState | None = None
        self._stepped: set[int] = set()  # optimizers (indices) that stepped in the run's current iteration
        self._width = 1  # optimizers stepping in one iteration, as the last complete one had (the sampler's)
        self._last_stepper = -1  # the optimizer (index) that stepped last
        self._iter_last = -1  # the one that stepped last in the last complete iteration (see _post_step)
        self._backwards_without_optimizer = 0
        self._optimizer_seen = False  # an optimizer was made (see _optimizer_made)
        self._made_optimizers: weakref.WeakSet[Any] = weakref.WeakSet()  # (see _watch_optimizers)
        self._orig_patch_step: Any = None
        self.step = 0
        self._last_step_time: float | None = None
        self._pending: list[Any] = []
        self._last_flush = time.perf_counter()
        self._reads: list[tuple[Any, Any, Any, Any]] = []
        self._foreach_dtype = True
        self._sparse_grads: dict[int, Any] = {}  # id(values read) -> the sparse gradient (see _grad_layout)
        self.broken: str | None = None
        self.actions: Any = None  # a queue.SimpleQueue of callables, applied at step boundaries
        self.on_step_end: Callable[[], None] | None = None  # e.g. periodic snapshots (recovery)
        self._paused = False
        self.pause_held = False  # the training thread is waiting in a pause (not only asked to)
        self.resume_event = threading.Event()
        self.clip_norm: float | None = None
        self.recent_total_norms: collections.deque[float] = collections.deque(maxlen=200)
        self.last_step_finite = True
        self.skip_nonfinite = config.recover != "off"  # safe/auto: skip steps with non-finite gradients
        self._skip_now = False
        self._held_grads: list[tuple[Any, Any]] = []  # (parameter, gradient) kept from a skipped step
        self._held_for: Any = None  # the optimizer whose step was skipped
        self._closure_step: Any = None  # an optimizer stepping with a closure: its boundary is after it
        self._closure_read = False  # that boundary is being read (in the post-step hooks)
        self._immediate = False
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.on_skip: Callable[[int], None] | None = None  # auto mode: roll back after repeated skips
        self._observe = True  # this step is checked (see _Sampler)
        self._step_end: float | None = None
        self._wait = 0.0
        self._unchecked_losses: list[Any] = []
        # (site or None, code, lasti) of each of them, noted by the backward wrapper (see _sited)
        self._unchecked_sites: list[tuple[int | None, Any, int]] = []
        self._noted: list[tuple[int | None, Any, int]] = []  # the last closed step's
        self._site_hops = 1  # frames from the backward wrapper up to the loss's line (see _on_backward)
        # Losses of sampled-out steps on a GPU: (step, site, 0-d tensor), read with the next checked step
        # (reading each at once would wait for the GPU).
        self._late: list[tuple[int, int, Any]] = []
        self._force_check = False
        self._loss_jump = False  # the unchecked step being closed is checked for its loss's jump
        self._unobserved_bad: int | None = None  # an unchecked step whose loss was non-finite
        self._span: StepSpan | None = None
        self._sample_last: float | None = None
        self._last_site: int | None = None
        self._observed_steps = 0
        self._stats_now = False
        self._stats_due = False
        # Model calls of a step whose forward is not observed (CPU): (module, args, kwargs, the tensor
        # arguments' versions), replayed when the step's read finds it non-finite (see _replay)
        self._replay_log: list[tuple[Any, tuple[Any, ...], dict[str, Any], tuple[int, ...]]] = []
        self._replay_full = False  # more calls than REPLAY_MAX, or inputs over REPLAY_BYTES, this step: no replay
        self._replay_bytes = 0  # bytes of the kept calls' tensor arguments
        self._replay_depth = 0  # module calls under way while recording (only the outermost are kept)
        self.replays = 0  # steps whose replay named what went non-finite
        self._replay_rec = False  # record them (set per step by _sample)
        self._replay_ok = config.max_overhead_forward > 0 and config.sample_fast_steps
        self._replay_roots: dict[int, Any] = {}  # id -> weakref: models (roots with parameters) to replay
        self._read_fwd = True  # the step being read had its forward observed
        self._fwd_observed_steps = 0  # read steps whose forward was observed (the report's)
        self._flush_due = False  # a time slice waits for the next backward (see _slice_over)
        self._stat_meta: list[tuple[str, str, int]] = []
        self._stat_vals: list[Any] = []
        self._dead_acc: dict[str, tuple[Any, int]] = {}
        self._upd_start: tuple[int, list[str], list[Any], list[Any]] | None = None
        self._upd_done: tuple[list[str], list[Any]] | None = None
        self._act_kinds: dict[type, str] = {}
        self._sampler = _Sampler(config.max_overhead if config.sample_fast_steps else 0.0,
                                 config.max_overhead_slow if config.sample_fast_steps else 0.0,
                                 config.max_overhead_forward if config.sample_fast_steps else 0.0)
        self._hook_s = 0.0  # time the checked step's hooks took in place (see _Sampler: slow steps)
        self._sampler.gpu_durations = self._gpu_durations
        self._sampler.run_step = lambda: self.step
        self._gpu_marks: list[tuple[int, bool, Any, Any]] = []  # (sampler step, checked, CUDA event) in a probe window

    # -- install / uninstall --------------------------------------------------------------
    @property
    def wake(self) -> bool:
        """An action or a pause waits: the next step boundary runs the post-step hook."""
        return self._wake

    @wake.setter
    def wake(self, value: bool) -> None:
        self._wake = value
        if value:
            self._fast.armed = False  # (any thread) the next boundary takes the path that sees it

    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = value
        if value:
            self._fast.armed = False

    def install(self, torch: ModuleType) -> None:
        """Register hooks; called in the thread that imported torch (the training thread)."""
        if self._installed:
            return
        self.torch = torch
        self._tid = threading.get_ident()
        self._last_step_time = self._sample_last = None  # a re-install is a gap in time, not a step
        self._gpu_marks = []
        self._sampler.restart_probe()
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer as optim_module

        self._Tensor = torch.Tensor
        self._LBFGS = getattr(torch.optim, "LBFGS", ())
        self._Loss = torch.nn.modules.loss._Loss
        # torch.compiler.is_compiling is torch >= 2.3; dynamo takes torch._utils' for a constant before
        self._is_compiling = (getattr(getattr(torch, "compiler", None), "is_compiling", None)
                              or getattr(getattr(torch, "_utils", None), "is_compiling", None) or (lambda: False))
        # a TorchDispatchMode is running (the script's, or fake tensors'): it must see none of our ops
        self._dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
        # torch.compile's wrapper; looked up once dynamo is loaded (importing it here costs seconds)
        self._OptimizedModule: type | tuple[type, ...] = ()
        self._find_optimized_module()
        self._is_grad_enabled = torch.is_grad_enabled
        self._amp_on, self._amp_dtype = _autocast_cpu(torch)
        self._float32 = torch.float32
        self._zero = torch.zeros(())  # the read's placeholder for an aliased slot (see _alias)
        nn = torch.nn
        self._act_kinds = {nn.ReLU: "relu", nn.ReLU6: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
        self._safe_types = frozenset(getattr(nn, n) for n in FINITE_PRESERVING if hasattr(nn, n))
        self._prop_types = frozenset(getattr(nn, n) for n in PROPAGATING_MODULES if hasattr(nn, n))
        self._prop_safe = frozenset(getattr(nn, n) for n in PROPAGATING_SAFE if hasattr(nn, n))
        self._safe_readers = frozenset(getattr(nn, n) for n in PROPAGATING_MODULES + SAFE_READERS if hasattr(nn, n))
        self._graph_task = getattr(torch._C, "_current_graph_task_id", None)
        self._inf_marker = torch.tensor(_INF)
        self._light_inplace = frozenset(t for t in self._safe_types if "inplace" in inspect.signature(t.__init__).parameters)
        self._light_plain = self._safe_types - self._light_inplace
        self._containers = frozenset(getattr(nn, n) for n in CONTAINERS if hasattr(nn, n))
        self._sum_dtypes = frozenset((torch.float32, torch.float64, torch.bfloat16))
        self._BatchNorm = nn.modules.batchnorm._BatchNorm
        self._mode_types = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
        self._Uninitialized = getattr(nn.parameter, "UninitializedTensorMixin", ())
        self._nn_module = nn_module
        try:
            # torch.profiler(with_stack=True) keeps pointers into the code objects it saw, and the
            # module code of an import made while it runs is freed at once (a latent torch bug that
            # our allocations expose: garbage event names, UnicodeDecodeError from prof.events()).
            # torch imports this module lazily in its first record_function (an optimizer's step).
            getattr(torch.autograd.profiler, "_maybe_cupti_monitor", lambda: None)()
        except Exception:
            pass
        self._install_module_call(nn_module.Module)
        self._optim_module = optim_module
        self._watch_optimizers(optim_module.Optimizer)
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._fast_step_hook()))
        self._post_handle = optim_module.register_optimizer_step_post_hook(self._post_step)
        self._orig_backward = torch.autograd.backward
        orig_backward = self._orig_backward
        me = self
        get_ident = threading.get_ident
        tensor_type = torch.Tensor

        fast = self._fast
        dispatch_modes = self._dispatch_modes
        getframe = sys._getframe

        def backward(*args: Any, **kwargs: Any) -> Any:
            f = fast
            if f.armed and get_ident() == f.tid:  # a run of sampled-out steps (see _FastPath): keep the loss
                t = args[0] if args else kwargs.get("tensors")
                if not isinstance(t, tensor_type) or dispatch_modes():
                    return orig_backward(*args, **kwargs)
                if f.code is None:  # the script's only loss site: nothing to tell apart
                    f.losses.append(t)
                    return orig_backward(*args, **kwargs)
                try:
                    caller = getframe(f.hops)
                except ValueError:
                    caller = None
                if caller is not None and caller.f_code is f.code and caller.f_lasti == f.lasti:
                    f.losses.append(t)
                    return orig_backward(*args, **kwargs)
                # another loss than the run's (losses taking turns at one optimizer): the long way files it
                me._guarded(me._fast_off)
            if me._flush_due and get_ident() == me._tid:
                me._guarded(me.flush)  # see _slice_over
            if not me._backwards_here and get_ident() != me._tid and not me.broken:
                me._guarded(me._adopt_thread)
            if not me._observe and me._opts and get_ident() == me._tid and not me.broken:
                # A sampled-out step (the common case at high step rates): keep the loss, nothing else.
                t = args[0] if args else kwargs.get("tensors")
                if isinstance(t, tensor_type) and me.config.enable_loss_tracking and not me._dispatch_modes():
                    me._unchecked_losses.append(t)
                    if len(me._loss_sites) > 1:  # (one site: each loss is its)
                        me._guarded(me._note_site, getframe)
                return orig_backward(*args, **kwargs)
            if me._in_backward and get_ident() == me._tid:
                # inside a backward (reentrant checkpointing backpropagates each block from there):
                # not a loss, nor a step
                return orig_backward(*args, **kwargs)
            if get_ident() == me._tid and not me.broken and not me._dispatch_modes():
                me._backwards_here += 1
                me._guarded(me._on_backward, args[0] if args else kwargs.get("tensors"))
            me._in_backward += 1
            try:
                result = orig_backward(*args, **kwargs)
            finally:
                me._in_backward -= 1
            # No optimizer has stepped yet: a script updating parameters by hand makes each backward a
            # step. Not so under a GradScaler, whose skipped steps (non-finite scaled gradients) call no
            # optimizer at all: those backwards belong to a real optimizer's step.
            if not me._opts and not me._amp_seen and threading.get_ident() == me._tid and not me.broken:
                me._backwards_without_optimizer += 1
                # the first backward precedes any optimizer.step; with an optimizer made, the backwards
                # before its first step are micro-batches of gradient accumulation, not steps
                n = me._backwards_without_optimizer
                if n >= 2 and (n >= ACCUMULATION_MAX or not me._optimizer_made()):
                    if n == ACCUMULATION_MAX:  # an optimizer made, never stepped: a hand-written update after all
                        me.step = max(me.step, n - 2)
                    me._guarded(me._step_without_optimizer)
            return result

        backward.__wrapped__ = orig_backward  # type: ignore[attr-defined]
        backward.__doc__ = orig_backward.__doc__
        torch.autograd.backward = backward
        try:
            scaler_type = _grad_scaler_type()
            self._orig_scale = scaler_type.scale
            orig_scale = self._orig_scale

            def scale(scaler: Any, outputs: Any) -> Any:
                out = orig_scale(scaler, outputs)
                if fast.armed or fast.durations:
                    me._guarded(me._fast_off)  # (its steps count in _boundaries, which the mark reads)
                me._amp_seen = True
                me._scaler_marks.setdefault(id(scaler), me._boundaries)
                if isinstance(outputs, me._Tensor) and isinstance(out, me._Tensor):
                    if len(me._scaled) > 64:
                        me._scaled.clear()
                    me._scaled[id(out)] = outputs.detach()  # (not its graph: that holds the parameters)
                return out

            self._orig_update = scaler_type.update
            orig_update = self._orig_update

            def update(scaler: Any, new_scale: Any = None) -> Any:
                # No optimizer step since this iteration's first scale(): the scaler skipped it.
                mark = me._scaler_marks.pop(id(scaler), None)
                if fast.armed or fast.durations:
                    me._guarded(me._fast_off)
                if mark is not None and mark == me._boundaries and threading.get_ident() == me._tid \
                        and not me.broken:
                    me._guarded(me._scaler_skipped)
                return orig_update(scaler, new_scale)

            scaler_type.scale = scale  # type: ignore[method-assign]
            scaler_type.update = update  # type: ignore[method-assign]
        except Exception:
            self._orig_scale = self._orig_update = None
        os.register_at_fork(after_in_child=self._in_forked_child)
        self._installed = True

    def _install_module_call(self, module_type: type) -> None:
        """Observe module calls by wrapping ``nn.Module.__call__`` rather than through global forward
        hooks: any global hook sends every module call down torch's slow path (~4-10 us a call on
        this VM's cold caches, ~0.25 ms a step on the bench transformer), and a hook pair costs two
        calls where this costs one frame. Everything the hooks saw is seen: the module, its
        positional arguments, its output after its own hooks, and an exception escaping it.

        torch.compile traces this wrapper: ``is_compiling()`` comes first, so the traced code is
        torch's own call path and nothing breaks the graph. Installed once, left in place while
        installed (``_fwd_on`` turns it into a pass-through on sampled-out steps): swapping
        ``Module.__call__`` per step could make compiled code recompile."""
        me = self
        orig_call = module_type.__call__  # torch's, or whoever wrapped it before: chained, not skipped
        is_compiling = self._is_compiling
        fast = self._fast
        get_ident = threading.get_ident
        pre, post = self._pre_hook, self._post_hook
        light_plain, light_inplace, tensor_type = self._light_plain, self._light_inplace, self._Tensor
        containers, call_container, plain = self._containers, self._call_container, self._plain
        tracing_state = getattr(self.torch._C, "_get_tracing_state", lambda: None)
        functorch_level = getattr(getattr(self.torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None)
        dispatch_modes = self._dispatch_modes
        clock = time.perf_counter
        replay_roots = self._replay_roots
        grad_enabled = self.torch.is_grad_enabled  # type: ignore[union-attr]
        amp_on, amp_dtype = self._amp_on, self._amp_dtype
        # torch's _wrapped_call_impl is two lines: done here, it costs no frame of its own. Each module
        # call went 4 Python frames deep instead of plain torch's 3, and a model nested 200 deep (or a
        # module calling itself 240 times) hit the recursion limit where plain Python did not.
        direct = orig_call is getattr(module_type, "_wrapped_call_impl", None)

        # ``self`` by name: torch.profiler(with_stack=True) takes this code for Module.__call__'s and
        # reads the frame's local ``self`` (another name crashed the process with SIGSEGV).
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            if is_compiling():
                return orig_call(self, *args, **kwargs)
            if fast.armed:  # a run of sampled-out steps (see _FastPath)
                if id(self) in replay_roots and grad_enabled() and get_ident() == fast.tid:
                    before, fast.call = fast.call, (self, args, kwargs, amp_dtype() if amp_on() else None)
                    call = fast.call
                    try:
                        if direct and self._compiled_call_impl is None:
                            return self._call_impl(*args, **kwargs)
                        return orig_call(self, *args, **kwargs)
                    except BaseException:  # (caught by the script: not the step's forward, see below)
                        if fast.call is call:
                            fast.call = before
                        raise
                if direct and self._compiled_call_impl is None:
                    return self._call_impl(*args, **kwargs)
                return orig_call(self, *args, **kwargs)
            if me._flush_due and get_ident() == me._tid:
                me._guarded(me._late_slice)  # see _slice_over
            if not me._fwd_on or get_ident() != me._tid:
                if me._replay_rec and get_ident() == me._tid:
                    # the step's outermost module calls (a model, or a part of one the script calls
                    # itself), kept for a replay (see _replay)
                    kept = False
                    if not me._replay_depth:
                        try:
                            kept = me._record_call(self, args, kwargs)
                        except Exception:  # (an argument we cannot read: this step is not replayed)
                            me._replay_full = True
                            me._replay_log = []
                    me._replay_depth += 1
                    try:
                        if direct and self._compiled_call_impl is None:
                            return self._call_impl(*args, **kwargs)
                        return orig_call(self, *args, **kwargs)
                    except BaseException:
                        # a call that raised (and the script caught) is not the step's forward: its
                        # replay would raise again (a KeyboardInterrupt into the optimizer's step)
                        log = me._replay_log
                        if kept and log and log[-1][0] is self:
                            log.pop()
                        raise
                    finally:
                        me._replay_depth -= 1
                if direct and self._compiled_call_impl is None:
                    return self._call_impl(*args, **kwargs)
                return orig_call(self, *args, **kwargs)
            if tracing_state() is not None or functorch_level() is not None or dispatch_modes():
                # Not training steps. torch.jit.trace: names in our frames would end up in its graph
                # (its check trace then differs: TracingCheckError). torch.func (vmap, grad): tensors
                # are its wrappers, and a reduction of ours under vmap has no batching rule. A
                # dispatch mode: fake tensors (torch 2.1's dynamo ran modules on them: "Mixing fake
                # modes" switched the monitor off), or the script's own, which must not see our ops.
                return orig_call(self, *args, **kwargs)
            t0 = clock()  # the hooks' own time, for the sampler (see _Sampler: slow steps)
            t = type(self)
            # A finite-preserving leaf inside a model runs without hooks (see _light).
            light = ((t in light_plain or (t in light_inplace and not self.inplace)) and me._stack
                     and not me._stats_now and args)
            if not light and t in containers and me._stack and not me._stats_now and args and plain(self):
                return call_container(self, args, kwargs)
            hargs = args
            if not args and kwargs:  # model(**batch): its first tensor argument is its input
                hargs = next(((v,) for v in kwargs.values() if isinstance(v, tensor_type) and v.is_floating_point()),
                             ())
            try:
                if not light:
                    pre(self, hargs)
                elif me._hot_pending is not None:  # as a hook would (the sum while the tensor is in cache)
                    me._resolve_hot(self if args[0] is me._hot_pending[1] else None)
            except Exception as exc:  # a bug of ours: switch off, never fail the call
                me._disable(exc)
                return orig_call(self, *args, **kwargs)
            t1 = clock()
            try:
                if direct and self._compiled_call_impl is None:  # torch's own _wrapped_call_impl, inlined
                    result = self._call_impl(*args, **kwargs)
                else:
                    result = orig_call(self, *args, **kwargs)
            except BaseException:
                if me._fwd_on:
                    try:
                        if light:
                            me._light_raised(self)
                        else:
                            post(self, hargs, None)  # sees the exception through sys.exc_info()
                    except Exception as exc:
                        me._disable(exc)
                raise
            if light:
                me._hook_s += t1 - t0
                x = args[0]
                if isinstance(result, tensor_type) and isinstance(x, tensor_type) and result is not x:
                    try:
                        entry = (t, x, x._version, result, result._version)
                    except RuntimeError:  # inference tensors have no version counter: nothing to derive
                        return result
                    pending = me._light
                    pending.append(entry)
                    if len(pending) >= LIGHT_MAX:
                        me._guarded(me._absorb_light)
                return result
            t2 = clock()
            if me._fwd_on:
                try:
                    post(self, hargs, result)
                except Exception as exc:
                    me._disable(exc)
            me._hook_s += t1 - t0 + clock() - t2
            return result

        __call__.__wrapped__ = orig_call  # type: ignore[attr-defined]
        __call__.__tui_debug__ = True  # type: ignore[attr-defined]  # (tests tell ours apart by it)
        self._orig_call = orig_call
        self._call_wrapper = __call__
        module_type.__call__ = __call__  # type: ignore[method-assign]
        self._fwd_on = self._observe  # re-installed on a sampled-out step: its calls stay unobserved

    def _adopt_thread(self) -> None:
        """The first backward comes from another thread than the one that imported torch (a script
        that trains in a thread of its own): that thread is the training thread from now on. Its
        calls were all ignored, and the run ended with "0 steps" and no finding."""
        if self._backwards_here:
            return
        self._tid = threading.get_ident()
        self._stack.clear()
        self._clear_step()
        self._unchecked_losses = []
        self._unchecked_sites = []
        self._step_end = None
        self._pending.append(FindingEvent(
            severity="info", category="system_error", step=self.step, key="training-thread",
            message=f"training runs in thread {threading.current_thread().name!r}, not the one that imported torch: "
                    "monitoring that thread from its first backward",
            context={"thread": threading.current_thread().name}))

    def _in_forked_child(self) -> None:
        """A forked child (a DataLoader worker) runs no training of ours: hooks off. Its copy of the fast
        path's lock may have been held by another thread of the parent at the fork: a new one."""
        self._fast_lock = threading.Lock()
        self.uninstall()

    def uninstall(self) -> None:
        """Remove every hook and patch (also run in forked DataLoader workers)."""
        if not self._installed:
            return
        self._installed = False
        self._fast_off()
        self._fwd_on = False
        self._replay_rec = False
        self._replay_log = []
        self._stack.clear()
        for h in self._handles + ([self._post_handle] if self._post_handle else []):
            try:
                h.remove()
            except Exception:
                pass
        self._handles.clear()
        self._post_handle = None
        module_type = self._nn_module.Module
        if module_type.__call__ is self._call_wrapper:  # not if someone wrapped it since: theirs stays
            module_type.__call__ = self._orig_call  # type: ignore[method-assign]
        if self._orig_patch_step is not None:
            self._optim_module.Optimizer._patch_step_function = self._orig_patch_step  # type: ignore[attr-defined]
            self._orig_patch_step = None
        torch = self.torch
        if torch is not None and self._orig_backward is not None:
            torch.autograd.backward = self._orig_backward
        if self._orig_scale is not None:
            scaler_type = _grad_scaler_type()
            scaler_type.scale = self._orig_scale  # type: ignore[method-assign]
            if self._orig_update is not None:
                scaler_type.update = self._orig_update  # type: ignore[method-assign]

    def _find_optimized_module(self) -> None:
        if not self._OptimizedModule:
            eval_frame = sys.modules.get("torch._dynamo.eval_frame")
            if eval_frame is not None:
                self._OptimizedModule = getattr(eval_frame, "OptimizedModule", ())

    def _set_forward_hooks(self, on: bool) -> None:
        """Module calls observed only while a step is checked: a sampled-out step's calls go straight
        to torch (one flag test in the wrapper). Not by taking the wrapper out: assigning
        nn.Module.__call__ updates the call slot of every subclass (62 us for two swaps with torch's
        120 loaded, more with a model zoo's), which costs more than it saves."""
        if on and not self._fwd_on and self._installed:
            self._fwd_on = True
        elif not on and self._fwd_on:
            self._fwd_on = False
            self._stack.clear()

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A bug in the monitor disables it; it never reaches the training run."""
        try:
            return fn(*args)
        except Exception as exc:  # pragma: no cover - exercised by fault-injection test
            self._disable(exc)
            return None

    def _disable(self, exc: BaseException) -> None:
        import traceback

        self.broken = f"{type(exc).__name__}: {exc}"
        self._fast.armed = False
        self._pending.append(FindingEvent(
            severity="warning", category="system_error", step=self.step, key="monitor-disabled",
            message=f"tui_debug's instrumentation failed and was switched off; training goes on ({self.broken})",
            context={}, traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
        self.flush()
        self.uninstall()

    # -- forward hooks ------------------------------------------------------------------------
    def _pre_hook(self, module: Any, args: tuple[Any, ...]) -> None:
        """Before a module's forward, in the training thread (see _install_module_call)."""
        if self._light:
            self._absorb_light()
        stack = self._stack
        is_root = not stack
        if is_root and self._dead_roots:
            self._guarded(self._forget_dead_roots)
        if is_root and id(module) not in self._known_modules:
            self._guarded(self._register_root, module)
        elif self._unnamed_params and id(module) not in self._known_modules and id(module) not in self._not_owners:
            # a model called only inside another's forward (a module-level encoder used in Head.forward):
            # its parameters, stepped by an optimizer, were optimizer0.param3 and its NaN named "Linear"
            if self._guarded(self._owns_unnamed, module):
                self._guarded(self._register_root, module)
        # torch.compile's wrapper as the root goes on as a module whose inside is not seen: its input
        # and output are measured (NaN data fed to a compiled model went without input_validation),
        # and a NaN it makes is put on the model. Nested in a model, the model around it stays the
        # one named (its own name and forward are the wrapper's, not the block's).
        if not is_root and isinstance(module, self._OptimizedModule):
            return None
        if is_root:
            if self._step_end is not None:
                self._wait += time.perf_counter() - self._step_end  # data loading and anything between steps
                self._step_end = None
            if not isinstance(module, self._Loss):
                if self._nodes:
                    self._nodes = {}  # a new forward pass: let the last one's graph go
                if self._deferred:
                    self._flush_deferred()  # held no longer than the forward that made them
                ref, self._root_out = self._root_out, None
                if ref is not None and ref() is None and self._n_sent:
                    self._forwards_unread += 1
                    if self._forwards_unread >= UNREAD_FORWARDS:
                        losses = self._losses  # a backward's losses wait for the step's read
                        self._clear_step()
                        self._losses = losses
                else:
                    self._forwards_unread = 0
        if self._bn_queued and id(module) in self._bn_queued:
            self._reduce_acts()  # its statistics as its last forward left them, before this one updates them
        if self._hot_pending is not None:
            self._bn_fill = None
            if not (args and isinstance(module, self._BatchNorm) and self._guarded(self._bn_takes, module, args[0])):
                pending = self._hot_pending
                self._resolve_hot(module if pending is not None and args and args[0] is pending[1] else None)
        stack.append(module)
        self._last_in = None
        if args and self._observe and self._track_acts and self._is_grad_enabled():
            x = args[0]
            if isinstance(x, self._Tensor) and x.is_floating_point():
                idx, new = self._measure_input(x)
                if new:
                    if self._acts and module.__dict__.get("inplace") is True:
                        # ReLU(inplace=True) and kin: read its input now, before the module overwrites
                        # it (a queued input was stale by the chunk's reduction, and the NaN that the
                        # code before it made was put on the ReLU, "its input was not measured")
                        self._reduce_acts()
                    if is_root and idx >= 0 and x.grad_fn is None \
                            and not (self._n_sent > 1 and self._guarded(self._made_here, x)):
                        # data entering a model, not a model's output (autograd made it, or it is one
                        # detached, as a GAN's D(G(z).detach()): a NaN there was reported as bad data)
                        self._root_inputs.append((module, idx, "input"))
                    self._impl = (idx,) if idx >= 0 else ()
                self._last_in = (module, x, x._version, idx, self._impl)
            if len(args) > 1 and isinstance(module, self._Loss):
                self._loss_target(module, args[1])
        return None

    def _made_here(self, x: Any) -> bool:
        """``x`` holds a measured output of this step under another tensor: ``D(fake.detach())`` is
        G's output, not data (a NaN in it was reported as bad data as well as on G's module)."""
        ptr = x.data_ptr()
        if not ptr:
            return False
        for ref in self._refs:
            t = ref()
            if t is not None and t is not x and t.data_ptr() == ptr and t.shape == x.shape:
                return True
        return False

    def _owns_unnamed(self, module: Any) -> bool:
        owns = any(id(p) in self._unnamed_params for p in module.parameters())
        if not owns:
            if len(self._not_owners) > 10_000:  # (modules made per call: their ids come and go)
                self._not_owners.clear()
            self._not_owners.add(id(module))
        return owns

    def _loss_target(self, module: Any, y: Any) -> None:
        """A loss's floating-point target (regression labels, a reconstruction's reference) not
        measured yet: data too, so a NaN in it is bad data, not the model's doing."""
        if not isinstance(y, self._Tensor) or not y.is_floating_point() or self._measured(y) >= 0:
            return
        idx = self._sentinel(y)
        if self._hot_pending is not None:
            self._resolve_hot()
        if idx >= 0:
            self._root_inputs.append((module, idx, "target"))

    def _absorb_light(self) -> None:
        """Record the outputs of the finite-preserving calls made since the last hook as derived from
        their inputs, as their post-hooks would have (see _light). One changed in place since, or whose
        input is unknown, is left for the module it feeds to measure."""
        light, self._light = self._light, []
        if not (self._observe and self._track_acts):
            return
        for t, x, xv, r, rv in light:
            if x._version != xv or r._version != rv or not r.is_floating_point():
                continue
            idx = self._measured(x)
            if idx < 0 and self._nodes:
                idx = self._from_graph(x)
            if idx < 0 or len(self._derived) >= 4 * self._max_sent:
                continue
            impl = self._impl if t in self._prop_safe else ()
            self._derived[id(r)] = (self._weakref(r), rv, idx, impl)
            g = r.grad_fn
            if g is not None:
                self._nodes[id(g)] = (g, idx, impl)

    def _light_raised(self, module: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is not None:
            self._stack.append(module)  # the innermost running module, as a hook would have had it
            try:
                self._on_forward_exception(exc)
            finally:
                self._stack.pop()

    def _call_container(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One of torch's containers (CONTAINERS, exact type, no hooks) inside a model: no pre- or
        post-hook. Its input is measured as its pre-hook did (its parent's code may have made it),
        its children measure what they take and make, it is on the stack (an exception names it as
        running), and its call is recorded after its children's, as its post-hook would (a value its
        own code made non-finite is named on it). A large output pending its sum passes through it
        to the module that reads it when what runs next is another such container's code (which
        changes nothing in place); into other code it is summed on the way out, as before."""
        if self._unnamed_params and id(module) not in self._known_modules and id(module) not in self._not_owners:
            if self._guarded(self._owns_unnamed, module):  # (see _pre_hook: a model inside another's forward)
                self._guarded(self._register_root, module)
        try:
            in_idx = self._container_input(args[0])
        except Exception as exc:  # a bug of ours: switch off, never fail the call
            self._disable(exc)
            return self._orig_call(module, *args, **kwargs)
        stack = self._stack
        stack.append(module)
        try:
            result = self._orig_call(module, *args, **kwargs)
        except BaseException:
            if self._fwd_on:
                try:
                    exc = sys.exc_info()[1]
                    if exc is not None:
                        self._on_forward_exception(exc)
                except Exception as exc2:
                    self._disable(exc2)
            if stack and stack[-1] is module:
                stack.pop()
            raise
        if stack and stack[-1] is module:
            stack.pop()
        elif module in stack:
            del stack[len(stack) - 1 - stack[::-1].index(module):]
        if self._fwd_on:
            try:
                self._container_done(module, args, result, in_idx)
            except Exception as exc:
                self._disable(exc)
        return result

    def _container_input(self, x: Any) -> int:
        if not (self._observe and self._track_acts and isinstance(x, self._Tensor) and self._is_grad_enabled()
                and x.is_floating_point()):
            return -1
        if self._light:
            self._absorb_light()
        return self._measure_input(x)[0]

    def _measure_input(self, x: Any) -> tuple[int, bool]:
        """``x``'s sentinel: known already, derived through the autograd graph, or queued now (True)."""
        idx = self._measured(x)
        if idx < 0 and self._nodes:
            idx = self._from_graph(x)
        if idx >= 0:
            return idx, False
        idx = self._sentinel(x)
        if self._hot_pending is not None:
            self._resolve_hot()  # an input is read before its module can change it in place
        return idx, True

    def _container_done(self, module: Any, args: tuple[Any, ...], result: Any, in_idx: int) -> None:
        if not (self._observe and self._track_acts and self._is_grad_enabled()):
            return
        out = result if isinstance(result, self._Tensor) else _first_tensor(result, self._Tensor)
        if out is None or not out.is_floating_point():
            return
        if self._light:
            self._absorb_light()  # a last child run without hooks (a final ReLU) made ``out``
        out_idx = self._measured(out)
        if out_idx < 0:  # made by its own code (or a fused path): measured as its post-hook would
            self._stack.append(module)
            self._last_in = None
            self._post_hook(module, args, result)
            return
        pending = self._hot_pending
        if pending is not None and pending[1] is out:
            stack = self._stack
            parent = stack[-1] if stack else None
            if parent is None or type(parent) not in self._containers or not self._plain(parent):
                self._resolve_hot()  # into code that may change it in place before any hook sees it
        if in_idx != out_idx:
            self._calls.append((module, in_idx, out_idx))

    def _measured(self, t: Any) -> int:
        """The sentinel index already holding ``t``'s current value, else -1.

        Checked by weak reference (a freed tensor's id is soon reused) and version counter (an
        in-place change makes the earlier measurement stale).
        """
        key = id(t)
        idx = self._sent_ids.get(key)
        if idx is None or self._refs[idx]() is not t or t._version != self._ver[idx]:
            d = self._derived.get(key)
            if d is None or d[0]() is not t or t._version != d[1]:
                return -1
            self._impl = d[3]
            return d[2]
        self._impl = (idx,)
        return idx

    def _from_graph(self, t: Any) -> int:
        """The sentinel that tells ``t``'s finiteness when autograd made it from measured tensors by
        finite-preserving operations (see GRAPH_UNARY, GRAPH_SUM), else -1. An in-place change
        replaces a tensor's grad_fn, so a hit is about its current value."""
        g = t.grad_fn
        if g is None:
            return -1
        self._impl = ()
        idx = self._node_index(g, GRAPH_DEPTH, t.dtype in self._sum_dtypes)
        if idx >= 0 and len(self._derived) < 4 * self._max_sent:
            self._derived[id(t)] = (self._weakref(t), t._version, idx, self._impl)
            self._nodes[id(g)] = (g, idx, self._impl)
        return idx

    def _node_index(self, g: Any, depth: int, sums: bool) -> int:
        """Sets ``_impl`` too: the slots proven finite by the node's output being finite."""
        nodes, kinds = self._nodes, self._node_kinds
        keeps = True  # every node so far passes a non-finite input on (GRAPH_PROPAGATING)
        while True:  # along a chain of one-input nodes
            hit = nodes.get(id(g))
            if hit is not None and hit[0] is g:
                self._impl = hit[2] if keeps else ()
                return hit[1]
            if depth <= 0:
                return -1
            depth -= 1
            kind = kinds.get(type(g))
            if kind is None:
                name = type(g).__name__
                kind = kinds[type(g)] = ((3 if name in GRAPH_PROPAGATING else 1) if name in GRAPH_UNARY
                                         else 2 if name in GRAPH_SUM else 0)
            if kind & 1 == 0:
                break
            if kind == 1:
                keeps = False
            nf = g.next_functions
            if len(nf) != 1:
                return -1
            g = nf[0][0]
            if g is None:
                return -1
        if kind != 2 or not sums:
            return -1
        idxs: list[int] = []
        impl: tuple[int, ...] = ()
        for nxt, _ in g.next_functions:
            if nxt is None:  # a constant or a tensor that needs no gradient: not known to be finite
                return -1
            i = self._node_index(nxt, depth, sums)
            if i < 0:
                return -1
            impl += self._impl  # a sum is non-finite when a term is
            if i not in idxs:
                idxs.append(i)
        self._impl = impl if keeps else ()
        if len(idxs) == 1:
            return idxs[0]
        if not idxs or len(self._virtual) >= self._max_sent:
            return -1
        self._virtual.append(tuple(idxs))
        return VIRTUAL + len(self._virtual) - 1

    def _sentinel(self, t: Any, module: Any = None) -> int:
        """Queue ``t`` for a finiteness check; returns its sentinel index (-1 when not measured).

        Small tensors are reduced in chunks with one ``_foreach_norm`` (L2, the vectorised fast path:
        15x faster on the CPU than ord=inf); large ones at once with a sum. NaN/Inf propagate, and an
        inf that might be an overflow (L2 above ~1e19, a sum above ~3e38) is re-checked exactly when it
        occurs. At most ``SENTINEL_CHUNK`` small activations are kept alive longer than autograd would.
        On CUDA there is no cache to catch and every reduction is a launch, so all go through the chunks
        (``SENTINEL_CHUNK_CUDA``, or fewer when they hold ``SENTINEL_CHUNK_CUDA_ELEMS`` elements).
        """
        if t.is_nested:  # (jagged batches: no _foreach_norm for them; they stay unmeasured)
            return -1
        n = self._n_sent
        numel = t.numel()
        if numel == 0:  # (an empty output: nothing to check)
            return -1
        if n >= self._max_sent:
            self._sent_overflow += 1
            return -1
        cuda = t.is_cuda
        hot = numel >= SENTINEL_HOT and t.is_cpu  # (other devices: a read would wait for them)
        if hot and self._acts:
            self._reduce_acts()  # keep _sent in index order
        self._n_sent = n + 1
        self._ver.append(t._version)
        self._refs.append(self._weakref(t))
        self._sent_ids[id(t)] = n
        g = t.grad_fn
        if g is not None:
            self._nodes[id(g)] = (g, n, (n,))  # bounded: one per sentinel
        if hot:
            # Read it at the next hook, while it is in cache, with a plain sum (a third cheaper than
            # L2 on the CPU): NaN/Inf propagate; an overflow to +-inf is re-checked exactly (see
            # _check_nonfinite). Unless that hook is a BatchNorm's that takes it (see _bn_takes).
            if self._hot_pending is not None:
                self._resolve_hot()
            self._sent.append(None)
            key = None
            if module is not None:
                calls = self._hot_calls.get(id(module), 0)
                self._hot_calls[id(module)] = calls + 1
                key = self._hot_mod[n] = (id(module), calls)
            self._hot_pending = (n, t, t._version, key)
            return n
        acts = self._acts
        acts.append(t.detach())  # shares t's version counter
        if cuda:
            self._acts_cuda_elems += numel
            if len(acts) >= SENTINEL_CHUNK_CUDA or self._acts_cuda_elems >= SENTINEL_CHUNK_CUDA_ELEMS:
                self._reduce_acts()
        elif len(acts) >= SENTINEL_CHUNK:
            self._reduce_acts()
        return n

    def _resolve_hot(self, reader: Any = None) -> None:
        """Sum the pending large activation now (it was not handed to a BatchNorm), or let it wait
        for a later sum to prove it finite (see _settle): only when ``reader``, the module whose
        call comes next, takes it as its input and is known not to change it in place, and only
        outside backward (a checkpointed segment's recompute must free its activations)."""
        pending, self._hot_pending = self._hot_pending, None
        self._bn_fill = None
        if pending is not None:
            n, t, ver, key = pending
            stale = t._version != ver
            if stale:  # changed in place since its module made it: unknown, not evidence
                self._stale.add(n)
            elif (reader is not None and key in self._defer_ok and len(self._deferred) < DEFER_MAX
                  and self._reads_only(reader) and not self._in_backward
                  and (self._graph_task is None or self._graph_task() == -1)):
                self._deferred[n] = (t, ver)
                return
            finite = self._sum_hot(n, t)
            if n in self._implies:
                self._settle(n, finite and not stale)

    def _reads_only(self, module: Any) -> bool:
        t = type(module)
        if t in self._light_inplace:
            if module.inplace:
                return False
        elif t not in self._safe_readers and t not in self._light_plain:
            return False
        return self._plain(module)

    def _plain(self, module: Any) -> bool:
        """Runs its class's forward on its arguments: no hooks that could swap or change its input or
        output, no forward of its own."""
        nm = self._nn_module
        return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                    or nm._global_forward_hooks or nm._global_forward_pre_hooks)

    def _sum_hot(self, n: int, t: Any) -> bool:
        """Sum a large CPU activation into slot ``n``; whether it is finite. The value is looked at now
        (~1 us): a sum of +-inf is an inf in the tensor or finite values summing past ~3.4e38, and
        only the tensor, alive now but maybe not at the read, tells which."""
        s = self._sent[n] = t.detach().sum(dtype=self._float32)
        v = s.item()
        if v == _INF or v == -_INF:
            if bool(self.torch.isfinite(t).all()):  # type: ignore[union-attr]
                self._sent[n] = self._zero  # an overflow of finite values
                return True
            self._inf_kept.add(n)  # a real inf: the read's exact check must not re-decide on a changed tensor
            return False
        return v == v

    def _settle(self, m: int, finite: bool) -> None:
        """Slot ``m``'s value is known: what it proves. Finite: the slots it implies (see _impl) are
        finite, and the held ones need no sum; their producers' outputs wait from the next step on.
        Not finite: the held ones are summed now, while they are alive, so that the first module to
        produce a non-finite value is named as if every output had been summed."""
        todo = [(m, finite)]
        implies, deferred = self._implies, self._deferred
        while todo:
            m, finite = todo.pop()
            for k in implies.pop(m, ()):
                d = deferred.pop(k, None)
                if finite and d is not None and d[0]._version != d[1]:
                    # changed in place while it was held (a reader should not): the proof is about
                    # the changed value, so it is unknown, and what it implies is summed
                    self._sent[k] = self._zero
                    self._stale.add(k)
                    todo.append((k, False))
                elif finite:
                    if d is not None:
                        self._sent[k] = self._zero
                    else:
                        key = self._hot_mod.get(k)
                        if key is not None and k not in self._stale:
                            if len(self._defer_ok) > 4096:  # models made and dropped: forget them
                                self._defer_ok.clear()
                            self._defer_ok.add(key)
                    todo.append((k, True))
                elif d is not None:
                    todo.append((k, self._sum_deferred(k, d)))
                elif k in implies:
                    # Summed already (its proof is in _implies[k] still only if it never came), or a
                    # BatchNorm's placeholder (its statistics are read at the step's end), or stale:
                    # what it implies is summed unless its own sum says finite.
                    v = self._sent[k]
                    todo.append((k, v is not None and v is not self._zero and k not in self._stale
                                 and math.isfinite(v.item())))

    def _sum_deferred(self, k: int, d: tuple[Any, int]) -> bool:
        t, ver = d
        stale = t._version != ver
        if stale:  # changed in place since: unknown (its proof did not come)
            self._stale.add(k)
        return self._sum_hot(k, t) and not stale

    def _flush_deferred(self) -> None:
        """The forward is over and these were not proven finite: sum them, and sum their producers'
        outputs at once from now on."""
        while self._deferred:
            k = min(self._deferred)
            d = self._deferred.pop(k)
            key = self._hot_mod.get(k)
            if key is not None:
                self._defer_ok.discard(key)
            self._settle(k, self._sum_deferred(k, d))

    def _bn_takes(self, module: Any, x: Any) -> bool:
        """A training BatchNorm fed with the pending activation, unchanged, and whose running
        statistics are finite now, will fold that activation into them: a NaN or Inf in any channel
        makes its running mean or variance non-finite. Those C numbers, queued after its forward, are
        the activation's sentinel (its exact re-check on overflow still has the tensor: BatchNorm
        keeps its input for backward)."""
        n, t, ver, _ = self._hot_pending  # type: ignore[misc]
        if x is not t or t._version != ver or not module.training or not module.track_running_stats:
            return False
        buffers = module._buffers  # not module.running_mean: nn.Module.__getattr__ is slow
        rm, rv = buffers.get("running_mean"), buffers.get("running_var")
        if rm is None or rv is None or isinstance(rm, self._Uninitialized) or not rm.is_cpu:
            return False  # no statistics, a lazy module before its first call, or not on the CPU (no sync)
        known = self._bn_finite.get(id(module))
        versions = _bn_versions(module)
        if versions is None or known is None or known[0]() is not module or known[1] != versions:
            # not known finite since the last read (first call, a forward in between, an edit)
            if not math.isfinite(self.torch.cat([rm.reshape(-1), rv.reshape(-1)]).sum().item()):  # type: ignore[union-attr]
                return False  # already non-finite (a sticky NaN from an earlier step): sum the tensor
        self._bn_fill = module
        return True

    def _queue_small(self, t: Any) -> int:
        """A small tensor (BatchNorm statistics, affine parameters) into the chunk: a sentinel slot
        no lookup finds, so it costs no reduction of its own. -1 when the step's slots are used up."""
        n = self._n_sent
        if n >= self._max_sent:
            self._sent_overflow += 1
            return -1
        self._n_sent = n + 1
        self._ver.append(t._version)
        self._refs.append(self._weakref(t))
        acts = self._acts
        acts.append(t.detach() if t.requires_grad else t)
        if len(acts) >= SENTINEL_CHUNK:
            self._reduce_acts()
        return n

    def _bn_sentinels(self, module: Any, out: Any) -> int:
        """After the BatchNorm's forward: its input's sentinel is its running statistics; its
        output's adds its weight and bias (finite input, statistics and affine parameters make a
        finite output). Both are sums of queued slots: no reduction now. Returns the output's index."""
        n = self._hot_pending[0]  # type: ignore[index]
        self._hot_pending = None
        self._bn_fill = None
        buffers, params = module._buffers, module._parameters
        rm, rv = buffers["running_mean"], buffers["running_var"]
        if out.numel() == 0 or self._n_sent + 4 > self._max_sent or len(self._virtual) >= self._max_sent:
            self._sent[n] = self.torch.cat([rm.reshape(-1), rv.reshape(-1)]).sum(dtype=self._float32)  # type: ignore[union-attr]
            self._sent_overflow += 1
            return -1
        if self._acts:
            self._reduce_acts()  # _sent stays in index order (slot n is already in it)
        stats = (self._queue_small(rm), self._queue_small(rv))
        self._bn_queued.add(id(module))
        self._sent[n] = self._zero  # replaced by the statistics' value when a step goes bad
        self._alias.append((n, stats))
        versions = _bn_versions(module)
        if versions is not None:
            self._bn_step.append((module, versions))
        parts = stats + tuple(self._queue_small(p) for p in (params.get("weight"), params.get("bias")) if p is not None)
        self._virtual.append(parts)
        m = VIRTUAL + len(self._virtual) - 1
        self._derived[id(out)] = (self._weakref(out), out._version, m, ())
        g = out.grad_fn
        if g is not None:
            self._nodes[id(g)] = (g, m, ())
        return m

    def _norms(self, tensors: list[Any]) -> Any:
        """L2 norms in one call; half-precision tensors accumulate in float32 (their own dtype would
        overflow at 65504 and every large activation would need an exact re-check)."""
        f32 = self._float32
        return foreach_norm(self.torch, tensors, all(t.dtype is f32 for t in tensors))

    def _reduce_acts(self) -> None:
        acts = self._acts
        if acts:
            # A tensor modified in place after it was queued (ReLU(inplace=True), x.log_()) no longer
            # shows the value the module produced: its sentinel is unknown, not evidence.
            self._mark_stale(acts)
            self._sent.extend(self._norms(acts))
            self._acts = []
            self._acts_cuda_elems = 0
            if self._bn_queued:
                self._bn_queued = set()

    def _post_hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        """After a module's forward (``output`` None when it raised), in the training thread."""
        if self._light:
            self._absorb_light()
        if isinstance(module, self._OptimizedModule) and not (self._stack and self._stack[0] is module):
            return None  # (nested: see _pre_hook)
        if self._hot_pending is not None and (self._bn_fill is not module or output is None):
            self._resolve_hot()
        stack = self._stack
        if output is None:
            exc = sys.exc_info()[1]
            if exc is not None:
                self._on_forward_exception(exc)
        if stack and stack[-1] is module:
            stack.pop()
        elif module in stack:
            del stack[len(stack) - 1 - stack[::-1].index(module):]
        # (module, input, ...) from the pre-hook: dropped now, on every path, or it would keep that input
        # (a loss module's: the logits) alive until the step's read
        last, self._last_in = self._last_in, None
        if (output is None or not self._observe or not self._track_acts or not self._is_grad_enabled()
                or isinstance(module, self._Loss)):
            return None  # a loss module's output is the loss, checked at backward
        if self._bn_unchecked and id(module) in self._bn_unchecked and module.training and args:
            self._bn_unchecked.discard(id(module))
            self._guarded(self._redundant_bias, module, args[0])
        out = output
        if not isinstance(out, self._Tensor):
            out = _first_tensor(out, self._Tensor)
            if out is None:
                return None
        if not out.is_floating_point():
            return None
        if not stack:
            self._root_out = self._weakref(out)  # a model's forward ended (see UNREAD_FORWARDS)
        in_idx = -1
        in_impl: tuple[int, ...] = ()
        x = args[0] if args else None
        if last is not None and last[0] is module and last[1] is x and x._version == last[2]:
            in_idx = last[3]  # as the pre-hook found it (nothing ran in between that changed it)
            in_impl = last[4]
        elif x is not None and isinstance(x, self._Tensor):
            in_idx = self._measured(x)
            if in_idx < 0:
                idx = self._sent_ids.get(id(x))
                if idx is not None and self._refs[idx]() is x:
                    in_idx = idx  # modified in place by this module: possibly stale (see _reduce_acts)
            else:
                in_impl = self._impl
        key = id(out)
        out_idx = self._sent_ids.get(key, -1)
        if out_idx >= 0 and (self._refs[out_idx]() is not out or out._version != self._ver[out_idx]):
            out_idx = -1
        if out_idx < 0:
            d = self._derived.get(key)
            if d is not None and d[0]() is out and out._version == d[1]:
                out_idx = d[2]
        if out_idx < 0:
            if type(module) in self._safe_types and in_idx >= 0 and out is not x:
                # finite if its input was: no read (and it cannot be the first to go non-finite)
                if len(self._derived) < 4 * self._max_sent:
                    impl = in_impl if type(module) in self._prop_safe else ()
                    self._derived[id(out)] = (self._weakref(out), out._version, in_idx, impl)
                    g = out.grad_fn
                    if g is not None:
                        self._nodes[id(g)] = (g, in_idx, impl)
                out_idx = -2
            elif self._bn_fill is module and self._hot_pending is not None and out is not x:
                out_idx = self._guarded(self._bn_sentinels, module, out)
                if out_idx is None or out_idx < 0:
                    return None
            else:  # new, or modified in place by this module: measure what it produced
                if self._hot_pending is not None:
                    self._resolve_hot()
                out_idx = self._sentinel(out, module)
                if out_idx < 0:
                    return None
                if in_impl and type(module) in self._prop_types and self._hot_pending is not None \
                        and self._hot_pending[0] == out_idx and out is not x and self._plain(module):
                    self._implies[out_idx] = in_impl  # its input passed on every non-finite value
        elif out_idx == in_idx:  # identity modules (Dropout in eval, Identity) add nothing
            return None
        if out_idx >= 0:
            self._calls.append((module, in_idx, out_idx))
        if self._stats_now:
            kind = self._act_kinds.get(type(module))
            if kind is not None:
                self._guarded(self._activation_stat, module, kind, out)
        return None

    def _redundant_bias(self, bn: Any, x: Any) -> None:
        """Once per BatchNorm, at its first training forward: a Linear/Conv bias feeding it directly
        (the very tensor the module returned, with the bias's features on the BatchNorm's channel
        dimension; a reshape or a Linear over a sequence would mix channels, so it is not flagged)."""
        idx = self._sent_ids.get(id(x), -1)
        if idx < 0 or self._refs[idx]() is not x:
            return
        producer = next((m for m, _, o in reversed(self._calls) if o == idx), None)
        nn = self.torch.nn  # type: ignore[union-attr]
        if not ((isinstance(producer, nn.Linear) and x.dim() == 2)
                or (isinstance(producer, nn.modules.conv._ConvNd) and x.dim() >= 3)):
            return
        bias = producer.bias
        name = self._param_names.get(id(bias)) if bias is not None and bias.requires_grad else None
        if name:
            self._pending.append(RedundantBias(name, self.module_label(producer), self.module_label(bn), self.step + 1))

    def _activation_stat(self, module: Any, kind: str, out: Any) -> None:
        """Sampled: ReLU units dead over a window of samples (on device), tanh/sigmoid saturation."""
        if out.dim() < 2 or len(self._stat_meta) >= 256:
            return
        label = self.module_label(module)
        if any(m[0] == label for m in self._stat_meta):  # a module called twice per step: once
            return
        if kind == "relu":
            unit_dim = out.dim() - 1 if out.dim() == 3 else 1
            # a unit is active when its largest output is positive: one reduction, no copy (moving the
            # unit dimension first and reshaping copied the tensor, 16x slower on a 1M-element output)
            others = tuple(d for d in range(out.dim()) if d != unit_dim)
            dead = out.detach().amax(dim=others) <= 0
            acc = self._dead_acc.get(label)
            if acc is not None and acc[0].shape == dead.shape and acc[0].device == dead.device:
                dead = dead & acc[0]
                n = acc[1] + 1
            else:
                n = 1
            window = self.config.activation_window
            self._dead_acc[label] = (dead, n) if n < window else (dead, 0)
            if n >= window:
                del self._dead_acc[label]
            self._stat_meta.append((label, kind, n))
            self._stat_vals.append(dead.float().mean())
        else:
            o = out.detach()
            sat = (o.abs() > 0.999) if kind == "tanh" else ((o < 1e-3) | (o > 0.999))
            self._stat_meta.append((label, kind, 1))
            self._stat_vals.append(sat.float().mean())

    def _start_update_ratio(self, st: _OptState) -> None:
        """Sampled: copy the parameters before this optimizer step, to measure |update| / |weight|.
        Weight matrices only, when there are any: a bias or a norm's shift may rightly sit near zero
        (a converged Linear(4,1)'s bias at 1e-4 moved 0.1-10x its size a step, and by the median of
        two ratios the learning rate looked far too large)."""
        params = [st.params[i] for idxs in st.groups for i in idxs]
        names = st.names
        opt = st.ref() if st.ref is not None else None
        if opt is not None and any(_zero_rate(g) for g in opt.param_groups):
            # a group frozen by a zero rate (linear probing) does not move by design: its ratio of 0
            # made the learning rate look far too small
            frozen, i = set(), 0
            for g in opt.param_groups:
                n = len(g["params"])
                if _zero_rate(g):
                    frozen.update(range(i, i + n))
                i += n
            kept = [k for k, i in enumerate(i for idxs in st.groups for i in idxs) if i not in frozen]
            params, names = [params[k] for k in kept], [names[k] for k in kept]
        if any(p.dim() >= 2 for p in params):
            names = [n for n, p in zip(names, params) if p.dim() >= 2]
            params = [p for p in params if p.dim() >= 2]
        if not params or sum(p.numel() for p in params) > self.config.update_ratio_max_numel:
            return
        # Detached (aliases: the step's in-place update shows in them): on the parameters themselves
        # these ops built autograd graphs, and the norms kept the parameters alive until the next read
        # (a finished fold's model, into the next fold)
        params = [p.detach() for p in params]
        self._upd_start = (st.index, names, params, self.torch._foreach_mul(params, 1.0))  # type: ignore

    def _finish_update_ratio(self, opt_index: int) -> None:
        start = self._upd_start
        if start is None or start[0] != opt_index:
            return
        self._upd_start = None
        _, names, params, old = start
        torch = self.torch
        torch._foreach_sub_(old, params)  # type: ignore[union-attr]
        self._upd_done = (list(names), list(torch._foreach_norm(old, 2)) +  # type: ignore[union-attr]
                          list(torch._foreach_norm(params, 2)))  # type: ignore[union-attr]

    def _on_forward_exception(self, exc: BaseException) -> None:
        if self._deferred:  # summed and let go now (a script may catch it and go on, or retry after an OOM)
            self._flush_deferred()
        self._light = []
        if self._failing is not None and self._failing[0] == id(exc):
            return
        names = [self.module_label(m) for m in reversed(self._stack)]
        # an evaluation pass: gradients off, or the model in eval mode (its step is not one in progress)
        evaluating = not self._is_grad_enabled() or bool(self._stack and not self._stack[0].training)
        self._failing = (id(exc), names, evaluating)

    def failing_modules(self, exc: BaseException) -> list[str] | None:
        """Innermost-first modules that were running when ``exc`` was raised, if it came from a forward."""
        if self._failing is not None and self._failing[0] == id(exc):
            return self._failing[1]
        return self._modules_from_traceback(exc)

    def raised_in_evaluation(self, exc: BaseException) -> bool:
        """Whether ``exc`` came from a forward of an evaluation pass (see _on_forward_exception); on a
        sampled-out step, whether the outermost module in its traceback was in eval mode."""
        if self._failing is not None and self._failing[0] == id(exc):
            return self._failing[2]
        found = self._traceback_modules(exc)
        return bool(found) and not found[0].training

    def _modules_from_traceback(self, exc: BaseException) -> list[str] | None:
        """On a sampled-out step no hook ran: the modules are the ``self`` of the module-call frames."""
        return [self.module_label(m) for m in reversed(self._traceback_modules(exc))] or None

    def _traceback_modules(self, exc: BaseException) -> list[Any]:
        """The modules of the traceback's module-call frames, outermost first."""
        torch = self.torch
        if torch is None:
            return []
        module_type = torch.nn.Module
        found: list[Any] = []
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name in ("_call_impl", "_wrapped_call_impl", "forward"):
                m = frame.f_locals.get("self")
                if isinstance(m, module_type) and (not found or found[-1] is not m):
                    found.append(m)
            tb = tb.tb_next
        return found

    # -- models and names ----------------------------------------------------------------------
    def _register_root(self, module: Any) -> None:
        self._known_modules.add(id(module))
        self._find_optimized_module()
        held = module  # what the script's variable holds (named after it)
        if isinstance(module, self._OptimizedModule):
            # torch.compile's wrapper: the model inside runs compiled, never through our __call__, so it
            # is registered here, under the wrapper's name (its parameters went unnamed: optimizer0.param3)
            module = getattr(module, "_orig_mod", None)
            if not isinstance(module, self._nn_module.Module):
                return
        if id(module) in self._module_names:  # a submodule of a known model, called directly
            return
        frame = sys._getframe(1)
        wrapper = getattr(self._call_wrapper, "__code__", None)
        call = frame
        while call is not None and call.f_code is not wrapper:  # our Module.__call__: its caller called the model
            call = call.f_back
        caller = call.f_back if call is not None else None
        if held is not module:  # reached through OptimizedModule.__call__ (torch's): the script's call is further out
            while caller is not None and naming.is_library_frame(caller.f_code):
                caller = caller.f_back
        name = self._given_names.get(module)  # a model registered before (then inside a wrapper) keeps its name
        if name is None:
            base = naming.variable_name(held, frame, caller) or type(module).__name__
            count = self._name_count[base] = self._name_count.get(base, 0) + 1
            name = base if count == 1 else f"{base}#{count}"
            try:
                self._given_names[module] = name
            except TypeError:  # a module class that is not hashable
                pass
        # A new root that contains earlier roots replaces them.
        modules = list(module.modules())
        contained = {id(m) for m in modules}
        replaced = [rid for rid in self._roots if rid in contained]
        for rid in replaced:
            del self._roots[rid]
            self._root_ids.pop(rid, None)
            self._replay_roots.pop(rid, None)
        self._roots[id(module)] = (name, weakref.ref(module, self._dead_roots.append))
        self._root_ids[id(module)] = tuple(contained)
        if replaced or next(module.parameters(), None) is not None:
            self._rebuild_index()
        else:  # a loss (or another root without parameters, often one made per step): no reindex
            for qual, m in module.named_modules():
                self._module_names.setdefault(id(m), f"{name}.{qual}" if qual else name)
            self._known_modules.update(contained)
        if isinstance(module, self._Loss):
            return  # loss functions are named, not listed as models
        if held is module and self._replay_ok and next(module.parameters(), None) is not None:
            # (the fast path keeps a model's call: not a compiled one's, whose replay would compile
            # again, nor a parameter-free module's, a transform applied after the model)
            self._replay_roots[id(module)] = weakref.ref(module)
        self._mode_sensitive.pop(id(module), None)  # (a freed model's id, given to this one)
        self._eval_warned.discard(id(module))
        if self._not_stepped:
            self._not_stepped = {k for k in self._not_stepped if k[0] != id(module)}
        kinds = sorted({type(m).__name__ for m in modules if self._mode_matters(m)})
        if kinds:
            self._mode_sensitive[id(module)] = tuple(kinds)
        self._bn_unchecked.update(id(m) for m in module.modules() if isinstance(m, self._BatchNorm))
        # a lazy module's parameters have no size before its first call (counted as 0 until then)
        params = [p for p in module.parameters() if not isinstance(p, self._Uninitialized)]
        devices = sorted({str(p.device) for p in params})
        self.models_made += 1
        self._pending.append(ModelEvent(
            name=name, cls=type(module).__name__, parameters=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad), devices=devices))

    def _gradless_step(self, st: _OptState) -> None:
        """A backward ran, and this optimizer steps, yet none of its parameters has a gradient: the
        loss does not reach them, and training does nothing. Said once, after 3 checked steps so."""
        if not any(p.requires_grad for p in st.params):
            return  # a frozen stage: nothing to step, by design
        st.gradless += 1
        if st.gradless != 3:
            return
        opt = st.ref() if st.ref is not None else None
        label = f"optimizer{st.index} ({type(opt).__name__})" if opt is not None else f"optimizer{st.index}"
        n = sum(1 for p in st.params if p.requires_grad)
        self._pending.append(FindingEvent(
            severity="error", category="optimization_error", step=self.step, key=f"gradless|{st.index}",
            message=f"{label} steps {n} parameters and none of them has a gradient at its step, so they do "
                    "not train: the loss's backward does not reach them, or zero_grad() ran between backward() "
                    "and step()",
            context={"optimizer": st.index, "parameters": n, "checked_steps": st.gradless},
            recommendation="Make the optimizer from the model that computes the loss (a model re-created after "
                           "optimizer = ...(model.parameters()) leaves the optimizer with the old one's), and "
                           "call zero_grad() before backward() or after step(), not between them."))

    def _mode_matters(self, m: Any) -> bool:
        """A layer that computes otherwise in eval mode: dropout with p > 0, BatchNorm that keeps
        running statistics (a pretrained model's dropout of 0.0 does not care)."""
        if isinstance(m, self._mode_types[0]):
            return getattr(m, "p", 0) > 0
        return isinstance(m, self._mode_types[1]) and bool(getattr(m, "track_running_stats", False))

    def _check_train_mode(self, st: _OptState) -> None:
        """A model that trains in eval mode (``model.eval()`` for an evaluation, no ``model.train()``
        after it): its dropout is off and its BatchNorm normalises with running statistics, silently.
        Looked at on checked steps, for the models whose layers behave differently in the two modes and
        whose parameters this optimizer steps; said once per model."""
        for rid, kinds in list(self._mode_sensitive.items()):
            entry = self._roots.get(rid)
            root = entry[1]() if entry is not None else None
            if root is None:
                del self._mode_sensitive[rid]
                continue
            if root.training or rid in self._eval_warned or (rid, st.index, st.n_params) in self._not_stepped:
                continue
            ids = {id(p) for p in st.params}
            if not any(id(p) in ids for p in root.parameters()):
                # a teacher or EMA model, meant to stay in eval mode: not this optimizer's (not looked again)
                if len(self._not_stepped) > 1024:
                    self._not_stepped.clear()
                self._not_stepped.add((rid, st.index, st.n_params))
                continue
            if not any(p.grad is not None for p in root.parameters()):
                continue
            self._eval_warned.add(rid)
            name = entry[0]
            self._pending.append(FindingEvent(
                severity="warning", category="model_error", step=self.step, key=f"eval-mode|{name}",
                message=f"{name} trains in eval mode: model.eval() was called and no model.train() after it, "
                        f"so its {', '.join(kinds)} behave as at inference (dropout off, BatchNorm on its "
                        "running statistics)",
                context={"model": name, "modules": list(kinds)},
                recommendation=f"Call {name}.train() after evaluating, before the next training step. If the "
                               "eval mode is meant (BatchNorm statistics frozen for fine-tuning), call .eval() "
                               "on those layers only."))

    def _forget_dead_roots(self) -> None:
        """Models freed since go, with the ids of their modules: CPython gives a freed object's address
        to the next of its size, and a later fold's model was taken for a known one (left unnamed, its
        parameters named after the freed model's)."""
        self._dead_roots.clear()  # (first: a death from now on is seen next time)
        gone: set[int] = set()
        for rid in [rid for rid, (_, ref) in self._roots.items() if ref() is None]:
            del self._roots[rid]
            self._replay_roots.pop(rid, None)
            gone.update(self._root_ids.pop(rid, (rid,)))
            self._mode_sensitive.pop(rid, None)
            self._eval_warned.discard(rid)
        if len(gone) > 1:  # (a model, not a loss module made per step): keep what a live root shares
            for ids in self._root_ids.values():
                gone.difference_update(ids)
        if not gone:
            return
        self._known_modules.difference_update(gone)
        for i in gone:
            self._module_names.pop(i, None)
        if self._defer_ok:  # proofs learned per module id
            self._defer_ok = {k for k in self._defer_ok if k[0] not in gone}
        # (parameter names: a freed model's parameters are freed with it, and a new model's are named
        # when it is registered, which reindexes)

    def _rebuild_index(self) -> None:
        self._module_names.clear()
        self._param_names.clear()
        self._unnamed_params.clear()  # (the next layout lists those still unnamed)
        self._not_owners.clear()
        for name, ref in list(self._roots.values()):
            root = ref()
            if root is None:
                continue
            for qual, m in root.named_modules():
                self._module_names.setdefault(id(m), f"{name}.{qual}" if qual else name)
            for qual, p in root.named_parameters(remove_duplicate=False):
                self._param_names.setdefault(id(p), f"{name}.{qual}")
        self._known_modules.update(self._module_names)
        self._generation += 1

    def sampler_summary(self) -> dict[str, Any]:
        """The sampler's budget, stride and latest decisions (with the step times they compared)."""
        return {**self._sampler.summary(), "forward_observed_steps": self._fwd_observed_steps}

    def models(self) -> dict[str, Any]:
        """The script's root models by name (loss functions excluded)."""
        out = {}
        for name, ref in list(self._roots.values()):
            m = ref()
            if m is not None and not isinstance(m, self._Loss):
                out[name] = m
        return out

    def optimizers(self) -> list[Any]:
        return [o for o in (st.ref() for st in list(self._opts.values())) if o is not None]

    def optimizer_index(self, opt: Any) -> int:
        """The optimizer's index in the step records and the report (-1: not seen stepping)."""
        st = self._opts.get(id(opt))
        return st.index if st is not None and st.ref is not None and st.ref() is opt else -1

    def module_label(self, module: Any) -> str:
        if isinstance(module, self._OptimizedModule):  # torch.compile's wrapper: the model it runs
            module = getattr(module, "_orig_mod", module)
        name = self._module_names.get(id(module))
        cls = type(module).__name__
        return f"{name} ({cls})" if name else cls

    # -- losses -----------------------------------------------------------------------------------
    def _on_backward(self, tensors: Any) -> None:
        if not self._observe:
            # An unchecked (sampled-out) step still gets its loss looked at, cheaply, at the boundary.
            if isinstance(tensors, self._Tensor) and self.config.enable_loss_tracking:
                self._unchecked_losses.append(tensors)
            return
        self._forwards_unread = 0
        if self._nodes:
            self._nodes = {}  # the graph is being consumed: no forward of this pass is left to look it up
        if self._hot_pending is not None:
            self._resolve_hot()
        if self._deferred:
            self._flush_deferred()  # before autograd frees what they are
        if not self.config.enable_loss_tracking or self._is_compiling():
            return
        loss = tensors
        if not isinstance(loss, self._Tensor) or loss.numel() != 1:
            return
        unscaled = self._scaled.pop(id(loss), None)
        if unscaled is not None:
            loss = unscaled
        frame = sys._getframe(2)  # (the backward wrapper's: _on_backward <- _guarded <- it)
        lib = self._library_codes
        hops = 0
        while frame is not None:
            code = frame.f_code
            is_lib = lib.get(code)
            if is_lib is None:
                is_lib = lib[code] = naming.is_library_frame(code)
            if not is_lib:
                break
            frame = frame.f_back
            hops += 1
        if frame is not None:
            self._site_hops = hops  # where a sampled-out step's backward finds its caller (see _site_key)
        key: tuple[Any, int] = (None, 0) if frame is None else (frame.f_code, frame.f_lasti)
        site = self._loss_sites.get(key)
        if site is None:
            site = self._guarded(self._new_loss_site, key, frame)
            if site is None:
                return
        self._last_site = site
        value = loss.detach()
        if value.dtype != self._float32:
            value = value.float()
        if value.dim():
            value = value.reshape(())
        self._losses.append((site, value))
        if len(self._losses) > 4096:  # backward without any step: keep the latest only
            del self._losses[:2048]
        if not self._opts and self._backwards_without_optimizer and value.is_cpu and self._optimizer_made():
            # Backwards of an optimizer that has never stepped: micro-batches, or a hand-written update
            # beside an optimizer kept for zero_grad(), which counts steps only after ACCUMULATION_MAX
            # of them: their losses are looked at now (on the CPU, free), not at a step that may never come
            v = value.item()
            if not math.isfinite(v):
                self._late_nonfinite(self.step, site, v, self.step, before_step=self._backwards_without_optimizer + 1)
                self.flush()

    def _new_loss_site(self, key: tuple[Any, int], frame: Any) -> int:
        if frame is None:
            name, source = "loss", "?"
        else:
            name, source = naming.loss_name(frame)
        if name in self._loss_site_names:
            name = f"{name}@{source.rsplit(':', 1)[-1]}"
        index = len(self._loss_site_names)
        self._loss_site_names.append(name)
        self._loss_sites[key] = index
        self._pending.append(LossSiteEvent(index=index, name=name, source=source))
        return index

    # -- steps ----------------------------------------------------------------------------------
    def _opt_state(self, opt: Any) -> _OptState:
        st = self._opts.get(id(opt))
        if st is None or st.ref() is not opt:
            # States of optimizers since freed go (a script making one per step would grow the dict)
            for key in [k for k, v in self._opts.items() if v.ref() is None]:
                del self._opts[key]
            st = _OptState(index=self._opts_made, ref=None, params=[])
            self._opts_made += 1
            st.ref = weakref.ref(opt, functools.partial(_release_params, st))
            self._opts[id(opt)] = st
        groups = opt.param_groups
        # the learning rates as they are now (a scheduler's, or a recovery action's): sent when they
        # change. A tensor rate is compared by identity (reading it could wait for a GPU).
        lrs = tuple(v if type(v) in (float, int) else id(v) for v in (g.get("lr") for g in groups))
        if lrs != st.lrs:
            st.lrs = lrs
            self._pending.append(OptimizerEvent(
                index=st.index, cls=type(opt).__name__, param_groups=len(groups),
                lr=[float(g.get("lr", float("nan"))) for g in groups]))
        n = len(groups) * 1_000_003 + len(groups[-1]["params"]) if groups else 0  # add_param_group changes it
        if n != st.n_params:
            st.params = [p for g in groups for p in g["params"]]
            st.n_params = n
            st.generation = -1
        return st

    def _fast_step_hook(self) -> Callable[[Any, Any, Any], None]:
        """The optimizer step pre-hook: an armed run's step in a few lines (see _FastPath), anything
        else through ``_pre_step``. Exact as the long way: one finite CPU loss that does not jump,
        ended early (through ``_pre_step``) by whatever the long way would do more for a step."""
        me = self
        fast = self._fast
        pre_step = self._pre_step
        is_compiling = self._is_compiling
        get_ident = threading.get_ident
        perf_counter = time.perf_counter

        def step_pre_hook(opt: Any, args: Any, kwargs: Any) -> Any:
            f = fast
            if not is_compiling():  # (first: torch.compile must not guard on the run's state)
                try:
                    if f.armed and f.ref() is opt and len(args) == 1 and not kwargs and get_ident() == f.tid:
                        losses = f.losses
                        t = losses[0] if len(losses) == 1 else None
                        if t is not None and t.is_cpu:
                            try:
                                v = t.item()
                            except RuntimeError:  # not one element: the long way
                                v = _NAN
                            m = abs(v)  # (NaN fails every comparison below: the long way)
                            high = f.high
                            if m <= LOSS_JUMP * high or (high <= 0.0 and m < _INF):
                                now = perf_counter()
                                duration = now - f.last
                                n = f.n + 1
                                if duration <= SPAN_BREAK_S and n % f.every and n < f.next_probe and now < f.flush_at:
                                    losses.clear()
                                    f.call = None
                                    decayed = high * LOSS_DECAY
                                    f.high = m if m > decayed else decayed
                                    f.n = n
                                    f.last = now
                                    f.durations.append(duration)
                                    f.values.append(v)
                                    me.step += 1
                                    return
                    if f.armed or f.durations:
                        me._fast_off()
                except Exception as exc:  # a bug of ours: switch off, never fail the step (as _pre_step)
                    me._disable(exc)
                    return None
            return pre_step(opt, args, kwargs)

        return step_pre_hook

    def _arm_fast(self, st: _OptState) -> None:
        """After a sampled-out step with one CPU loss: arm the fast path when the next steps need no
        more than it does (one optimizer, steady sampling, nothing waiting)."""
        s = self._sampler
        span = self._span
        if (s.budget <= 0 or s.every <= 1 or s.probe_left or s.n + 1 >= s.next_probe or s.since_check < s.SPILL
                or span is None or span.optimizer != st.index or self._width != 1 or len(self._stepped) != 1
                or st.index not in self._stepped or not st.sites or not st.on_cpu or st.ref is None
                or st.loss_seen <= LOSS_JUMP_WARMUP or self.step < st.jump_quiet
                or self._observe or self._fwd_on or self._held_grads or self.broken or not self._installed
                or self._closure_step is not None or self._wake or self._paused or self._upd_start is not None
                or self._flush_due or self._force_check or self._post_handle is not None or self._amp_seen
                or self._unchecked_losses or self._late or self._last_step_time is None
                or self._sample_last != self._last_step_time or not self.config.enable_loss_tracking):
            return
        noted = self._noted
        one = len(self._loss_sites) == 1  # the script's only loss site (sites are learnt on checked steps)
        if st.ref() is None or not one and (len(noted) != 1 or noted[0][0] is None):
            return  # (its loss's site unknown: the long way, which files each loss by its caller)
        f = self._fast
        f.tid, f.ref, f.st, f.span = self._tid, st.ref, st, span
        if one:
            f.site, f.code, f.lasti = st.sites[0], None, 0
        else:
            f.site, f.code, f.lasti = noted[0][0], noted[0][1], noted[0][2]
        f.hops = self._site_hops
        f.losses = self._unchecked_losses
        f.n, f.every, f.next_probe = s.n, s.every, s.next_probe
        f.flush_at = self._last_flush + FLUSH_INTERVAL_S
        f.high, f.last = st.loss_high, self._last_step_time
        f.armed = True
        if self._wake or self._paused:  # asked for meanwhile, by another thread
            f.armed = False

    def _fast_off(self) -> None:
        """End the fast path's run: fold its steps into the span, the sampler and the optimizer's
        state, as the long way would have left them. The training thread does it at a run's end;
        another thread may too (the monitor's flush when the run is stopped): folds are serialized,
        and a step the hook was adding meanwhile loses at most its time and loss value."""
        f = self._fast
        with self._fast_lock:
            f.armed = False
            # Nothing held past the run: a loss left for the long way (it stays in _unchecked_losses)
            # holds its graph, whose AccumulateGrad nodes hold the model's weights (a k-fold's folds)
            f.losses = []
            call, f.call = f.call, None
            if call is not None and self._replay_ok and self._get_ident() == self._tid:
                # the step under way: its model call, for a replay if its read finds it bad (its
                # inputs' versions taken now, as the armed path keeps none: what the read will see)
                module, args, kwargs, amp = call
                try:
                    versions = tuple(a._version for a in (*args, *kwargs.values()) if isinstance(a, self._Tensor))
                    self._replay_log = [(module, args, kwargs, versions, amp)]
                except Exception:  # (an inference tensor has no version counter: no replay then)
                    pass
            durations, values = f.durations, f.values
            if not durations:
                return
            f.durations, f.values = [], []
            k = len(durations)
            st, span = f.st, f.span  # (kept: the hook reads neither)
            st.count += k
            st.loss_seen += k
            st.loss_high = f.high
            self._boundaries += k
            span.last_step = span.first_step + len(span.durations) + k - 1
            span.time = f.last
            span.durations.extend(durations)
            site = f.site
            span.losses.extend([(site, v) for v in values])
            s = self._sampler
            s.n += k
            s.since_check += k
            s.recent_skip.extend([d for d in durations if d > 0])  # (as _Sampler.skipped)
            self._last_step_time = self._sample_last = f.last
            self._wait = 0.0

    def _pre_step(self, opt: Any, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        """The optimizer's step pre-hook; returns its arguments with the closure wrapped, if it has one."""
        if self._get_ident() != self._tid or self.broken or self._is_compiling():
            return None
        if not self._observe and not self._held_grads and len(args) == 1 and not kwargs:
            # A sampled-out step without a closure, the common case at high step rates: straight to
            # its bookkeeping (each call and lookup costs ~3x on the toy's step, in caches its
            # kernels cooled, what it costs in a loop)
            st = self._opts.get(id(opt))
            if st is not None and st.ref() is opt:
                self._closure_step = None
                self._boundaries += 1
                try:
                    self._unchecked_step(st)
                except Exception as exc:  # pragma: no cover - as _guarded
                    self._disable(exc)
                return None
        if self._held_grads:
            if self._step_running(self._held_for):
                return None  # an optimizer stepped by the skipped one (ZeRO, a wrapper): part of that step
            self._give_grads_back()  # (the skipped step's post-step hook did not run: it raised)
        self._closure_step = None  # (one that raised: its boundary never came)
        self._boundaries += 1
        in_args = len(args) > 1 and args[1] is not None  # (args[0]: opt)
        if in_args or kwargs and kwargs.get("closure") is not None:
            # optimizer.step(closure) (LBFGS, and every step Lightning makes): the step's backward runs
            # inside it. Read before it, each step's losses and gradients went to the next one. So the
            # closure is wrapped: its first call's end, before the update, is the boundary (a
            # non-finite step can be skipped there: under Lightning none was, and the NaN's module
            # was said to have non-finite weights, read after the update). LBFGS calls it again and
            # again, updating in between: its boundary stays after the step, as for an optimizer
            # that never calls it.
            self._closure_step = opt
            self._set_post_hook(True)
            if isinstance(opt, self._LBFGS):
                return None
            closure = args[1] if in_args else kwargs["closure"]
            wrapped = self._wrap_closure(opt, closure)
            if in_args:
                return (args[0], wrapped, *args[2:]), kwargs
            return args, {**kwargs, "closure": wrapped}
        self._boundary(opt)
        return None

    def _wrap_closure(self, opt: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        me = self

        # torch's optimizers call it once and then skip parameters with no gradient; another's (SAM) may
        # read p.grad after it and crash on a None: read there, but not skipped
        own = type(opt).__module__.startswith("torch.optim")

        def closure_then_boundary() -> Any:
            result = closure()
            if me._closure_step is opt and me._get_ident() == me._tid and not me.broken:
                me._closure_step = None  # (an optimizer that calls it again, as SAM does: one boundary a step)
                if own:
                    me._guarded(me._boundary, opt)
                else:
                    me._closure_read = True  # (no skipping: the optimizer is still using its gradients)
                    try:
                        me._guarded(me._boundary, opt)
                    finally:
                        me._closure_read = False
            return result

        return closure_then_boundary

    def _boundary(self, opt: Any) -> None:
        """An optimizer's step boundary: the step that ends here read (checked) or counted."""
        if not self._observe:
            st = self._opts.get(id(opt))
            if st is not None and st.ref() is opt:
                try:
                    self._unchecked_step(st)
                except Exception as exc:  # pragma: no cover - as _guarded
                    self._disable(exc)
                return
        self._guarded(self._close_step, self._opt_state(opt))

    def _unchecked_step(self, st: _OptState) -> None:
        """A sampled-out step: its time, and its loss looked at on the CPU (a few microseconds); a
        GPU loss is kept for the next checked step's read (reading it now would wait for the GPU)."""
        losses = self._unchecked_losses
        deferred = None
        values: list[float] | None = None
        if losses:
            self._unchecked_losses = []
            for t in losses:
                if t.numel() != 1:
                    continue
                if not t.is_cpu:
                    if deferred is None:
                        deferred = []
                    deferred.append(t)
                    continue
                v = t.item()
                if not math.isfinite(v):
                    self._unchecked_losses = losses
                    self._close_step(st)  # a non-finite loss: check this step's gradients after all
                    return
                if values is None:
                    values = [v]
                else:
                    values.append(v)
            if values is not None:
                m = abs(values[0]) if len(values) == 1 else max(map(abs, values))
                high = st.loss_high
                decayed = high * LOSS_DECAY
                st.loss_high = m if m > decayed else decayed
                st.loss_seen += 1
                if m > LOSS_JUMP * high > 0 and st.loss_seen > LOSS_JUMP_WARMUP and self.step >= st.jump_quiet:
                    st.jump_quiet = self.step + LOSS_JUMP_QUIET
                    self._sampler.watch(LOSS_JUMP_QUIET)
                    self._unchecked_losses = losses
                    self._loss_jump = True
                    try:
                        self._close_step(st)  # a loss jump: check this step's gradients after all
                    finally:
                        self._loss_jump = False
                    return
        if len(self._stepped) == 1 and st.index in self._stepped:  # (_advance for one optimizer, inline)
            self.step += 1
            st.count += 1
        else:
            self._advance(st)
        if self._replay_log:  # (a finite step: nothing to replay)
            self._replay_log = []
        self._replay_full = False
        self._replay_bytes = 0
        if deferred is not None:
            self._defer_losses(st, deferred)
        now = time.perf_counter()
        last = self._last_step_time
        duration = 0.0 if last is None else now - last
        self._last_step_time = now
        self._wait = 0.0
        span = self._span
        if span is not None and span.optimizer == st.index and duration <= SPAN_BREAK_S:
            span.last_step = self.step
            span.time = now
            span.durations.append(duration)
        elif duration > SPAN_BREAK_S:
            self._span = span = None
            self._pending.append(StepRecord(self.step, now, duration, st.index, self._sited(st, values or []), None,
                                            None, 0.0, checked=False))
        else:
            self._span = span = StepSpan(self.step, self.step, now, st.index, [duration])
            self._pending.append(span)
        if values is not None and span is not None:
            # the CPU losses read above, for the report's counts and extremes
            span.losses.extend(self._sited(st, values))
        if now - self._last_flush >= FLUSH_INTERVAL_S:
            self._slice_over(now, duration)
        self._sample(False, st, now)
        if values is not None and len(values) == 1 and deferred is None and not self._observe:
            self._arm_fast(st)

    def _advance(self, st: _OptState) -> None:
        """Count the run's step. An iteration ends when an optimizer that already stepped in it steps
        again: a GAN's D and G steps are one step, its critic's five steps five (as counting the
        most-stepped optimizer would). An optimizer first stepping after the run's first iteration
        starts a new one: a new fold's, a sweep's or a fine-tuning stage's optimizer continues the count
        (the most-stepped optimizer's count stalled at the first fold's last step for every later fold)."""
        stepped = self._stepped
        index = st.index
        if index in stepped or not stepped or (st.count == 0 and (self.step > 1 or self._any_freed(stepped))):
            self.step += 1
            self._width = len(stepped) or 1
            self._iter_last = self._last_stepper
            stepped.clear()
        stepped.add(index)
        self._last_stepper = index
        st.count += 1

    def _any_freed(self, indices: set[int]) -> bool:
        """Whether an optimizer of these has been freed: a new one made after it is its successor (a
        script that makes an optimizer per step), not its partner in a GAN's first iteration."""
        live = {st.index for st in self._opts.values() if st.ref() is not None}
        live.add(-1)  # the backward-per-step stand-in of the first iteration (see _step_without_optimizer)
        return not indices <= live

    def _note_site(self, getframe: Callable[[int], Any]) -> None:
        """The site of a sampled-out step's loss, by its caller's line (called from the backward
        wrapper: its caller is ``_site_hops`` + 2 frames up from here)."""
        try:
            caller = getframe(self._site_hops + 2)
        except ValueError:
            self._unchecked_sites.append((None, None, 0))
            return
        key = (caller.f_code, caller.f_lasti)
        self._unchecked_sites.append((self._loss_sites.get(key), caller.f_code, caller.f_lasti))

    def _sited(self, st: _OptState, values: list[float]) -> list[tuple[int, float]]:
        """A sampled-out step's loss values, named by the site each backward was called from when this
        step's were noted one by one (losses taking turns at one optimizer were filed under the first's),
        else by the sites of this optimizer's last checked step (as a GPU loss kept for later is), else
        the last site seen."""
        noted = self._unchecked_sites
        if len(noted) == len(values) and all(n[0] is not None for n in noted):
            return [(n[0], v) for n, v in zip(noted, values)]
        sites = st.sites
        fallback = self._last_site if self._last_site is not None else 0
        return [(sites[i] if i < len(sites) else fallback, v) for i, v in enumerate(values)]

    def _defer_losses(self, st: _OptState, losses: list[Any]) -> None:
        """Keep a sampled-out step's GPU losses for the next checked step's read, named by the sites
        its optimizer's last checked step had (no frame walk on this path); too many force a check."""
        sites = st.sites
        step = self.step
        fallback = self._last_site if self._last_site is not None else 0
        late = self._late
        for i, t in enumerate(losses):
            t = t.detach()  # (a 0-d loss, the usual one, needs no reshape: one dispatch fewer a step)
            late.append((step, sites[i] if i < len(sites) else fallback, t if t.dim() == 0 else t.reshape(())))
        if len(late) >= LATE_MAX:
            self._force_check = True

    def _post_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        if threading.get_ident() != self._tid or self.broken:
            return
        self._step_end = time.perf_counter()
        self.wake = False  # before draining: a request made meanwhile wakes the next step
        if self._held_grads and opt is self._held_for:
            self._give_grads_back()
        if self._upd_start is not None:
            st = self._opts.get(id(opt))
            if st is not None:
                self._guarded(self._finish_update_ratio, st.index)
        if self._closure_step is opt:
            self._closure_step = None
            self._closure_read = True  # (no skipping: the optimizer has stepped)
            try:
                self._boundary(opt)
            finally:
                self._closure_read = False
            self._step_end = time.perf_counter()
        actions = self.actions
        pending = actions is not None and not actions.empty()
        if (pending or self.paused) and self._width > 1:
            st = self._opts.get(id(opt))
            if st is not None and st.index != self._iter_last:
                # Mid-iteration (a GAN's D has stepped, G's backward is still to come through a graph
                # that holds G's weights): a rollback's in-place load then broke that backward, and a
                # pause let one in. Actions and pauses wait for the iteration's last optimizer.
                self.wake = True
                if self.on_step_end is not None:
                    self._guarded(self.on_step_end)
                return
        if pending:
            while not actions.empty():
                action = actions.get_nowait()
                try:
                    action()
                except Exception as exc:  # a failed action is reported, never raised into training
                    self._pending.append(FindingEvent(
                        severity="warning", category="system_error", step=self.step, key=f"action|{exc}",
                        message=f"a recovery action failed: {type(exc).__name__}: {exc}", context={}))
                    self.flush()
        if self.on_step_end is not None:
            self._guarded(self.on_step_end)
        if self.paused:
            self._wait_while_paused()

    @staticmethod
    def _step_running(opt: Any) -> bool:
        """Whether ``opt.step`` is on this thread's stack (torch's step wrapper, whose ``self`` it is)."""
        if opt is None:
            return False
        code = getattr(type(opt).step, "__code__", None)
        frame = sys._getframe(2)
        for _ in range(64):
            if frame is None:
                return False
            if frame.f_code is code and frame.f_locals.get("self") is opt:
                return True
            frame = frame.f_back
        return False

    def _give_grads_back(self) -> None:
        """The gradients a skipped step held back (see _skip_step), once the optimizer has stepped."""
        held, self._held_grads = self._held_grads, []
        self._held_for = None  # (not kept alive: a fold's optimizer)
        for p, g in held:
            if p.grad is None:
                p.grad = g

    def _wait_while_paused(self) -> None:
        """Pause at a step boundary: the training thread waits here until resumed (state kept)."""
        self.flush()
        self.pause_held = True
        try:
            self._paused_loop()
        except KeyboardInterrupt:
            # raised anew from here: the traceback the script's user sees ends at this (trimmed) frame,
            # not in threading's wait
            raise KeyboardInterrupt() from None
        finally:
            self.pause_held = False
        self._last_step_time = time.perf_counter()  # the pause is not step time

    def exclude_wait(self, seconds: float) -> None:
        """Time the training thread spent waiting for the user mid-step (the script reading its input
        under the UI, a pdb prompt): not the step's, as a pause is not (no "slow step" for it). Another
        thread's wait (a "press Enter to stop" reader) is no step's business."""
        if threading.get_ident() != self._tid:
            return
        self._fast_off()
        if self._last_step_time is not None:
            self._last_step_time += seconds
        if self._sample_last is not None:
            self._sample_last += seconds
        if self._step_end is not None:
            self._step_end += seconds

    def _paused_loop(self) -> None:
        while self.paused:
            self.resume_event.wait(0.2)
            actions = self.actions
            while actions is not None and not actions.empty():  # e.g. lower LR while paused
                try:
                    actions.get_nowait()()
                except Exception:
                    pass
                self.flush()

    def _watch_optimizers(self, optimizer_type: type) -> None:
        """Keep the optimizers the script makes (weakly): every torch optimizer's ``__init__`` calls
        ``_patch_step_function``, whose wrapper notes it."""
        orig = optimizer_type.__dict__.get("_patch_step_function")
        if orig is None or self._orig_patch_step is not None:
            return
        made = self._made_optimizers

        def _patch_step_function(opt: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                made.add(opt)
            except TypeError:  # an optimizer class that is not hashable: the fallback of _optimizer_made
                pass
            return orig(opt, *args, **kwargs)

        self._orig_patch_step = orig
        optimizer_type._patch_step_function = _patch_step_function  # type: ignore[attr-defined]

    def _optimizer_made(self) -> bool:
        """Whether the script has an optimizer: one it made since the instrumentation was installed,
        still alive; else (the method above gone from torch) any made in this process, which marks its
        class's ``step`` as ``hooked`` (torch.optim.Optimizer._patch_step_function)."""
        if self._orig_patch_step is not None:
            return len(self._made_optimizers) > 0
        if self._optimizer_seen:
            return True
        todo = [self._optim_module.Optimizer]
        while todo:
            cls = todo.pop()
            if getattr(cls.__dict__.get("step"), "hooked", False):
                self._optimizer_seen = True
                return True
            todo.extend(cls.__subclasses__())
        return False

    def _step_without_optimizer(self) -> None:
        """Scripts that update parameters by hand: each backward is a step."""
        if self._pseudo is None:
            self._pseudo = _OptState(index=-1, ref=None, params=[])
        st = self._pseudo
        if st.generation != self._generation:
            params = []
            for _, ref in self._roots.values():
                root = ref()
                if root is not None:
                    params.extend(p for p in root.parameters() if p.requires_grad)
            st.params, st.n_params = params, len(params)
            st.generation = -1
        self._close_step(st)

    def _grad_layout(self, st: _OptState) -> list[list[Any]]:
        params = st.params
        grads = [p.grad for p in params]  # each .grad is a lookup in C: once
        present = [i for i, g in enumerate(grads) if g is not None]
        if present != st.present or st.generation != self._generation:
            groups: dict[tuple[Any, Any], list[int]] = {}
            for i in present:
                g = grads[i]
                groups.setdefault((g.device, g.dtype), []).append(i)
            st.sparse = any(grads[i].is_sparse for i in present)
            st.present = present
            st.groups = list(groups.values())
            st.dtypes = [dtype for _, dtype in groups]
            st.devices = [device for device, _ in groups]
            st.on_cpu = not st.devices or st.devices[0].type == "cpu"
            names = []
            for idxs in st.groups:
                for i in idxs:
                    name = self._param_names.get(id(params[i]))
                    if name is None:
                        name = f"optimizer{st.index}.param{i}"
                        if len(self._unnamed_params) < 100_000:
                            self._unnamed_params.add(id(params[i]))  # its model is named when it runs
                    names.append(name)
            st.names = names
            st.generation = self._generation
        layout = [[grads[i] for i in idxs] for idxs in st.groups]
        if st.sparse:
            self._sparse_grads = {}
            for group in layout:
                for k, g in enumerate(group):
                    if g.is_sparse:
                        # the norm of its values, summed per index first (an Embedding's gradient repeats
                        # the indices a batch repeats); a NaN in it was missed, and the step not skipped
                        group[k] = v = (g if g.is_coalesced() else g.coalesce())._values()
                        self._sparse_grads[id(v)] = g
        return layout

    def _close_step(self, st: _OptState) -> None:
        """The step boundary: read the step, then let the sampler decide whether the next is checked.

        The sampler's clock runs from the end of one boundary to the end of the next, so that the
        cost of reading a checked step is charged to that step."""
        observed = self._observe
        fwd_s = self._hook_s  # (the module hooks' alone)
        t0 = time.perf_counter()
        self._read_step(st)
        self._hook_s += time.perf_counter() - t0
        self._sample(observed, st, fwd_s=fwd_s)

    def _sample(self, observed: bool, st: _OptState, end: float | None = None, fwd_s: float = 0.0) -> None:
        """``end``: the boundary's clock, when the step's bookkeeping is too light to charge it."""
        self._noted, self._unchecked_sites = self._unchecked_sites, []  # (the closed step's: _arm_fast reads them)
        if end is None:
            end = time.perf_counter()
        last, self._sample_last = self._sample_last, end
        sampler = self._sampler
        sampler.optimizers = self._width
        self.observed_last = observed
        if not st.on_cpu and sampler.timed() and st.devices[0].type == "cuda":
            self._gpu_mark(observed, st)
        duration = 0.0 if last is None else end - last
        hook_s, self._hook_s = self._hook_s, 0.0
        observe = sampler.next(observed, duration, hook_s) if observed else sampler.skipped(duration)
        if self._force_check:
            self._force_check = False
            observe = True
        self._observe = observe
        fwd = observe
        if observe and st.on_cpu:
            fwd = sampler.forward_next(observed and self._fwd_on, duration, fwd_s)
        if fwd is not self._fwd_on:
            self._set_forward_hooks(fwd)
        # a forward not observed keeps its model calls for a replay, should the step go bad (see _replay)
        self._replay_rec = not fwd and st.on_cpu and self._replay_ok
        if self._stats_due and fwd:  # (activation statistics need an observed forward)
            self._stats_due = False
            self._stats_now = True
        else:
            self._stats_now = False
        # This step's post-step hook: for a checked step (update ratio), before a checked one (the
        # data-wait clock starts there), and for pending actions or a pause.
        post = observed or observe or self._wake or self._paused or self._upd_start is not None
        if post is not (self._post_handle is not None):
            self._set_post_hook(post)

    def _gpu_mark(self, observed: bool, st: _OptState) -> None:
        """A timing event at this step's boundary on its GPU's stream (only in a probe's window)."""
        torch = self.torch
        try:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(st.devices[0]))
        except RuntimeError:  # a CUDA error of the script's: the sampler goes by the host's clock
            return
        marks = self._gpu_marks
        if marks and marks[-1][0] != self._sampler.n:  # a window with no probe after it (slow steps): stale
            marks.clear()
        marks.append((self._sampler.n + 1, observed, event, st.devices[0]))
        if len(marks) > 8 * _Sampler.PROBE + 2:  # a probe: up to 2 x PROBE x 4 steps (see probe_run)
            del marks[0]

    def _gpu_durations(self) -> tuple[list[float], list[float]]:
        """GPU times of the window's steps, checked and unchecked: one wait, for its last event."""
        marks, self._gpu_marks = self._gpu_marks, []
        checked: list[float] = []
        unchecked: list[float] = []
        if len(marks) < 2:
            return checked, unchecked
        try:
            marks[-1][2].synchronize()
            for (n0, _, e0, d0), (n1, obs, e1, d1) in zip(marks, marks[1:]):
                if n1 == n0 + 1 and d0 == d1:
                    (checked if obs else unchecked).append(e0.elapsed_time(e1) / 1e3)
        except RuntimeError:  # e.g. the script's own kernel failed: its next sync will say so; use the host's clock
            return [], []
        return checked, unchecked

    def _set_post_hook(self, on: bool) -> None:
        if self._closure_read:
            return  # running in the post-step hooks: torch iterates them (and the next step sets it)
        if on and self._post_handle is None and self._installed:
            self._post_handle = self._optim_module.register_optimizer_step_post_hook(self._post_step)
        elif not on and self._post_handle is not None:
            self._post_handle.remove()
            self._post_handle = None
            self._step_end = None

    def _read_step(self, st: _OptState) -> None:
        """One stacked read of losses, sentinels and gradient norms."""
        torch = self.torch
        self._stack.clear()
        self._span = None
        self._advance(st)
        now = time.perf_counter()
        last = self._last_step_time
        duration = 0.0 if last is None else now - last
        self._last_step_time = now
        observed = self._observe
        self._read_fwd = observed and self._fwd_on
        self._fwd_observed_steps += self._read_fwd
        wait, self._wait = self._wait, 0.0
        if not observed:  # a sampled-out step: timing only, and the loss looked at on the CPU
            unchecked, self._unchecked_losses = self._unchecked_losses, []
            noted = self._unchecked_sites
            noted_site = {id(t): n[0] for t, n in zip(unchecked, noted)} if len(noted) == len(unchecked) else {}
            unchecked = [t for t in unchecked if t.numel() == 1]
            on_device = [t for t in unchecked if not t.is_cpu]
            if on_device:
                self._defer_losses(st, on_device)
            on_cpu = [t for t in unchecked if t.is_cpu]
            values = [t.item() for t in on_cpu]
            bad = [t for t, v in zip(on_cpu, values) if not math.isfinite(v)]
            if self._loss_jump and not bad:
                # a finite loss jump: this step's gradients are read, as a checked step's (not skipped)
                if not self._loss_site_names:
                    self._new_loss_site((None, 0), None)
                self._losses = [(site, t.detach().float().reshape(()))
                                for (site, _), t in zip(self._sited(st, values), on_cpu)]
            elif not bad:
                # (its CPU losses count, as a span's do: a new optimizer's first step comes here)
                self._pending.append(StepRecord(self.step, now, duration, st.index, self._sited(st, values), None,
                                                None, wait, checked=False))
                if self._replay_log:
                    self._replay_log = []
                self._replay_full = False
                self._replay_bytes = 0
                if now - self._last_flush >= FLUSH_INTERVAL_S:
                    self._slice_over(now, duration)
                return
            else:
                # A non-finite loss on an unchecked step: check this step's gradients now (and skip it).
                # Its forward was not observed: the next checked step names the module, and says so.
                self._sampler.alarm()
                self._unobserved_bad = self.step
                site = self._last_site if self._last_site is not None else 0
                if not self._loss_site_names:
                    self._new_loss_site((None, 0), None)
                self._losses = [(noted_site.get(id(t)) if noted_site.get(id(t)) is not None else site,
                                 t.detach().float().reshape(())) for t in bad]
        if self._hot_pending is not None:
            self._resolve_hot()
        if self._deferred:
            self._flush_deferred()
        losses = self._losses
        flat: list[Any] = [v for _, v in losses]
        tail = self._acts  # last partial chunk of activations
        if tail:
            self._mark_stale(tail)
        sent = self._sent
        n_chunked = len(sent)
        n_sent = n_chunked + len(tail)
        flat.extend(sent)
        grad_names: list[str] | None = None
        groups = self._grad_layout(st) if self._track_grads else []
        if self._mode_sensitive and st.index >= 0:
            self._guarded(self._check_train_mode, st)
        if st.present or st.index < 0 or not losses or not self._track_grads:
            if st.gradless >= 3 and st.present:  # said, and no longer so (a head trained alone first)
                self._pending.append(Resolved(f"gradless|{st.index}", self.step))
            st.gradless = 0
        else:
            self._guarded(self._gradless_step, st)
        if groups:
            sampler = self._sampler
            sampler.fast_s = sampler.FAST_S if st.on_cpu else sampler.FAST_S_GPU
        # For an inf sentinel (a real inf, or an L2 overflow above ~1e19) the exact check needs the tensor:
        # weak references to the reduced ones, strong ones to the last chunk.
        recheck: list[Any] = self._refs[:n_chunked] + tail
        for k in self._inf_kept:
            recheck[k] = self._inf_marker
        merged = 0
        if tail:
            f32 = self._float32
            dev = st.devices[0] if groups else None
            if groups and st.dtypes[0] is f32 and all(a.dtype is f32 and a.device == dev for a in tail):
                groups[0] = tail + groups[0]  # the tail shares the first gradient group's call
                merged = len(tail)
            else:
                flat.extend(self._norms(tail))
        if groups:
            f32 = self._float32
            for grads, dtype in zip(groups, st.dtypes):
                # float32 needs no dtype argument (the fast path); half types accumulate in float32
                flat.extend(torch._foreach_norm(grads, 2) if dtype is f32 else foreach_norm(torch, grads, False))
            grad_names = st.names
        n_grads = len(grad_names) if grad_names is not None else 0
        # Sampled extras ride on the same read: activation statistics, last sampled update ratios.
        extras: list[tuple[str, str, int]] = []
        if self._stat_meta:
            flat.extend(self._stat_vals)
            extras = self._stat_meta
            self._stat_meta, self._stat_vals = [], []
        upd_names: list[str] = []
        if self._upd_done is not None:
            upd_names, tensors = self._upd_done
            flat.extend(tensors)
            self._upd_done = None
        late_meta: list[tuple[int, int]] = []
        if self._late:  # last: the sampled-out steps' losses
            late_meta = [(step, site) for step, site, _ in self._late]
            flat.extend(t for _, _, t in self._late)
            self._late = []
        sites = [s for s, _ in losses]
        if sites:
            st.sites = sites
        read = (self.step, now, duration, st.index, sites, self._calls, self._root_inputs,
                n_chunked, n_sent, self._stale, grad_names, recheck, wait, n_grads, extras, upd_names, late_meta,
                self._virtual, self._alias)
        self._observed_steps += 1
        every = self.config.activation_stats_every
        if every > 0 and self._observed_steps % every == 0:
            self._stats_due = True  # for the next step whose forward is observed (see _sample)
        every = self.config.update_ratio_every
        if every > 0 and self._observed_steps % every == 0 and groups and st.index >= 0:
            self._start_update_ratio(st)
        bn_step = self._bn_step
        if self._sent_overflow and not self._overflow_said:
            self._overflow_said = True
            self._pending.append(FindingEvent(
                severity="warning", category="system_error", step=self.step, key="sentinels-capped",
                message=f"{self._sent_overflow} module outputs of step {self.step} were not checked: the step made more "
                        f"than max_sentinels_per_step={self._max_sent}; a NaN made there is caught by the loss and "
                        "gradients, but its module is not named",
                context={"unchecked_outputs": self._sent_overflow, "max_sentinels_per_step": self._max_sent},
                recommendation=f"Raise max_sentinels_per_step (in a --config file or [tool.tui_debug]) above the "
                               f"step's {self._max_sent + self._sent_overflow} module outputs."))
        self._sent_overflow = 0
        self._clear_step()
        if not flat:
            self._process(read, [])
        else:
            if all(t.is_cpu for t in flat):
                stacked = None  # nothing to wait for: item() each (cheaper than stack + tolist)
            else:
                try:
                    stacked = torch.stack(flat)
                except RuntimeError:  # tensors on several devices: one read per device, in order
                    stacked = torch.cat([t.reshape(1).to("cpu") for t in flat])
            if stacked is not None and stacked.is_cuda:
                key = (stacked.shape[0], stacked.dtype, stacked.device)
                pool = self._pinned.get(key)
                if pool:
                    host, event = pool.pop()
                else:
                    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
                    event = torch.cuda.Event()
                host.copy_(stacked, non_blocking=True)
                event.record()
                self._reads.append((read, host, event, key))
            else:
                self._immediate = True
                try:
                    self._process(read, [t.item() for t in flat] if stacked is None else stacked.tolist())
                finally:
                    self._immediate = False
                if bn_step and self.last_step_finite:
                    if len(self._bn_finite) > 4096:  # models made and dropped over a long run: forget them
                        self._bn_finite = {}
                    weakref_ = self._weakref
                    for bn, versions in bn_step:
                        self._bn_finite[id(bn)] = (weakref_(bn), versions)
                if self._skip_now:
                    self._skip_step(st)
                elif self.clip_norm is not None and groups:
                    self._clip(groups, merged)
        if self._replay_log:  # (not replayed: the step was finite)
            self._replay_log = []
        self._replay_full = False
        self._replay_bytes = 0
        if self.clip_norm is not None and self._reads and groups:  # CUDA: values are a step late
            params = [p for p in st.params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        if self._reads:
            self._drain_reads(block=False)
        if self._pending and now - self._last_flush >= FLUSH_INTERVAL_S:
            self._slice_over(now, duration)

    def _clear_step(self) -> None:
        """Forget what this step's forward and backward queued (after its read, or a skipped iteration)."""
        self._losses = []
        self._last_in = None
        self._forwards_unread = 0
        self._acts = []
        self._acts_cuda_elems = 0
        self._hot_pending = None
        self._bn_fill = None
        self._deferred = {}
        self._implies = {}
        self._hot_mod = {}
        self._hot_calls = {}
        self._inf_kept = set()
        self._light = []
        self._sent = []
        self._n_sent = 0
        self._ver = []
        self._refs = []
        self._stale = set()
        self._sent_ids = {}
        self._derived = {}
        self._nodes = {}
        self._virtual = []
        self._alias = []
        self._bn_step = []
        self._bn_queued = set()
        self._calls = []
        self._root_inputs = []

    def _scaler_skipped(self) -> None:
        """A GradScaler skipped the optimizer step (its scaled gradients were non-finite, as it expects
        while it calibrates): the iteration is no step, and its losses and activations must not be
        taken for the next step's."""
        self.scaler_skips += 1
        self._skips_unsent += 1
        self._clear_step()
        self._replay_log = []
        self._replay_bytes = 0
        self._unchecked_losses = []
        self._unchecked_sites = []
        self._stack.clear()
        if time.perf_counter() - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def _skip_step(self, st: _OptState) -> None:
        """Leave the parameters untouched, as GradScaler does: an optimizer ignores parameters with no
        gradient, so they have none during its step and get theirs back after it (a script that logs
        ``p.grad`` after ``optimizer.step()`` found None there and crashed)."""
        self._skip_now = False
        self._upd_start = None  # a skipped step has no update to measure
        held = self._held_grads
        self._held_for = st.ref() if st.ref is not None else None
        for p in st.params:
            g = p.grad
            if g is not None:
                held.append((p, g))
                p.grad = None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips == STUCK_SKIPS and not self._amp_seen:
            # Every step skipped for a while: the parameters are safe, but training has stopped (the
            # state itself is poisoned: optimizer moments, BatchNorm statistics, or the rate too high)
            self._pending.append(FindingEvent(
                severity="error", category="optimization_error", step=self.step, key="stuck-skipping",
                message=f"training has stopped: the last {STUCK_SKIPS} optimizer steps were all skipped (their "
                        "gradients were non-finite), so the parameters no longer change",
                context={"consecutive_skips": STUCK_SKIPS, "skipped_steps": self.skipped_steps},
                recommendation="Roll back to the last good snapshot and lower the learning rate (b, then l, in "
                               "the UI; --recover auto does both), or restart from a checkpoint with a lower "
                               "rate or gradient clipping."))
        if self.on_skip is not None:
            self._guarded(self.on_skip, self.consecutive_skips)

    def _mark_stale(self, acts: list[Any]) -> None:
        first = len(self._sent)
        ver = self._ver
        for i, t in enumerate(acts):
            if t._version != ver[first + i]:
                self._stale.add(first + i)

    def _drain_reads(self, block: bool) -> None:
        while self._reads:
            read, host, event, key = self._reads[0]
            if not block and not event.query():
                return
            event.synchronize()
            self._reads.pop(0)
            values = host.tolist()
            pool = self._pinned.setdefault(key, [])
            if len(pool) < PINNED_POOL:
                pool.append((host, event))  # read: free to take the next copy
            if len(self._pinned) > 16:  # read sizes keep changing: keep no stale buffers
                self._pinned.clear()
            self._process(read, values)

    def _process(self, read: tuple[Any, ...], values: list[float]) -> None:
        (step, now, duration, opt_index, loss_sites, calls, root_inputs, n_chunked, n_sent, stale,
         grad_names, recheck, wait, n_grads, extras, upd_names, late_meta, _virtual, _alias) = read
        nl = len(loss_sites)
        grad_norms = None
        g0 = nl + n_sent
        if grad_names is not None:
            grad_norms = values[g0:g0 + n_grads]
        losses = list(zip(loss_sites, values))
        rec = StepRecord(step, now, duration, opt_index, losses, grad_names, grad_norms, wait)
        i = g0 + n_grads
        if extras:
            rec.act_stats = [(label, kind, n, v) for (label, kind, n), v in zip(extras, values[i:i + len(extras)])]
            i += len(extras)
        if upd_names:
            k = len(upd_names)
            deltas, weights = values[i:i + k], values[i + k:i + 2 * k]
            rec.update_ratios = [(n, d / w) for n, d, w in zip(upd_names, deltas, weights) if w > 0]
            i += 2 * k
        if late_meta:
            rec.late_losses = [(s, site, v) for (s, site), v in zip(late_meta, values[i:])]
            for s, site, v in rec.late_losses:
                if not math.isfinite(v):
                    self._late_nonfinite(s, site, v, step)
                    if self._unobserved_bad is None:
                        self._unobserved_bad = s  # this checked step may name the module (see _read_step)
        self._pending.append(rec)
        if grad_norms:
            self.recent_total_norms.append(math.hypot(*grad_norms))
        self.last_step_finite = not values or math.isfinite(sum(values))
        if self.last_step_finite:
            self.consecutive_skips = 0
        else:
            self._sampler.alarm()
            self._observe = True  # the next step too, whatever the sampler had decided
            self._set_forward_hooks(True)
            replayed = finite = False
            if not self._read_fwd and self._immediate:
                result = self._guarded(self._replay, read, values)
                finite = result is REPLAY_FINITE
                if result is not None and not finite:
                    read, values = result  # type: ignore[misc]
                    replayed = True
                    if self._unobserved_bad == step:
                        self._unobserved_bad = None
                elif self._unobserved_bad is None:
                    self._unobserved_bad = step  # (a read step whose forward was not observed)
            self._guarded(self._check_nonfinite, read, values, replayed, finite)
        if self._unobserved_bad is not None and step > self._unobserved_bad:
            self._unobserved_bad = None  # only the first checked step after it is about it

    def _record_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """A model's call in a training forward that is not observed: kept, with its inputs, until the
        step's read (see _replay). Cleared at every boundary. Whether it was kept."""
        if not self._is_grad_enabled() or isinstance(module, self._Loss) or self._replay_full:
            return False  # (an evaluation pass: not the step's; a loss module's input is the model's output)
        if self._OptimizedModule and isinstance(module, self._OptimizedModule):
            return False  # (compiled: its replay would compile again)
        if next(module.parameters(), None) is None:
            return False  # (no parameters: a transform applied per sample, not a model)
        log = self._replay_log
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, self._Tensor)]
        try:
            versions = tuple(a._version for a in tensors)
        except RuntimeError:  # an inference tensor (no version counter): its changes cannot be told
            versions = None
        if log:
            self._replay_bytes += sum(a.numel() * a.element_size() for a in tensors)
        if versions is None or len(log) >= REPLAY_MAX or self._replay_bytes > REPLAY_BYTES:
            self._replay_full = True
            self._replay_log = []  # (what they held goes now)
            return False
        log.append((module, args, kwargs, versions, self._amp_dtype() if self._amp_on() else None))
        return True

    def _replay(self, read: tuple[Any, ...], values: list[float]) -> tuple[tuple[Any, ...], list[float]] | object | None:
        """A step gone non-finite whose forward was not observed: its model calls run again, observed,
        on the same inputs and the same weights (the read comes before the optimizer's update), so
        that the first module to make a non-finite value is named on this step as if it had been
        observed. Under no_grad (no second graph) and the call's CPU autocast, with the random number
        generators' states (torch's, Python's, numpy's) and the models' buffers (BatchNorm's statistics,
        reassigned or changed in place) put back after: the run goes on as it would have. Dropout
        draws other masks than the step did; a NaN that depends on them may not come back. Returns
        the read and values with the replay's sentinels, REPLAY_FINITE when it made nothing
        non-finite, or None when there was no replay."""
        log, self._replay_log = self._replay_log, []
        full, self._replay_full = self._replay_full, False
        self._replay_bytes = 0
        if (not log or full or self._closure_read or not self._immediate or read[8] or read[3] < 0
                or distributed.world_size() > 1):
            # (LBFGS's boundary, and a script stepping by hand, read after the update; a replay on one
            # rank alone: see _Sampler._forward_decide)
            return None
        tensor = self._Tensor
        calls = []
        for module, args, kwargs, versions, amp in log:
            if tuple(a._version for a in (*args, *kwargs.values()) if isinstance(a, tensor)) != versions:
                return None  # an input changed in place since the call: not what the forward saw
            calls.append((module, args, kwargs, amp))
        torch = self.torch
        models = list({id(m): m for m, _, _, _ in calls}.values())
        held = [(sub, name, b) for m in models for sub in m.modules() for name, b in sub._buffers.items()
                if b is not None]
        if any(not b.is_cpu for _, _, b in held) or any(not p.is_cpu for m in models for p in m.parameters()):
            return None
        saved_buffers = [(sub, name, b, b.detach().clone()) for sub, name, b in held]
        rngs = [(torch.set_rng_state, torch.get_rng_state()), (random.setstate, random.getstate())]
        np_random = sys.modules.get("numpy.random")
        if np_random is not None and hasattr(np_random, "get_state"):
            rngs.append((np_random.set_state, np_random.get_state()))
        saved = (self._observe, self._fwd_on, self._stats_now, self._wait, self._step_end, self._root_out,
                 self._forwards_unread, self._last_in, self._replay_rec, self._hook_s)
        stack = list(self._stack)
        grad_enabled = self._is_grad_enabled
        self._clear_step()
        self._observe = self._fwd_on = True
        self._stats_now = self._replay_rec = False
        self._is_grad_enabled = _always  # the hooks observe training forwards only: this is one
        self._stack.clear()
        outputs = []  # held to the end, as the step held its own (see UNREAD_FORWARDS)
        # what the forward warns about the second time is not the script's (torch.utils.checkpoint under
        # no_grad: no input requires grad); other threads' warnings still show
        attr = "_showwarnmsg" if callable(getattr(warnings, "_showwarnmsg", None)) else "showwarning"
        shown = getattr(warnings, attr)
        tid = self._tid

        def quiet(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != tid:
                return shown(*args, **kwargs)
            return None

        setattr(warnings, attr, quiet)
        raised = False
        try:
            with torch.no_grad():
                for module, args, kwargs, amp in calls:
                    try:
                        if amp is None:
                            outputs.append(module(*args, **kwargs))
                        else:
                            with torch.autocast("cpu", dtype=amp):
                                outputs.append(module(*args, **kwargs))
                    except Exception:  # (state the forward changed the first time): what ran is kept
                        raised = True
                        break
                    finally:
                        self._stack.clear()
            if self._hot_pending is not None:
                self._resolve_hot()
            if self._deferred:
                self._flush_deferred()
            tail = self._acts
            if tail:
                self._mark_stale(tail)
            sent = list(self._sent)
            n_chunked = len(sent)
            if tail:
                sent.extend(self._norms(tail))
            recheck: list[Any] = self._refs[:n_chunked] + tail
            for k in self._inf_kept:
                recheck[k] = self._inf_marker
            svals = [t.item() for t in sent]
            part = (self._calls, self._root_inputs, n_chunked, len(sent), self._stale, recheck, self._virtual,
                    self._alias)
        finally:
            if getattr(warnings, attr) is quiet:
                setattr(warnings, attr, shown)
            outputs.clear()
            self._is_grad_enabled = grad_enabled
            (self._observe, self._fwd_on, self._stats_now, self._wait, self._step_end, self._root_out,
             self._forwards_unread, self._last_in, self._replay_rec, self._hook_s) = saved
            self._stack[:] = stack
            self._clear_step()
            with torch.no_grad():
                for sub, name, b, copy in saved_buffers:
                    b.copy_(copy)
                    if sub._buffers.get(name) is not b:  # reassigned by the forward (self.count = self.count + 1)
                        sub._buffers[name] = b
            for set_state, state in rngs:
                set_state(state)
        if all(math.isfinite(v) for v in svals):
            # not made again by the model's modules (unless a call raised: then nothing is claimed)
            return None if raised else REPLAY_FINITE
        self.replays += 1
        (step, now, duration, opt_index, loss_sites, _c, _r, _nc, _ns, _st, grad_names, _re, wait, n_grads, extras,
         upd_names, late_meta, _v, _a) = read
        calls_, root_inputs, n_chunked, n_sent, stale, recheck, virtual, alias = part
        nl = len(loss_sites)
        return ((step, now, duration, opt_index, loss_sites, calls_, root_inputs, n_chunked, n_sent, stale,
                 grad_names, recheck, wait, n_grads, extras, upd_names, late_meta, virtual, alias),
                values[:nl] + svals + values[nl:])

    def _late_nonfinite(self, step: int, site: int, value: float, read_at: int, before_step: int = 0) -> None:
        name = self._loss_site_names[site] if site < len(self._loss_site_names) else "loss"
        kind = "nan" if value != value else ("inf" if value > 0 else "-inf")
        if before_step:
            self._pending.append(FindingEvent(
                severity="error", category="loss_error", step=step, key=f"nonfinite-loss|{name}",
                message=f"loss '{name}' is {kind} at backward {before_step}, and no optimizer has stepped yet",
                context={"loss": name, "value": kind, "backward": before_step},
                recommendation="Gradient accumulation, or parameters updated by hand: the step that follows "
                               "takes this loss's non-finite gradients."))
            return
        self._pending.append(FindingEvent(
            severity="error", category="loss_error", step=step, key=f"nonfinite-loss|{name}",
            message=f"loss '{name}' is {kind} (a sampled-out step, read at step {read_at})",
            context={"loss": name, "value": kind, "read_at_step": read_at, "sampled_out": True},
            recommendation="Sampled-out steps are checked through their loss only; with "
                           "sample_fast_steps = false every step is checked and the module is named."))

    def _clip(self, groups: list[list[Any]], merged: int) -> None:
        """Clip with the norms already read (no second pass over the gradients)."""
        total = self.recent_total_norms[-1] if self.recent_total_norms else None
        if total is None or not math.isfinite(total) or total <= self.clip_norm:  # type: ignore[operator]
            return
        coef = self.clip_norm / (total + 1e-6)  # type: ignore[operator]
        sparse = self._sparse_grads
        for i, grads in enumerate(groups):
            if i == 0 and merged:
                grads = grads[merged:]
            if sparse:  # a sparse gradient's values were a coalesced copy: scale the gradient itself
                grads = [sparse[id(g)]._values() if id(g) in sparse else g for g in grads]
            self.torch._foreach_mul_(grads, coef)  # type: ignore[union-attr]

    def _check_nonfinite(self, read: tuple[Any, ...], values: list[float], replayed: bool = False,
                         replay_finite: bool = False) -> None:
        (step, now, duration, opt_index, loss_sites, calls, root_inputs, n_chunked, n_sent, stale,
         grad_names, recheck, _wait, n_grads, _extras, _upd, _late, virtual, alias) = read
        nl = len(loss_sites)
        sentinels: list[float | None] = values[nl:nl + n_sent]
        others_finite = all(math.isfinite(v) for v in values[:nl]) and all(
            math.isfinite(v) for v in values[nl + n_sent:nl + n_sent + n_grads])
        for j, v in enumerate(sentinels):
            if v is None or (v != _INF and v != -_INF) or j in stale:
                continue
            # +-inf: a real inf, or the L2 norm / sum overflowing (values above ~1e19). Decide exactly if
            # the tensor is still alive; if not, trust it only when the loss or gradients went bad too.
            obj = recheck[j] if j < len(recheck) else None
            t = obj() if isinstance(obj, weakref.ref) else obj
            if t is not None:
                sentinels[j] = 0.0 if bool(self.torch.isfinite(t).all()) else v  # type: ignore[union-attr]
            elif others_finite:
                sentinels[j] = None
        for j in stale:
            if j < len(sentinels):
                sentinels[j] = None
        for j, parts in alias:  # a slot told by other sentinels (parts are real slots)
            vals = [sentinels[i] for i in parts]
            sentinels[j] = None if any(v is None for v in vals) else sum(vals)  # type: ignore[arg-type]
        if virtual:  # a derived sum: unknown if a part is, non-finite if a part is
            base = len(sentinels)
            for parts in virtual:
                vals = [sentinels[i] if i < VIRTUAL else sentinels[base + i - VIRTUAL] for i in parts]
                sentinels.append(None if any(v is None for v in vals) else sum(vals))  # type: ignore[arg-type]

            def real(i: int) -> int:
                return base + i - VIRTUAL if i >= VIRTUAL else i

            calls = [(m, real(i), real(o)) for m, i, o in calls]
        obs = StepObservation(
            step=step, losses=[(self._loss_site_names[s], v) for s, v in zip(loss_sites, values)],
            grad_names=grad_names or [], grad_norms=values[nl + n_sent:nl + n_sent + n_grads],
            sentinels=sentinels, calls=calls, module_label=self.module_label, root_inputs=root_inputs,
            forward_checked=self._unobserved_bad != step, replay_finite=replay_finite)
        findings = self.detector.check(obs)
        bad = self._unobserved_bad
        if bad is not None and bad < step:
            for f in findings:
                if f.category in ("model_error", "input_validation"):
                    f.message += f" (the loss first went non-finite at step {bad}, which was not checked)"
                    f.context["loss_nonfinite_since_step"] = bad
        if replayed:
            for f in findings:
                if f.category in ("model_error", "input_validation"):
                    f.message += " (found by replaying the step's forward, which was not observed: checks are sampled)"
                    f.context["replayed"] = True
        grads_bad = grad_names is not None and not all(math.isfinite(v) for v in obs.grad_norms)
        # Only an optimizer's step is skipped; a hand-written update (pseudo-step) needs its gradients.
        if grads_bad and self._immediate and self.skip_nonfinite and opt_index >= 0 and not self._closure_read:
            world = distributed.world_size()
            self._skip_now = world == 1
            for f in findings:
                if f.category == "gradient_error":
                    f.recovery_action = ("optimizer step skipped: parameters left unchanged" if world == 1
                                         else "step not skipped: " + distributed.why_not(world))
        if findings:
            self._pending.extend(findings)
            self.flush()

    def _late_slice(self) -> None:
        """A due slice still waiting after another interval (an evaluation loop, no backward)."""
        if time.perf_counter() - self._last_flush >= 2 * FLUSH_INTERVAL_S:
            self.flush()

    def _slice_over(self, now: float, duration: float) -> None:
        """A time slice of step records is due. It is handed over when the next backward starts:
        the autograd engine then runs without the GIL for most of the step, and the consumer's
        Python (~75 us a step on this VM) runs beside it instead of taking the GIL from the
        training thread between two kernels (which cost 0.5% of the bench transformer's step).
        Slow steps (a slice or longer) hand it over at once: the consumer's share of them is small.
        Without a backward, the next module call or step boundary one slice later hands it over."""
        if duration >= FLUSH_INTERVAL_S or now - self._last_flush >= 2 * FLUSH_INTERVAL_S:
            self.flush()
        else:
            self._flush_due = True

    def flush(self) -> None:
        """Hand what is pending to the bus (one batch)."""
        if self._fast.armed or self._fast.durations:
            self._fast_off()
        self._flush_due = False
        self._span = None  # handed over: the consumer may read it from now on
        if self._skips_unsent:
            self._pending.append(ScalerSkips(self._skips_unsent, self.step))
            self._skips_unsent = 0
        if self._pending:
            batch, self._pending = self._pending, []
            self._last_flush = time.perf_counter()
            self._emit(batch)

    def finish(self) -> None:
        """At the script's end: read what is outstanding and flush."""
        try:
            self._drain_reads(block=True)
        except Exception:
            pass
        try:
            self._read_late()
        except Exception:
            pass
        self.flush()

    def _read_late(self) -> None:
        """Losses of sampled-out steps that no checked step came after: read them now (blocking)."""
        late, self._late = self._late, []
        if late:
            values = self.torch.stack([t for _, _, t in late]).tolist()  # type: ignore[union-attr]
            losses = [(s, site, v) for (s, site, _), v in zip(late, values)]
            for s, site, v in losses:
                if not math.isfinite(v):
                    self._late_nonfinite(s, site, v, self.step)
            self._pending.append(LateLosses(losses))


def _always() -> bool:
    return True


def _autocast_cpu(torch: ModuleType) -> tuple[Callable[[], bool], Callable[[], Any]]:
    """Whether CPU autocast is on, and its dtype (a replay runs under it too): C-level callables, no
    Python frame (the fast path asks at every model call)."""
    try:
        torch.is_autocast_enabled("cpu")
        enabled: Callable[[], bool] = functools.partial(torch.is_autocast_enabled, "cpu")
        dtype: Callable[[], Any] = functools.partial(torch.get_autocast_dtype, "cpu")
    except (TypeError, AttributeError):  # torch before 2.4
        enabled = getattr(torch, "is_autocast_cpu_enabled", lambda: False)
        dtype = getattr(torch, "get_autocast_cpu_dtype", lambda: None)
    return enabled, dtype


def _grad_scaler_type() -> type:
    """The GradScaler class that every scaler's scale/update goes through: torch.amp's (torch >= 2.3,
    which torch.cuda.amp's subclasses), else torch.cuda.amp's (importing it starts no CUDA)."""
    try:
        from torch.amp import grad_scaler
    except ImportError:
        from torch.cuda.amp import grad_scaler  # type: ignore[no-redef]
    return grad_scaler.GradScaler


def _bn_versions(bn: Any) -> tuple[int, int, int] | None:
    """Version counters of a BatchNorm's statistics; None when a forward could change them unseen
    (a training forward updates them in place without bumping their own counters)."""
    buffers = bn._buffers
    nbt = buffers.get("num_batches_tracked")
    if nbt is None:
        return None
    return buffers["running_mean"]._version, buffers["running_var"]._version, nbt._version


def _zero_rate(group: dict[str, Any]) -> bool:
    """A parameter group frozen by a learning rate of 0 (a tensor rate is not read: it may be on a GPU)."""
    lr = group.get("lr")
    return type(lr) in (float, int) and lr == 0


def _first_tensor(value: Any, tensor_type: type) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, (type, tuple, list, dict)):  # its fields
        value = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, tensor_type):
                return v
            if isinstance(v, (tuple, list)):
                found = _first_tensor(v, tensor_type)
                if found is not None:
                    return found
        return None
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, tensor_type):
                return v
    return None
