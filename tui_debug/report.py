"""The JSON debug report: built from the session, written atomically on every way out."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

from .detectors.trends import loss_rose
from .errors import ErrorInfo, _jsonable
from .session import Session

SCHEMA_VERSION = 1
SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.schema.json")


def _num(v: float | None) -> float | str | None:
    if v is None:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


FAULTS_PER_STEP = 256  # 1 MiB of 4 KiB pages touched afresh every step


MAX_FINDING_ADVICE = 50  # recommendations taken from findings (the most severe and earliest first)


def recommendations(session: Session, errors: list[ErrorInfo]) -> list[str]:
    """Concrete advice derived from what was found (the design document's _generate_recommendations)."""
    out: list[str] = []
    seen: set[str] = set()
    more = 0
    for info in sorted(errors, key=lambda e: (-e.severity.rank, e.first_step or 0)):
        if info.recommendation and info.recommendation not in seen:
            seen.add(info.recommendation)
            if len(out) >= MAX_FINDING_ADVICE:  # (10,000 distinct findings made 3.3 MB of advice)
                more += 1
                continue
            where = f" (step {info.first_step})" if info.first_step is not None else ""
            out.append(f"[{info.category.value}] {info.message}{where}: {info.recommendation}")
    if more:
        out.append(f"... and {more} more findings with advice of their own: see errors[].recommendation.")
    for stats in session.losses.values():
        rose = loss_rose([v for _, v in stats.history.points()]) if stats.nonfinite == 0 else None
        if rose is not None:
            out.append(f"[loss] '{stats.name}' ended higher than it started (median of its first tenth "
                       f"{rose[0]:.4g}, of its last {rose[1]:.4g}): the learning rate may be too high.")
    skips, total = session.scaler_skips, session.scaler_skips + session.steps
    if skips >= 20 and skips >= 0.1 * total:  # calibration from the default scale takes a handful
        out.append(f"[amp] a GradScaler skipped {skips} of {total} iterations ({100 * skips / total:.0f}%): "
                   f"half-precision gradients overflow often. Use bfloat16 autocast where the GPU has it, "
                   f"lower the learning rate, or find the values that overflow float16 (65504).")
    faults = session.page_faults_per_step()
    if faults is not None and faults >= FAULTS_PER_STEP and not session.cuda:
        out.append(f"[performance] the process took {faults:,.0f} page faults per training step: about "
                   f"{faults * 4096 / 2**20:,.0f} MiB that the allocator hands back to the OS and touches again "
                   f"every step (glibc trims its heap). Starting Python with MALLOC_TRIM_THRESHOLD_=1073741824 "
                   f"MALLOC_MMAP_THRESHOLD_=33554432 in the environment (or with jemalloc/tcmalloc preloaded) "
                   f"keeps that memory; it took bench/workloads.py's CNN from 36-42 ms to 33 ms per step.")
    if session.steps == 0 and session.status in ("finished", "exited") and session.models and session.losses:
        # (a backward ran: an inference script runs its model with no loss, and is told nothing)
        out.append("[training] no optimizer step was seen: the model ran but never trained "
                   "(optimizer.step() missing, or every step skipped by a GradScaler).")
    if not out and session.status == "finished":
        out.append("No problems found.")
    return out


def build_report(session: Session) -> dict[str, Any]:
    errors = session.tracker.snapshot()
    summary = session.tracker.get_error_summary()
    env = session.environment()
    ended = session.ended_at
    step_times = session.step_times
    mean = step_times.total / step_times.count if step_times.count else None
    grads = {}
    for name in session.grad_order:
        g = session.grads[name]
        grads[name] = {"last": _num(g.last), "last_step": g.last_step, "min": _num(g.min if g.count > g.nonfinite else None),
                       "max": _num(g.max if g.count > g.nonfinite else None), "nonfinite": g.nonfinite,
                       "count": g.count}
    losses = {}
    for stats in session.losses.values():
        losses[stats.name] = {
            "source": stats.source, "count": stats.count, "first": _num(stats.first), "last": _num(stats.last),
            "min": _num(stats.min), "max": _num(stats.max), "nonfinite": stats.nonfinite,
            "history": [[s, _num(v)] for s, v in stats.history.points()],
        }
    memory: dict[str, Any] = {"rss_peak_bytes": session.rss_peak, "rss_last_bytes": session.rss_last,
                              "rss_history": [[s, v] for s, v in session.rss.points()]}
    if session.cuda:
        memory["cuda"] = dict(session.cuda)
    return {
        "schema_version": SCHEMA_VERSION,
        "run": {
            "script": session.script,
            "argv": session.argv,
            "started_at": _iso(session.started_at),
            "ended_at": _iso(ended),
            "duration_s": round((ended or time.time()) - session.started_at, 3),
            "status": session.status,
            "exit_code": session.exit_code,
            "versions": env["versions"],
            "devices": env["devices"],
            "run_dir": session.run_dir,
        },
        "summary": {
            "steps": session.steps,
            "total_errors": summary["total_errors"],
            "unique_errors": summary["unique_errors"],
            "error_counts": summary["error_counts"],
            "severity_counts": summary["severity_counts"],
            "dropped_events": session.dropped_events(),
            "dropped_errors": summary["dropped_errors"],
        },
        "errors": [e.to_dict() for e in errors],
        "losses": losses,
        "gradients": grads,
        "optimizers": [{"index": o.index, "class": o.cls, "param_groups": o.param_groups,
                        "lr": [_num(x) for x in o.lr]} for o in session.optimizers.values()],
        "models": [{"name": m.name, "class": m.cls, "parameters": m.parameters, "trainable": m.trainable,
                    "devices": m.devices} for m in session.models.values()],
        "memory": memory,
        "performance": {
            "step_time_mean_s": mean,
            "step_time_p50_s": step_times.percentile(50),
            "step_time_p95_s": step_times.percentile(95),
            "steps_per_second": session.steps_per_second(),
            "measured_steps": step_times.count,
            "checked_steps": session.checked_steps,
            "scaler_skipped_steps": session.scaler_skips,
            "page_faults_per_step": session.page_faults_per_step(),
        },
        "actions": _jsonable(session.actions),
        "config": _jsonable(session.config.to_dict()),  # (inf turns a threshold off; JSON has no inf)
        "output_tail": [{"stream": s, "text": t} for s, t in session.output_tail()[-200:]],
        "recommendations": recommendations(session, errors),
    }


def write_report(path: str, report: dict[str, Any]) -> None:
    """Temp file in the same folder + rename: a reader never sees half a report."""
    try:
        text = json.dumps(report, indent=2, allow_nan=False, default=repr)
    except ValueError:  # a NaN or inf that no field converted: as the fields do, a string
        text = json.dumps(_jsonable(report), indent=2, allow_nan=False, default=repr)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it (mkstemp's is 0600: others could not read it)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
