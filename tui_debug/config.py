"""Run configuration: the design document's ``DebugConfig`` plus the monitor's own knobs.

Loaded from (lowest to highest precedence) defaults, ``[tool.tui_debug]`` in the nearest
``pyproject.toml``, a ``--config`` TOML file, and command-line options.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from typing import Any, Callable

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A configuration value or file the user must fix; reported as one line, exit 2."""


class DebugLevel(enum.Enum):
    """How much is computed and logged. NONE computes nothing; PROFILING adds cProfile."""

    NONE = "none"
    BASIC = "basic"
    DETAILED = "detailed"
    VERBOSE = "verbose"
    PROFILING = "profiling"

    @property
    def rank(self) -> int:
        return list(DebugLevel).index(self)


RECOVER_MODES = ("off", "safe", "auto")


@dataclasses.dataclass
class DebugConfig:
    """Every setting of a run. Field names follow the design document where it has one."""

    debug_level: DebugLevel = DebugLevel.DETAILED
    enable_profiling: bool = False
    enable_memory_tracking: bool = True
    enable_gradient_tracking: bool = True
    enable_loss_tracking: bool = True
    enable_performance_tracking: bool = True
    enable_activation_tracking: bool = True
    log_file: str = "debug.log"
    error_file: str = "errors.log"
    max_log_size: int = 100 * 1024 * 1024
    backup_count: int = 5
    enable_console_output: bool = True
    enable_file_output: bool = True
    # Monitor knobs (not in the design document).
    recover: str = "safe"
    snapshot_interval: int = 200
    max_errors: int = 10_000
    output_tail_lines: int = 2_000
    history_points: int = 1_000
    progress_interval_s: float = 5.0
    max_sentinels_per_step: int = 4_096
    sample_fast_steps: bool = True
    freeze_gc_at_import: bool = True  # gc.collect() + gc.freeze() once torch is imported (see monitor.py)
    max_overhead: float = 0.01  # the sampler's budget for checks of fast steps (see README, Detectors)
    # slower CPU steps are all checked unless the monitor's hooks take more than this share of them
    # (hundreds of module calls a step); then checks are sampled to cost about half of it
    max_overhead_slow: float = 0.10
    # slower CPU steps are all read (loss, gradients); their forwards are observed one in k when that
    # costs more than this share (hooks taken twice), and a step gone non-finite between is replayed
    max_overhead_forward: float = 0.005
    # Detector thresholds (README: "Detectors" explains each number).
    loss_explosion_factor: float = 100.0
    loss_window: int = 5
    loss_warmup: int = 10
    grad_explosion_factor: float = 50.0
    grad_warmup: int = 20
    vanishing_ratio: float = 1e-5
    vanishing_abs: float = 1e-6
    vanishing_steps: int = 50
    slow_step_factor: float = 10.0
    leak_min_bytes: int = 64 * 1024 * 1024
    plateau_steps: int = 1000
    max_lr_halvings: int = 5
    activation_stats_every: int = 25
    activation_window: int = 5
    dead_fraction: float = 0.5
    saturation_fraction: float = 0.7
    update_ratio_every: int = 100
    update_ratio_high: float = 0.3
    update_ratio_low: float = 1e-8
    update_ratio_max_numel: int = 50_000_000

    def __post_init__(self) -> None:
        # Types first, as a TOML file's are: DebugConfig(max_errors="5") was accepted, and the first
        # finding then raised TypeError inside the tracker.
        for f in dataclasses.fields(self):
            if f.name != "debug_level" and f.default is not dataclasses.MISSING:
                setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.default, "DebugConfig"))
        if not isinstance(self.debug_level, (str, DebugLevel)):
            raise ConfigError(f"debug_level must be one of {', '.join(l.value for l in DebugLevel)}, "
                              f"not {self.debug_level!r}")
        if isinstance(self.debug_level, str):
            try:
                self.debug_level = DebugLevel(self.debug_level.lower())
            except ValueError:
                raise ConfigError(
                    f"debug_level must be one of {', '.join(l.value for l in DebugLevel)}, "
                    f"not {self.debug_level!r}"
                ) from None
        if self.recover not in RECOVER_MODES:
            raise ConfigError(f"recover must be one of {', '.join(RECOVER_MODES)}, not {self.recover!r}")
        for name in ("max_log_size", "max_errors", "output_tail_lines", "history_points"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if int(self.backup_count) < 0:
            raise ConfigError(f"backup_count must be >= 0, not {self.backup_count!r}")
        for name in ("log_file", "error_file"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or value.endswith(("/", os.sep)):
                raise ConfigError(f"{name} must name a file, not {value!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 62:
                raise ConfigError(f"{f.name} is too large: {value!r}")
        # Detector and sampler settings: a value outside its range would switch a detector off with a
        # traceback mid-run (loss_window = 0) or make it fire on every step (a factor below 1).
        for names, ok, what in (
                (("loss_window", "vanishing_steps", "plateau_steps", "activation_window",
                  "max_sentinels_per_step", "update_ratio_max_numel"), lambda v: v >= 1, "a positive integer"),
                (("snapshot_interval", "loss_warmup", "grad_warmup", "max_lr_halvings", "activation_stats_every",
                  "update_ratio_every", "leak_min_bytes"), lambda v: v >= 0, "an integer >= 0 (0: off)"),
                (("loss_explosion_factor", "grad_explosion_factor", "slow_step_factor"), lambda v: v > 1,
                 "a number above 1"),
                (("dead_fraction", "saturation_fraction"), lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
                (("max_overhead",), lambda v: 0 <= v < 1, "a fraction in [0, 1) (0: no sampling)"),
                (("max_overhead_slow", "max_overhead_forward"), lambda v: 0 <= v < 1, "a fraction in [0, 1) (0: slow steps all checked)"),
                (("vanishing_ratio", "vanishing_abs", "update_ratio_high", "progress_interval_s"), lambda v: v > 0,
                 "a positive number"),
                (("update_ratio_low",), lambda v: v >= 0, "a number >= 0")):
            for name in names:
                value = getattr(self, name)
                if not ok(value):
                    raise ConfigError(f"{name} must be {what}, not {value!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def updated(self, values: dict[str, Any], source: str) -> "DebugConfig":
        """A copy with ``values`` applied; unknown keys and wrong types are a ConfigError."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        current = dataclasses.asdict(self)
        current["debug_level"] = self.debug_level
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in fields:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            current[key] = _coerce(key, value, getattr(self, key), source)
        try:
            return DebugConfig(**current)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["debug_level"] = self.debug_level.value
        return d


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    if isinstance(default, DebugLevel):
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, os.PathLike):  # (log_file=Path(...))
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, not {value!r}")
        return value
    return value


def find_pyproject(start: Path) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start``."""
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def load_config(config_file: str | None, start_dir: str | os.PathLike[str],
                overrides: dict[str, Any] | None = None,
                warn: Callable[[str], None] | None = None) -> DebugConfig:
    """Defaults <- nearest pyproject ``[tool.tui_debug]`` <- ``config_file`` <- ``overrides``.
    ``warn``: told of a pyproject.toml that cannot be read (it is skipped)."""
    config = DebugConfig()
    pyproject = find_pyproject(Path(start_dir).resolve())
    if pyproject is not None:
        try:
            data = _read_toml(pyproject)
        except ConfigError as exc:
            # Not necessarily ours: the project's file, which plain Python never reads. Said, not fatal.
            if warn is not None:
                warn(f"{exc}; its [tool.tui_debug] settings, if any, are not applied")
            data = {}
        tool = data.get("tool", {})
        table = tool.get("tui_debug") if isinstance(tool, dict) else None
        if table is not None:
            if not isinstance(table, dict):
                raise ConfigError(f"{pyproject}: [tool.tui_debug] must be a table")
            config = config.updated(table, str(pyproject))
    if config_file is not None:
        data = _read_toml(Path(config_file))
        tool = data.get("tool")
        if isinstance(tool, dict):  # a pyproject.toml: its [tool.tui_debug] table, and only that
            if "tui_debug" not in tool:
                raise ConfigError(f"{config_file} has a [tool] table but no [tool.tui_debug]: the settings go there")
            stray = [k for k in data if k.replace("-", "_") in DebugConfig.field_names()]
            if stray:  # (one place would silently win over the other)
                raise ConfigError(f"{config_file}: {', '.join(stray)} at the top level and a [tool.tui_debug] table: "
                                  "put the settings in one place")
            data = tool["tui_debug"]
            if not isinstance(data, dict):
                raise ConfigError(f"{config_file}: [tool.tui_debug] must be a table")
        config = config.updated(data, config_file)
    if overrides:
        config = config.updated(overrides, "command line")
    return config
