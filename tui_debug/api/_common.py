"""Helpers shared by the API classes: the CLI's monitor (if any), batched tensor statistics, exceptions."""

from __future__ import annotations

import math
import sys
import threading
from typing import Any, Iterator

from ..instrument.norms import foreach_norm

_INF = float("inf")


# -- the CLI's monitor -------------------------------------------------------------------------------
def active_monitor() -> Any:
    """The ``Monitor`` of ``python -m tui_debug`` running this process, else None.

    Read from ``tui_debug.monitor.ACTIVE_MONITOR`` without importing the monitor (a plain
    ``python train.py`` never loads it).
    """
    mod = sys.modules.get("tui_debug.monitor")
    return getattr(mod, "ACTIVE_MONITOR", None) if mod is not None else None


def monitor_covers(monitor: Any, what: str) -> bool:
    """Whether the monitor's instrumentation already checks ``what`` (so the API must not report it again).

    ``what``: ``loss`` (finiteness of every loss passed to backward), ``grad`` (finiteness of every
    gradient an optimizer steps), ``activation`` (finiteness of model inputs and outputs in
    grad-enabled forwards), ``explosion`` (the loss-explosion trend detector).
    """
    if monitor is None:
        return False
    instr = getattr(monitor, "instr", None)
    if instr is None or getattr(instr, "broken", None) or getattr(instr, "torch", None) is None:
        return False
    cfg = monitor.config
    if what == "loss":
        return bool(cfg.enable_loss_tracking)
    if what == "grad":
        return bool(cfg.enable_gradient_tracking)
    if what == "activation":
        torch = instr.torch
        return bool(cfg.enable_activation_tracking) and bool(torch.is_grad_enabled())
    if what == "explosion":
        return hasattr(getattr(monitor, "session", None), "loss_explosion")
    return False


# -- exceptions --------------------------------------------------------------------------------------
_tracked_lock = threading.Lock()
_tracked_ids: dict[int, tuple[Any, Any]] = {}  # id(exc) -> (exc, info) for exceptions without __dict__


def mark_tracked(exc: BaseException, info: Any) -> None:
    """Remember that ``exc`` was tracked, so enclosing contexts do not count it again."""
    try:
        exc.__tui_debug_info__ = info  # type: ignore[attr-defined]
    except Exception:
        with _tracked_lock:
            if len(_tracked_ids) > 256:
                _tracked_ids.clear()
            _tracked_ids[id(exc)] = (exc, info)


def tracked_info(exc: BaseException) -> Any:
    info = getattr(exc, "__tui_debug_info__", None)
    if info is not None:
        return info
    with _tracked_lock:
        hit = _tracked_ids.get(id(exc))
    return hit[1] if hit is not None and hit[0] is exc else None


# -- tensors -----------------------------------------------------------------------------------------
def iter_tensors(value: Any, tensor_type: type, depth: int = 0) -> Iterator[Any]:
    """Tensors in ``value`` (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(value, tensor_type):
        yield value
    elif depth < 4 and isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_tensors(v, tensor_type, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for v in value.values():
            yield from iter_tensors(v, tensor_type, depth + 1)


def is_float(t: Any) -> bool:
    return t.is_floating_point() and not t.is_sparse


def max_abs(torch: Any, tensors: list[Any]) -> list[Any]:
    """One 0-d float32 tensor per tensor: max |x| (NaN/Inf propagate, cannot overflow). No host read."""
    out = []
    for t in tensors:
        t = t.detach()
        if t.numel() == 0:
            out.append(torch.zeros((), dtype=torch.float32, device=t.device))
        else:
            out.append(torch.linalg.vector_norm(t, _INF).float())
    return out


def grouped_norms(torch: Any, tensors: list[Any]) -> list[Any]:
    """L2 norms with ``torch._foreach_norm`` per (device, dtype) group, in the input order. No host read."""
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[Any] = [None] * len(tensors)
    f32 = torch.float32
    for (_, dtype), idxs in groups.items():
        ts = [tensors[i].detach() for i in idxs]
        norms = foreach_norm(torch, ts, dtype is f32)
        for i, n in zip(idxs, norms):
            out[i] = n
    return out


def read(torch: Any, scalars: list[Any]) -> list[float]:
    """THE host read: stack 0-d tensors (any devices) and read them at once."""
    if not scalars:
        return []
    try:
        stacked = torch.stack([s.float() for s in scalars])
    except RuntimeError:  # several devices: one read per device, in order
        stacked = torch.cat([s.reshape(1).float().to("cpu") for s in scalars])
    return stacked.tolist()


def tensor_stats(torch: Any, tensors: list[Any], full: bool) -> list[dict[str, Any]]:
    """Per tensor: ``norm`` (and with ``full`` ``mean``, ``std``, ``min``, ``max``), ``has_nan``, ``has_inf``.

    One host read for all tensors; a second one only for tensors whose norm is not finite (to tell
    NaN from Inf from an overflowing L2 norm of finite values).
    """
    floats = [i for i, t in enumerate(tensors) if is_float(t) and t.numel() > 0]
    ts = [tensors[i].detach() for i in floats]
    scalars = list(grouped_norms(torch, ts)) if ts else []
    if full:
        for t in ts:
            std, mean = torch.std_mean(t, correction=1 if t.numel() > 1 else 0)
            mn, mx = torch.aminmax(t)
            scalars += [mean, std, mn, mx]
    values = read(torch, scalars)
    n = len(ts)
    out: list[dict[str, Any]] = [{} for _ in tensors]
    bad = []
    for k, i in enumerate(floats):
        norm = values[k]
        d: dict[str, Any] = {"norm": norm, "has_nan": False, "has_inf": False}
        if full:
            mean, std, mn, mx = values[n + 4 * k: n + 4 * k + 4]
            d.update(mean=mean, std=std, min=mn, max=mx)
        if not math.isfinite(norm):
            bad.append((k, i))
        out[i] = d
    if bad:
        flags = read(torch, [x for k, _ in bad for x in (torch.isnan(ts[k]).any(), torch.isinf(ts[k]).any())])
        for j, (k, i) in enumerate(bad):
            out[i]["has_nan"] = bool(flags[2 * j])
            out[i]["has_inf"] = bool(flags[2 * j + 1])
    return out


def kind(value: float) -> str:
    return "nan" if value != value else ("inf" if value > 0 else "-inf")
