"""The optional C accelerator (``_accel.c``), loaded once for every module that uses it.

``accel`` is the extension module, or None when it was not built, when the machine is
big-endian (the C code writes record headers in native order), or when
``SHMFEED_PURE_PYTHON=1`` asks for the Python path (the tests run both).
"""

from __future__ import annotations

import os
import sys
from typing import Any

PURE_PYTHON_ENV = "SHMFEED_PURE_PYTHON"


def _load() -> Any:
    if os.environ.get(PURE_PYTHON_ENV) or sys.byteorder != "little":
        return None
    try:
        from . import _accel  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _accel


accel: Any = _load()
