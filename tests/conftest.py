"""Make this checkout's ``tui_debug`` and the test helpers importable however pytest is started."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder: a tracker made with the default config writes debug.log and
    errors.log where it runs, which left them in the checkout."""
    monkeypatch.chdir(tmp_path)
