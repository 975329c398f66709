"""Every private PyTorch API mstfx uses, in one place, with the torch versions it was checked on.

A private API (``torch._dynamo``, ``torch._inductor``, ``torch._functorch``, ``torch._C._...``, a
``_name`` of a torch class) has no stability promise: a torch release may move or drop it.  mstfx
reaches such APIs only through this package, so a new torch release is checked here and nowhere else
(``tests/graph/test_private_apis.py`` fails on any other module that touches one).  Each entry is a
small function or name whose docstring says what it is, why mstfx needs it and what happens when it is
missing: :class:`MissingTorchAPI` naming it, or a documented fallback.  Checked on :data:`CHECKED_ON`
(docs/compatibility.md, "Private PyTorch APIs", lists them).

By concern:

* :mod:`.dynamo`: the tracing settings of checkpointed layers (re-exported here), graph-break and
  ``mstfx`` counters, compiler registry, tracing context, fake-mode detection, compile times;
* :mod:`.inductor`: config, ``compile_fx``, custom-pass base, and the simulation's joint passes,
  decompositions, lowering tables and realize thresholds;
* :mod:`.functorch`: AOT autograd's config (offloading, memory budget), entry point, partitioner, rng
  wrappers, fake tensors, ``OpOverload``, autograd inside a custom operator's kernel;
* :mod:`.memory`: the profiler's allocation events and ``MemTracker`` (tools only);
* :mod:`.distributed`: DDP's graph splitting in Dynamo, functional all-to-all;
* :mod:`.ops`: the ``torch._C`` bindings the passes match operators by.

Importing this package imports no torch internals (only :mod:`.ops` imports torch at import time, and
only the passes import it); the tools-only entries import theirs when called.
"""

from __future__ import annotations

from .dynamo import (
    CHECKPOINT_BREAK_MARKERS,
    first_line,
    graph_break_counts,
    graph_breaks_since,
    is_checkpoint_break,
    meta_autocast_traced_as_cpu,
    tracing_settings,
    with_tracing_settings,
)
from .errors import CHECKED_ON, MissingTorchAPI


__all__ = [
    "CHECKED_ON",
    "CHECKPOINT_BREAK_MARKERS",
    "MissingTorchAPI",
    "first_line",
    "graph_break_counts",
    "graph_breaks_since",
    "is_checkpoint_break",
    "meta_autocast_traced_as_cpu",
    "tracing_settings",
    "with_tracing_settings",
]
