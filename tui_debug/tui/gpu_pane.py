"""GPU / memory pane: per NVIDIA device memory bar, utilisation, own usage, torch allocated/reserved;
CPU RSS and system memory. With no GPU/driver/permission: one line saying why."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from .fmt import bar, human_bytes
from .gpu import GpuSample


def render_gpu(sample: GpuSample | None, rss: int, rss_peak: int, sys_total: int | None, sys_avail: int | None,
               cuda: dict, width: int) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    bar_w = max(6, min(30, width - 34))
    if sample is None:
        t.append("GPU: querying NVML…", "dim")
    elif sample.reason:
        t.append("GPU: ", "bold")
        t.append(sample.reason, "dim")
    else:
        for d in sample.devices:
            label = f"cuda:{d.torch_index}" if d.torch_index is not None else f"nvml{d.index}"
            t.append(f"{label} ", "bold")
            if d.error:
                t.append(d.error + "\n", "dim")
                continue
            t.append(f"{d.name}\n", "")
            if d.mem_total:
                t.append(" mem ")
                t.append(bar(d.mem_used or 0, d.mem_total, bar_w))
                t.append(f" {human_bytes(d.mem_used)}/{human_bytes(d.mem_total)}")
            if d.util_gpu is not None:
                t.append(f" util {d.util_gpu}%")
            t.append("\n")
            own = []
            if d.process_mem is not None:
                own.append(f"process {human_bytes(d.process_mem)}")
            if d.torch_allocated is not None:
                own.append(f"torch alloc {human_bytes(d.torch_allocated)} resv {human_bytes(d.torch_reserved)}")
            if own:
                t.append(" " + "  ".join(own) + "\n", "cyan")
    if sample is not None and not sample.reason and not sample.devices:
        t.append("GPU: none\n", "dim")
    if not t.plain.endswith("\n"):
        t.append("\n")
    if cuda and (sample is None or sample.reason):
        t.append(f"torch cuda alloc {human_bytes(cuda.get('cuda_allocated_bytes'))} "
                 f"resv {human_bytes(cuda.get('cuda_reserved_bytes'))}\n", "cyan")
    t.append("CPU RSS ", "bold")
    t.append(f"{human_bytes(rss) if rss else '-'} (peak {human_bytes(rss_peak) if rss_peak else '-'})")
    if sys_total:
        used = sys_total - (sys_avail or 0)
        t.append("\nsys mem ", "bold")
        t.append(bar(used, sys_total, bar_w))
        t.append(f" {human_bytes(used)}/{human_bytes(sys_total)}")
    return t


class GpuPane(Static):
    def __init__(self, **kw) -> None:  # noqa: ANN003
        super().__init__("", **kw)
        self._key: tuple | None = None
        self.lines = 1

    def sync(self, sample: GpuSample | None, rss: int, rss_peak: int, sys_total: int | None,
             sys_avail: int | None, cuda: dict, force: bool = False) -> None:
        width = max(20, self.content_region.width or 40)
        key = (id(sample), rss, sys_avail, width, tuple(sorted(cuda.items())))
        if key == self._key and not force:
            return
        self._key = key
        text = render_gpu(sample, rss, rss_peak, sys_total, sys_avail, cuda, width)
        self.lines = len(text.plain.splitlines()) or 1
        self.update(text)
