"""The design document's Python API on tui_debug's engine: ``Debugger``, ``ModelDebugger``,
``RecoveryManager``, ``DebuggingInterface``.

Importing this package imports torch lazily (only when a tensor is first handled); ``import
tui_debug`` itself never imports it.
"""

from __future__ import annotations

from .debugger import Debugger
from .interface import DebuggingInterface
from .model_debugger import ModelDebugger, StepFailed
from .recovery_manager import APITrainingState, RecoveryManager

__all__ = ["APITrainingState", "Debugger", "DebuggingInterface", "ModelDebugger", "RecoveryManager", "StepFailed"]
