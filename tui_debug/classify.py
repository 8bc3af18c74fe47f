"""Classify what the script raised into the design document's categories, with advice."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback
from typing import Any

_CPU_OOM = re.compile(r"you tried to allocate (\d+) bytes")
_CUDA_OOM = re.compile(r"Tried to allocate ([\d.]+ ?[KMGT]?i?B)")
_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)")
_DATA_DIR = os.sep + os.path.join("torch", "utils", "data") + os.sep
_AUTOGRAD_DIR = os.sep + os.path.join("torch", "autograd") + os.sep


@dataclasses.dataclass
class Classified:
    severity: str
    category: str
    message: str
    context: dict[str, Any]
    recommendation: str


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def memory_context() -> dict[str, Any]:
    """RSS and system memory; CUDA allocator figures only if the script already initialised CUDA."""
    ctx: dict[str, Any] = {}
    try:
        import psutil

        ctx["rss_bytes"] = psutil.Process().memory_info().rss
        vm = psutil.virtual_memory()
        ctx["system_total_bytes"] = vm.total
        ctx["system_available_bytes"] = vm.available
    except Exception:
        pass
    try:
        import resource

        ctx["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except Exception:  # not on this platform
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            ctx["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            ctx["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
            ctx["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    except Exception:
        pass
    return ctx


def _last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else text.strip()


def _is_oom_type(exc: BaseException) -> bool:
    return any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


def raised_mid_step(exc: BaseException, failing_modules: list[str] | None) -> bool:
    """Whether ``exc`` came from inside a training iteration before its optimizer step (a model's
    forward, a backward, loading its batch): it then belongs to the step in progress, numbered as a
    NaN found in that forward would be, not to the last one done."""
    if failing_modules:
        return True
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    return any(_AUTOGRAD_DIR in f.filename or _DATA_DIR in f.filename for f in frames) or \
        bool(_WORKER.search(str(exc)))


def classify_exception(exc: BaseException, failing_modules: list[str] | None = None) -> Classified:
    text = str(exc)
    name = type(exc).__name__
    where = f" in {failing_modules[0]}" if failing_modules else ""
    ctx: dict[str, Any] = {"exception_type": name}
    if failing_modules:
        ctx["module"] = failing_modules[0]
        ctx["module_stack"] = failing_modules
    # -- memory ----------------------------------------------------------------------------
    cpu = _CPU_OOM.search(text)
    if cpu or _is_oom_type(exc) or isinstance(exc, MemoryError) or "CUDA out of memory" in text:
        ctx.update(memory_context())
        if cpu:
            size = int(cpu.group(1))
            ctx["requested_bytes"] = size
            what = f"CPU out of memory{where}: tried to allocate {human_bytes(size)}"
        else:
            cuda = _CUDA_OOM.search(text)
            if cuda:
                ctx["requested"] = cuda.group(1)
                what = f"CUDA out of memory{where}: tried to allocate {cuda.group(1)}"
            else:
                what = f"out of memory{where} ({name})"
        if "rss_bytes" in ctx:
            what += f" (process RSS {human_bytes(ctx['rss_bytes'])}"
            if "system_available_bytes" in ctx:
                what += (f", system memory {human_bytes(ctx['system_available_bytes'])} free of "
                         f"{human_bytes(ctx['system_total_bytes'])}")
            what += ")"
        return Classified("error", "memory_error", what, ctx,
                          "Reduce the batch size or sequence length, free tensors kept across steps "
                          "(store loss.item(), not loss), use mixed precision or gradient checkpointing; "
                          "an allocation far beyond the device usually means a wrong shape.")
    # -- data ------------------------------------------------------------------------------
    worker = _WORKER.search(text)
    if worker:
        original = text.split("Original Traceback (most recent call last):", 1)
        ctx["worker"] = int(worker.group(2))
        ctx["original_exception"] = worker.group(1)
        if len(original) == 2:
            ctx["original_traceback"] = "Traceback (most recent call last):" + original[1]
        last = _last_line(text)
        if last.startswith(worker.group(1) + ":"):
            last = last[len(worker.group(1)) + 1:].strip()
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
        where_in = ""
        if frames:
            f, line, fn = frames[-1]
            ctx["dataset_frame"] = f"{os.path.basename(f)}:{line} in {fn}"
            where_in = f" (at {ctx['dataset_frame']})"
        return Classified("error", "data_error",
                          f"{worker.group(1)} in DataLoader worker {worker.group(2)}: {last}{where_in}", ctx,
                          "The dataset (or its transform/collate_fn) raised for one sample: the original "
                          "traceback in this finding points at the line; run with num_workers=0 to debug it "
                          "in-process.")
    if "DataLoader worker" in text and ("exited unexpectedly" in text or "killed" in text):
        return Classified("error", "data_error", f"a DataLoader worker died: {_last_line(text)}", ctx,
                          "A worker was killed (often by the out-of-memory killer or a segfault in a "
                          "transform): lower num_workers or the batch size, check `dmesg`.")
    if re.search(r"Target -?\d+ is out of bounds", text) or "device-side assert" in text:
        return Classified("error", "data_error", f"labels out of range for the loss{where}: {_last_line(text)}", ctx,
                          "A class index is >= the number of classes (or negative): check the label encoding "
                          "and the size of the model's output layer.")
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if any(_DATA_DIR in f.filename for f in frames):
        user = [f for f in frames if _DATA_DIR not in f.filename and os.sep + "torch" + os.sep not in f.filename]
        if user:
            ctx["dataset_frame"] = f"{os.path.basename(user[-1].filename)}:{user[-1].lineno}"
        return Classified("error", "data_error", f"{name} while loading data: {_last_line(text) or name}", ctx,
                          "The dataset, sampler or collate_fn raised while building a batch; the "
                          "traceback points at the line.")
    return Classified("error", "training_error", f"{name}{where}: {_last_line(text)}" if text else f"{name}{where}",
                      ctx, "The script raised; the traceback shows where. A shape or dtype mismatch names "
                           "the module it happened in.")
