"""Fault injection for crash tests: ``INTERP_FAULT=point:n`` SIGKILLs the process at a named point.

Crash-safe code calls :func:`fault` at the moments a crash is most dangerous (a shard's files
renamed but not yet listed in the manifest, a checkpoint's state written but not committed, a stage
finished but the next not started). Unless the environment names that point, the call does nothing
but one dictionary lookup. ``INTERP_FAULT`` holds comma-separated ``point:n`` items: the process
kills itself with SIGKILL (no cleanup, no ``finally``, like a pre-empted job) on the ``n``-th call
of ``point``; ``point:n:INT`` sends SIGINT instead (a Ctrl-C at exactly that moment). Tests set it
on subprocesses; users never need it.
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault", "FAULT_ENV"]

FAULT_ENV = "INTERP_FAULT"

_calls: dict[str, int] = {}


def _plan() -> dict[str, tuple[int, signal.Signals]]:
    """``{point: (n, signal)}`` from ``$INTERP_FAULT`` (malformed items are ignored: this is a test hook)."""
    plan = {}
    for item in os.environ.get(FAULT_ENV, "").split(","):
        sig = signal.SIGKILL
        if item.strip().endswith(":INT"):
            item, sig = item.strip()[: -len(":INT")], signal.SIGINT
        point, _, n = item.strip().rpartition(":")
        if point and n.isdigit():
            plan[point] = (int(n), sig)
    return plan


def fault(point: str) -> None:
    """Count one pass through ``point``; signal this process if ``$INTERP_FAULT`` names this pass."""
    if FAULT_ENV not in os.environ:
        return
    _calls[point] = _calls.get(point, 0) + 1
    n, sig = _plan().get(point, (0, signal.SIGKILL))
    if n == _calls[point]:
        os.kill(os.getpid(), sig)
