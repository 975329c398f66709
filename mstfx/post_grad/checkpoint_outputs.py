"""Inductor joint-graph pass: the output of a checkpointed region is saved, as eager checkpointing does.

Under ``torch.compile`` every op of a ``torch.utils.checkpoint`` region is tagged for recompute, its
output included.  AOT autograd's partitioner saves the boundary between two consecutive checkpointed
regions, but the output of the *last* one (a decoder stack's last layer, read by the final norm) is
recomputed: the backward starts by re-running that whole layer to get it, and the MLP chunks of that
recompute stay alive until their own gradients, so the layer's MLP is rebuilt whole, not chunk by chunk
(measured on the captured backward: all M chunks' up-projections before the first chunk's gradient).
Eager checkpointing never recomputes a region's output: it is an ordinary tensor that its readers save.

This pass, run on the joint graph before the partition (``joint_custom_pre_pass``), tags every
forward node of a user's checkpointed region that is read by forward code outside checkpointed
regions ``MUST_SAVE`` (mstfx's own per-chunk recompute tags are left alone: a chunk's output is
concatenated outside its region by design): one tokens×hidden tensor saved, and each checkpointed layer's recompute happens
just before its own backward, one MLP chunk at a time.
"""

from __future__ import annotations

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy

from mstfx.passes.common import MST_AC_GRAPH_ID_BASE

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def _backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on a tangent (the joint graph's backward half)."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def save_checkpoint_outputs(graph: fx.Graph) -> int:
    """Tag recompute-tagged forward nodes read by untagged forward nodes ``MUST_SAVE``; returns how many."""
    backward = _backward_nodes(graph)
    tagged = 0
    for node in graph.nodes:
        if node in backward or node.meta.get("recompute") not in _RECOMPUTE:
            continue
        if node.meta.get("ac_graph_id", 0) >= MST_AC_GRAPH_ID_BASE:
            continue
        if any(u not in backward and u.op != "output" and u.meta.get("recompute") not in _RECOMPUTE for u in node.users):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            tagged += 1
    return tagged


class SaveCheckpointOutputsPass(CustomGraphPass):
    """The pass as Inductor's ``joint_custom_pre_pass``; runs ``then`` (a user's pass) after it."""

    def __init__(self, then: CustomGraphPass | None = None) -> None:
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        save_checkpoint_outputs(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        own = get_hash_for_files((__file__,))
        if self.then is None:
            return own
        inner = self.then.uuid() if hasattr(self.then, "uuid") else None
        return None if inner is None else (own, inner)
