"""How a chunked region is recomputed in backward, shared by every region kind's rewrite: the form its
chunks take (one loop operator, or unrolled copies with recompute tags; ``MstConfig.chunk_form``) and
the ``ac_graph_id`` of each chunk's recompute tags.

The ids are counted per graph (a weak map, so a graph's counter goes with the graph): AOT autograd
reads them within one graph, where no two chunks may share one; they start at
:data:`~.common.MST_AC_GRAPH_ID_BASE`, above the ids Dynamo gives the model's own checkpoints.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.fx as fx

from ..vocabulary import ChunkForm
from .common import MST_AC_GRAPH_ID_BASE

_ac_ids: "weakref.WeakKeyDictionary[fx.Graph, itertools.count]" = weakref.WeakKeyDictionary()


def next_ac_graph_id(graph: fx.Graph) -> int:
    """A fresh ``ac_graph_id`` in ``graph`` for one chunk's recompute tags (every region kind draws
    from the graph's one counter, so no two chunks of a graph share an id)."""
    counter = _ac_ids.get(graph)
    if counter is None:
        counter = _ac_ids[graph] = itertools.count(MST_AC_GRAPH_ID_BASE)
    return next(counter)


def _enter_changes_state(enter: fx.Node) -> bool:
    """Whether the autocast context ``enter`` opens (``_enter_autocast(device_type, dtype, enabled,
    cache_enabled)``) changes the state its ops would see without it.  Disabling autocast changes
    nothing when autocast is off for that device around the graph (Dynamo guards on that state, so the
    backend sees the one the graph runs under); any enabled context counts as a change."""
    args = list(enter.args) + [None] * (4 - len(enter.args))
    device = enter.kwargs.get("device_type", args[0])
    enabled = enter.kwargs.get("enabled", args[2] if len(enter.args) > 2 else True)
    if enabled is False and isinstance(device, str):
        try:
            return bool(torch.is_autocast_enabled(device))
        except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
            return True
    return True


def under_changed_autocast(graph: fx.Graph, nodes) -> bool:
    """Whether any of ``nodes`` (of ``graph``) runs inside an in-graph autocast context that changes
    the autocast state (:func:`_enter_changes_state`).

    A loop operator's backward recomputes its chunks when autograd runs it, under whatever autocast
    state holds then (that of the caller, as for the rest of the graph), not the state of a context
    inside the graph, so a region under such a context keeps the unrolled form, whose recompute AOT
    autograd traces with the forward's casts.  Contexts elsewhere in the graph do not matter:
    transformers 4.57's rotary embedding runs under ``torch.autocast(device_type, enabled=False)``
    beside every layer, and the MLPs and the LM head outside it keep the loop form."""
    targets, active = set(nodes), []
    for node in graph.nodes:
        if node in targets and any(_enter_changes_state(e) for e in active):
            return True
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name == "_enter_autocast":
            active.append(node)
        elif name == "_exit_autocast" and node.args and node.args[0] in active:
            active.remove(node.args[0])
    return False


def chunk_form(config, in_checkpoint: bool, changed_autocast: bool = False) -> tuple[ChunkForm, str]:
    """The form an MLP's chunks take (``config.chunk_form``, a :class:`~mstfx.vocabulary.ChunkForm`) and
    the report's words for it.  The ``eager`` compiler runs each chunk under
    ``torch.utils.checkpoint`` (unrolled copies of that call).  ``changed_autocast``: the region runs
    under an in-graph autocast context that changes the state (:func:`under_changed_autocast`)."""
    form = ChunkForm.parse(getattr(config, "chunk_form", ChunkForm.UNROLLED))
    if config.compiler == "eager":
        return ChunkForm.UNROLLED, ""
    if form is ChunkForm.LOOP:
        if changed_autocast:
            return ChunkForm.UNROLLED, "; unrolled M copies (autocast in the graph changes its state)"
        return ChunkForm.LOOP, "; one loop operator"
    return ChunkForm.UNROLLED, ""
    if form == "loop":
        if changed_autocast:
            return "unrolled", "; unrolled M copies (autocast in the graph changes its state)"
        return "loop", "; one loop operator"
    return "unrolled", ""
