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
]
