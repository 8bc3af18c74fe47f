"""Messages between the panes and the app (none is posted per training hook: see app.tick)."""

from __future__ import annotations

from textual.message import Message

from .gpu import GpuSample


class GpuSampled(Message):
    """From the NVML poller thread (1 Hz): the latest GPU figures. Replaces a queued older one."""

    def __init__(self, sample: GpuSample) -> None:
        super().__init__()
        self.sample = sample

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, GpuSampled)


class ShowFinding(Message):
    """The user picked a finding in the Errors pane: open its detail."""

    def __init__(self, error_id: str) -> None:
        super().__init__()
        self.error_id = error_id


class StdinWanted(Message):
    """From the training thread: the script reads its stdin and waits for a line (see stdin.py)."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StdinWanted)
