"""The optional C module, ``twinproxy._speedups``, when it is built and wanted.

Owns the one decision: ``speedups`` is the module on CPython when the
install compiled it, and None on PyPy (whose JIT runs the pure-Python
code faster than it calls into C), without a compiler, or with
``TWINPROXY_PURE_PYTHON`` set in the environment.  The pure-Python code is
the reference everywhere; the C code only takes its common cases.
"""

from __future__ import annotations

import os
import platform
from typing import Any


def _load() -> Any:
    if platform.python_implementation() != "CPython" or os.environ.get("TWINPROXY_PURE_PYTHON"):
        return None
    try:
        from twinproxy import _speedups
    except ImportError:
        return None
    return _speedups


speedups = _load()
