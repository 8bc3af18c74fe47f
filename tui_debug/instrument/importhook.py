"""Run a callback right after the script imports torch, never before (no early CUDA init)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Callable


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, on_loaded: Callable[[ModuleType], None]) -> None:
        self._inner = inner
        self._on_loaded = on_loaded

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._on_loaded(module)

    def __getattr__(self, name: str) -> Any:  # resources, get_filename, is_package...
        return getattr(self._inner, name)


class TorchImportWatcher(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that wraps torch's loader to call ``on_import`` once."""

    def __init__(self, on_import: Callable[[ModuleType], None], module: str = "torch") -> None:
        self._on_import = on_import
        self._module = module
        self._fired = False

    def install(self) -> None:
        if self._module in sys.modules:
            self._fire(sys.modules[self._module])
        else:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass

    def _fire(self, module: ModuleType) -> None:
        if self._fired:
            return
        self._fired = True
        self.uninstall()
        self._on_import(module)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._module or self._fired:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, self._fire)
        return spec
