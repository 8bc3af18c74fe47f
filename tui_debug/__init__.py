"""tui_debug: a live debugger for PyTorch training.

Importing this package does not import torch: the CLI must not initialise torch (or CUDA)
before the user's script does.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import DebugConfig, DebugLevel
from .errors import ErrorCategory, ErrorInfo, ErrorSeverity, ErrorTracker

__all__ = [
    "DebugConfig", "DebugLevel", "ErrorCategory", "ErrorInfo", "ErrorSeverity", "ErrorTracker", "__version__",
    "Debugger", "DebuggingInterface", "ModelDebugger", "RecoveryManager",
]

# The Python API (tui_debug.api), loaded on first use so that ``import tui_debug`` stays light.
_API = ("Debugger", "DebuggingInterface", "ModelDebugger", "RecoveryManager")


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tui_debug' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
