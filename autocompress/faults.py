"""Fault points for the fault drill (tests/test_fault_drill.py).

``AUTOCOMPRESS_FAULT=NAME:N`` SIGKILLs the process the N-th time it passes the point ``NAME``:
a kill at an exact moment (half-way through an atomic write, between a trial's measurement and
its record) that a timer would hit only by luck. Unset, as it always is for users, a point
costs one comparison.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("AUTOCOMPRESS_FAULT")
_passed: dict[str, int] = {}


def point(name: str) -> None:
    if _SPEC is None:
        return
    target, _, count = _SPEC.partition(":")
    if target != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
