"""NVML polling off the UI thread: a daemon thread keeps the latest ``GpuSample``; the UI reads it.

Every NVML call is wrapped: with no driver, no GPU or no permission the sample carries one line
saying why, and the poller stops asking (no spam, no crash).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable


@dataclasses.dataclass
class GpuDevice:
    index: int  # NVML index
    name: str
    uuid: str
    mem_used: int | None = None
    mem_total: int | None = None
    util_gpu: int | None = None  # percent
    process_mem: int | None = None  # this process's own usage on the device
    torch_index: int | None = None  # the index torch knows it by (CUDA_VISIBLE_DEVICES)
    torch_allocated: int | None = None
    torch_reserved: int | None = None
    error: str | None = None


@dataclasses.dataclass
class GpuSample:
    time: float
    devices: list[GpuDevice]
    reason: str | None = None  # set when there is nothing to show (no driver / no GPU / no permission)
    driver: str | None = None


def visible_map(uuids: list[str], env: str | None) -> dict[int, int]:
    """NVML index -> torch index, from ``CUDA_VISIBLE_DEVICES`` (indices or UUID prefixes)."""
    if env is None:
        return {i: i for i in range(len(uuids))}
    out: dict[int, int] = {}
    for torch_idx, item in enumerate(x.strip() for x in env.split(",")):
        if not item:
            break
        nvml_idx: int | None = None
        if item.lstrip("-").isdigit():
            n = int(item)
            if n < 0:
                break  # CUDA stops at the first invalid entry
            nvml_idx = n if n < len(uuids) else None
        else:
            key = item if item.startswith(("GPU-", "MIG-")) else f"GPU-{item}"
            matches = [i for i, u in enumerate(uuids) if u.startswith(key)]
            nvml_idx = matches[0] if len(matches) == 1 else None
        if nvml_idx is None:
            break
        out[nvml_idx] = torch_idx
    return out


def _nvml_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc) or name
    if "LibraryNotFound" in name or "Library Not Found" in text or isinstance(exc, (ImportError, OSError)):
        return "no NVIDIA driver (NVML not found)"
    if "NoPermission" in name or "Insufficient Permissions" in text:
        return "no permission to query the NVIDIA driver (NVML)"
    if "DriverNotLoaded" in name or "Driver Not Loaded" in text:
        return "NVIDIA driver not loaded"
    return f"NVML unavailable: {text}"


class GpuPoller:
    """Polls NVML every ``interval`` seconds in a daemon thread; ``latest`` is the newest sample."""

    def __init__(self, interval: float = 1.0, on_sample: Callable[[GpuSample], None] | None = None,
                 nvml: Any = None) -> None:
        self.interval = interval
        self.on_sample = on_sample
        self.latest: GpuSample | None = None
        self._nvml = nvml
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tui_debug-gpu", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _publish(self, sample: GpuSample) -> None:
        self.latest = sample
        if self.on_sample is not None:
            try:
                self.on_sample(sample)
            except Exception:
                pass

    def _loop(self) -> None:
        nvml = self._nvml
        try:
            if nvml is None:
                import pynvml as nvml  # nvidia-ml-py
            nvml.nvmlInit()
        except BaseException as exc:  # noqa: BLE001 - any failure is "no GPU pane", never a crash
            self._publish(GpuSample(time.time(), [], reason=_nvml_reason(exc)))
            return
        try:
            try:
                count = nvml.nvmlDeviceGetCount()
            except Exception as exc:
                self._publish(GpuSample(time.time(), [], reason=_nvml_reason(exc)))
                return
            if count == 0:
                self._publish(GpuSample(time.time(), [], reason="no NVIDIA GPU found by the driver"))
                return
            driver = _call(nvml.nvmlSystemGetDriverVersion)
            while not self._stop.is_set():
                self._publish(self.sample(nvml, count, driver))
                self._stop.wait(self.interval)
        finally:
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass

    def sample(self, nvml: Any, count: int, driver: Any = None) -> GpuSample:
        devices: list[GpuDevice] = []
        for i in range(count):
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception as exc:
                devices.append(GpuDevice(i, "?", "", error=_nvml_reason(exc)))
                continue
            name = _call(nvml.nvmlDeviceGetName, h) or "?"
            uuid = _call(nvml.nvmlDeviceGetUUID, h) or ""
            dev = GpuDevice(i, _text(name), _text(uuid))
            mem = _call(nvml.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                dev.mem_used, dev.mem_total = int(mem.used), int(mem.total)
            util = _call(nvml.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                dev.util_gpu = int(util.gpu)
            procs = _call(nvml.nvmlDeviceGetComputeRunningProcesses, h) or []
            own = [p for p in procs if getattr(p, "pid", None) == self._pid]
            if own:
                used = [getattr(p, "usedGpuMemory", None) for p in own]
                dev.process_mem = sum(int(u) for u in used if isinstance(u, int))
            devices.append(dev)
        mapping = visible_map([d.uuid for d in devices], os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch = sys.modules.get("torch")
        for d in devices:
            d.torch_index = mapping.get(d.index)
            if d.torch_index is None or torch is None:
                continue
            try:
                if torch.cuda.is_initialized():
                    d.torch_allocated = int(torch.cuda.memory_allocated(d.torch_index))
                    d.torch_reserved = int(torch.cuda.memory_reserved(d.torch_index))
            except Exception:
                pass
        return GpuSample(time.time(), devices, driver=_text(driver) if driver else None)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        return None


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
