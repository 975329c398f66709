"""Profiler and memory-tracking internals, used by the measuring and simulation tools only (never on
the compile path): the profiler's allocation event type and ``MemTracker``.

Every entry imports torch's internals when called, never when this module is imported, so
``import mstfx`` does not pull ``torch.distributed._tools``.  Checked on torch 2.13.0 and 2.14.1
(``mstfx.compat.CHECKED_ON``); a missing entry raises :class:`mstfx.compat.MissingTorchAPI`.
"""

from __future__ import annotations

from typing import Any

from .errors import private


def allocation_event_type() -> Any:
    """``torch._C._profiler._EventType.Allocation``: the kind of event in the profiler's event tree
    (``kineto_results.experimental_event_tree()``) that records an allocation or a free; the measured
    peak is summed from these."""
    return private("torch._C._profiler", "_EventType", used_for="peak memory from the profiler's events").Allocation


def mem_tracker_api() -> tuple[type, Any]:
    """``(MemTracker, _MemRefType)`` of ``torch.distributed._tools.mem_tracker``: the tracker that follows
    every allocation and free of a step on fake tensors, and the keys of its snapshots (``PARAM``,
    ``GRAD``, ...).  The simulator subclasses the tracker to keep only global peaks (it overrides
    ``_update_peak_stats`` and reads ``_curr_mem_snap``, both private to it)."""
    used_for = "the memory simulation"
    return (private("torch.distributed._tools.mem_tracker", "MemTracker", used_for=used_for),
            private("torch.distributed._tools.mem_tracker", "_MemRefType", used_for=used_for))
