"""Recovery actions, applied in the training thread at a step boundary (never mid-step).

Each action takes a ``TrainingState`` (the running ``Instrumentation``, which knows the script's
models and optimizers, or an API-side equivalent) and returns an ``ActionResult`` describing its effect; the result travels back to the
sinks through the event bus. The same functions serve the UI's keys, the API and automatic recovery.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import statistics
import threading
import time
import weakref
from typing import Any, Protocol

from ..classify import human_bytes, memory_context


@dataclasses.dataclass(slots=True)
class ActionResult:
    """What an action did (an event: reaches the session, the report and the sinks)."""

    action: str
    ok: bool
    message: str
    step: int
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    request_id: int | None = None


class TrainingState(Protocol):
    """What an action needs of a run: the Instrumentation provides it, and so can API code."""

    torch: Any
    step: int
    clip_norm: float | None
    recent_total_norms: Any  # a sequence of recent total gradient norms

    def models(self) -> dict[str, Any]: ...

    def optimizers(self) -> list[Any]: ...


def models(instr: TrainingState) -> dict[str, Any]:
    return instr.models()


def optimizers(instr: TrainingState) -> list[Any]:
    return instr.optimizers()


def _lr_value(lr: Any) -> float:
    return float(lr.item()) if hasattr(lr, "item") else float(lr)


def clear_cache(instr: TrainingState) -> ActionResult:
    """``gc.collect()`` + ``torch.cuda.empty_cache()``, with memory before and after."""
    before = memory_context()
    collected = gc.collect()
    torch = instr.torch
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    after = memory_context()
    detail = {"gc_collected": collected, "before": before, "after": after}
    if "cuda_reserved_bytes" in before:
        freed = before["cuda_reserved_bytes"] - after.get("cuda_reserved_bytes", 0)
        msg = (f"cleared cache: CUDA reserved {human_bytes(before['cuda_reserved_bytes'])} -> "
               f"{human_bytes(after.get('cuda_reserved_bytes', 0))} (freed {human_bytes(freed)})")
    else:
        msg = (f"cleared cache: gc collected {collected} objects; RSS {human_bytes(before.get('rss_bytes', 0))} -> "
               f"{human_bytes(after.get('rss_bytes', 0))}")
    return ActionResult("clear_cache", True, msg, instr.step, detail)


def scale_lr(instr: TrainingState, factor: float) -> ActionResult:
    """Multiply the learning rate of every param group of every optimizer by ``factor``."""
    changes = []
    index = getattr(instr, "optimizer_index", None)
    for i, opt in enumerate(optimizers(instr)):
        if index is not None:  # the report's optimizers[].index (not the position among live ones)
            i = index(opt)
        for j, group in enumerate(opt.param_groups):
            lr = group.get("lr")
            if lr is None:
                continue
            old = _lr_value(lr)
            new = old * factor
            if hasattr(lr, "fill_"):
                lr.fill_(new)  # tensor lr (capturable optimizers): keep the tensor
            else:
                group["lr"] = new
            for key in ("initial_lr", "max_lr", "min_lr"):  # (a scheduler's anchors: OneCycleLR's, all of them)
                if key in group and isinstance(group[key], (int, float)):
                    group[key] = group[key] * factor
            changes.append({"optimizer": i, "group": j, "old": old, "new": new})
    name = "lower_lr" if factor < 1 else "raise_lr"
    if not changes:
        return ActionResult(name, False, "no optimizer seen yet: learning rate unchanged", instr.step)
    schedulers = []
    for opt in optimizers(instr):
        schedulers += [_scale_scheduler(s, factor) for s in _schedulers_of(opt)]
    shown = ", ".join(f"{c['old']:.3g} -> {c['new']:.3g}" for c in changes[:4])
    more = f" (+{len(changes) - 4} groups)" if len(changes) > 4 else ""
    also = f"; with {', '.join(sorted(set(schedulers)))}'s base rates" if schedulers else ""
    return ActionResult(name, True, f"learning rate x{factor:g}: {shown}{more}{also}", instr.step,
                        {"changes": changes, "schedulers": schedulers})


def _schedulers_of(opt: Any) -> list[Any]:
    """The LR schedulers driving ``opt`` (nothing registers them: found among what refers to it), also
    through wrappers of it: accelerate's and Lightning's optimizers hold it, and the scheduler holds
    the wrapper (HF Trainer's LambdaLR undid a halved rate at its next step). A user's key press, not
    a step: the search's few milliseconds are spent once."""
    found: list[Any] = []
    seen: set[int] = set()
    targets = [opt]
    for _ in range(3):  # the optimizer, its wrapper, a wrapper of that
        wrappers: list[Any] = []
        for target in targets:
            for ref in gc.get_referrers(target):
                holders = [ref] if not isinstance(ref, dict) else gc.get_referrers(ref)  # (an object or its __dict__)
                for obj in holders:
                    if id(obj) in seen or isinstance(obj, (dict, type)) or not (
                            getattr(obj, "optimizer", None) is target or getattr(obj, "_optimizer", None) is target):
                        continue
                    seen.add(id(obj))
                    if any(c.__module__.endswith("lr_scheduler") for c in type(obj).__mro__):
                        found.append(obj)
                    else:
                        wrappers.append(obj)
        targets = wrappers
        if not targets:
            break
    return found


def _scale_scheduler(scheduler: Any, factor: float) -> str:
    """Its base rates scaled with the optimizer's: LambdaLR (and the warm-up schedules built on it)
    computes each step's rate from them and undid the change at its next step; CyclicLR from its
    max_lrs as well. Returns its class name."""
    for attr in ("base_lrs", "max_lrs"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and all(isinstance(v, (int, float)) for v in values):
            setattr(scheduler, attr, [v * factor for v in values])
    return type(scheduler).__name__


def set_clipping(instr: TrainingState, max_norm: float | None) -> ActionResult:
    """Clip the total gradient norm of every optimizer's step to ``max_norm`` (None: off)."""
    instr.clip_norm = max_norm
    if max_norm is None:
        return ActionResult("clipping", True, "gradient clipping off", instr.step, {"max_norm": None})
    return ActionResult("clipping", True, f"gradient clipping on at total norm {max_norm:.4g}", instr.step,
                        {"max_norm": max_norm})


def default_clip_norm(instr: TrainingState) -> float:
    """A clipping threshold from the recent history: twice the median recent total gradient norm."""
    recent = [v for v in instr.recent_total_norms if v == v and v != float("inf")]
    return 2.0 * statistics.median(recent) if recent else 1.0


def toggle_clipping(instr: TrainingState) -> ActionResult:
    return set_clipping(instr, None if instr.clip_norm is not None else default_clip_norm(instr))


class Snapshots:
    """In-memory last-good copies (CPU) of every model's and optimizer's state, bounded.

    GPU tensors are copied into pinned memory without waiting (stream order makes the copy see the
    values of the step it was taken at): a synchronous copy per tensor stalled a launch-bound GPU run
    for a step's time at every snapshot (session 12, H100: ~0.6% of the transformer's run at one
    snapshot in 200 steps). The copy is waited for only when the snapshot is used."""

    PINNED_MAX_BYTES = 1 << 30  # larger states are copied synchronously (pinning that much host memory hurts)

    def __init__(self, keep: int = 1) -> None:
        self.keep = max(1, keep)
        self.items: list[dict[str, Any]] = []

    def take(self, instr: TrainingState) -> dict[str, Any] | None:
        ms, opts = models(instr), optimizers(instr)
        if not ms and not opts:
            return None
        states = {"models": {n: m.state_dict() for n, m in ms.items()}, "optimizers": [o.state_dict() for o in opts]}
        copier = _AsyncCopier.for_state(states, self.PINNED_MAX_BYTES)
        snap = {"step": instr.step, "time": time.time(), **_to_cpu(states, copier),
                # whose states they are: a later fold's optimizer must not be given an earlier one's
                "_optimizers": [weakref.ref(o) for o in opts]}
        if copier is not None:
            snap["_ready"] = copier.finish()
        self.items.append(snap)
        del self.items[:-self.keep]
        return snap

    def latest(self) -> dict[str, Any] | None:
        """The newest snapshot, its copies complete."""
        if not self.items:
            return None
        snap = self.items[-1]
        ready = snap.pop("_ready", None)
        if ready is not None:
            ready()
        return snap


class _AsyncCopier:
    """Copies CUDA tensors to pinned host memory on their current streams; ``finish`` returns a waiter."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.streams: dict[Any, Any] = {}

    @classmethod
    def for_state(cls, state: Any, max_bytes: int) -> _AsyncCopier | None:
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        tensors = _tensors(state, torch.Tensor)
        if not any(t.is_cuda for t in tensors):
            return None
        if sum(t.numel() * t.element_size() for t in tensors if t.is_cuda) > max_bytes:
            return None
        return cls(torch)

    def copy(self, t: Any) -> Any:
        torch = self.torch
        if not t.is_cuda or t.layout != torch.strided:
            return t.to("cpu", copy=True)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        if t.device not in self.streams:
            self.streams[t.device] = torch.cuda.current_stream(t.device)
        return host

    def finish(self) -> Any:
        events = []
        for stream in self.streams.values():
            event = self.torch.cuda.Event()
            event.record(stream)
            events.append(event)

        def wait() -> None:
            for event in events:
                event.synchronize()
        return wait


def _tensors(state: Any, tensor_type: type) -> list[Any]:
    if isinstance(state, tensor_type):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v, tensor_type)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v, tensor_type)]
    return []


def _to_cpu(state: Any, copier: _AsyncCopier | None = None) -> Any:
    torch_tensor = type(None)
    try:
        import torch

        torch_tensor = torch.Tensor
    except Exception:  # pragma: no cover
        pass
    if isinstance(state, torch_tensor):
        t = state.detach()
        return copier.copy(t) if copier is not None else t.to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v, copier) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v, copier) for v in state]
    if isinstance(state, tuple):
        return tuple(_to_cpu(v, copier) for v in state)
    return copy.deepcopy(state)


def rollback(instr: TrainingState, snapshots: Snapshots) -> ActionResult:
    """Load the last good snapshot back into the models and optimizers."""
    snap = snapshots.latest()
    if snap is None:
        return ActionResult("rollback", False, "no snapshot to roll back to yet", instr.step)
    ms, opts = models(instr), optimizers(instr)
    restored = []
    for name, state in snap["models"].items():
        m = ms.get(name)
        if m is not None:
            m.load_state_dict(state)
            restored.append(name)
    owners = [ref() for ref in snap.get("_optimizers", [])]
    matched = [(opt, snap["optimizers"][i]) for opt in opts for i, o in enumerate(owners) if o is opt]
    if not restored and not matched:
        return ActionResult("rollback", False, f"the snapshot of step {snap['step']} is of models and optimizers "
                            "that are no longer trained (a new model since)", instr.step)
    for opt, state in matched:
        lrs = [g.get("lr") for g in opt.param_groups]
        opt.load_state_dict(state)
        for g, lr in zip(opt.param_groups, lrs):  # keep the current learning rates (they may have been lowered)
            if lr is not None and not hasattr(lr, "fill_"):
                g["lr"] = lr
    return ActionResult("rollback", True, f"rolled back to the snapshot of step {snap['step']} "
                        f"({', '.join(restored) or 'optimizers only'})", instr.step,
                        {"snapshot_step": snap["step"], "models": restored})


def save_checkpoint(instr: TrainingState, folder: str) -> ActionResult:
    """Copy every state_dict to the CPU now; write the file in a background thread (no disk in training)."""
    ms, opts = models(instr), optimizers(instr)
    if not ms and not opts:
        return ActionResult("checkpoint", False, "no model seen yet: nothing to save", instr.step)
    state = {"step": instr.step, "models": {n: _to_cpu(m.state_dict()) for n, m in ms.items()},
             "optimizers": [_to_cpu(o.state_dict()) for o in opts]}
    path = os.path.join(folder, f"checkpoint-step{instr.step}.pt")
    torch = instr.torch

    def write() -> None:
        tmp = path + ".tmp"
        torch.save(state, tmp)  # type: ignore[union-attr]
        os.replace(tmp, path)

    threading.Thread(target=write, name="tui_debug-checkpoint", daemon=False).start()
    return ActionResult("checkpoint", True, f"checkpoint of step {instr.step} -> {path}", instr.step,
                        {"path": path, "models": list(ms)})
