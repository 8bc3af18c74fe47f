"""Whether this process trains together with others (torch.distributed), for recovery to stay out.

DDP keeps its replicas identical by applying the same all-reduced update on every rank. Each rank's
monitor decides alone (its own sampled steps, its own findings, the UI on rank 0 only), so a step
skipped, a rollback or a learning rate changed on one rank would leave the replicas different: the
run goes on, silently diverged. Those actions are reported as not applied instead.
"""

from __future__ import annotations

import sys


def world_size() -> int:
    """The processes of this run's default process group, once the script initialised it; else 1.

    Looked up in ``sys.modules``: torch.distributed is not imported for a run that never used it."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return 1
    try:
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size())
    except Exception:  # a backend in a bad state: not ours to decide, and nothing to change
        return 1
    return 1


def why_not(world: int) -> str:
    """Why a recovery was left out, for a finding or an action result."""
    return (f"one of {world} processes training together (torch.distributed): a change on this rank "
            f"alone would make the replicas diverge")
