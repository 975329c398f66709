"""Report: what the mst backend found, chunked or left alone in each graph, and why."""

from __future__ import annotations

from typing import Any


def explain(target: Any = None, *, last: int | None = None) -> str:
    """The report of the graphs compiled so far, as text.

    ``target`` may be an :class:`~mstfx.MstBackend` (its own graphs), a model or function compiled by
    :func:`mstfx.compile` (its backend's graphs) or ``None`` (every graph compiled by any mst backend in
    this process).  ``last`` keeps only the newest N graph reports.
    """
    from .backend import REPORTS, MstBackend
    from .compile_model import backend_of

    if backend_of(target) is not None:
        target = backend_of(target)
    if target is None:
        reports = list(REPORTS)
    elif isinstance(target, MstBackend):
        reports = list(target.reports)
    else:
        raise TypeError(f"explain() takes an MstBackend, a model compiled by mstfx.compile or None, not {type(target).__name__}")
    if last is not None:
        from .config import positive_int

        reports = reports[-positive_int("last", last):]  # (last=0 would have meant every report)
    if not reports:
        return "mstfx: no graph has been compiled by the mst backend yet (run one step first)"
    return "\n\n".join(str(r) for r in reports)
