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
from torch.utils.checkpoint import CheckpointPolicy

from mstfx.passes.common import MST_AC_GRAPH_ID_BASE

from . import ChainedPass

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The joint graph's backward half: nodes AOT autograd traced in the backward (it tags them), and
    anything that depends on a tangent."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if (
            node.meta.get("partitioner_tag") == "is_backward"
            or node.meta.get("autograd_backward")
            or (node.op == "placeholder" and node.name.startswith("tangents"))
            or any(a in out for a in node.all_input_nodes)
        ):
            out.add(node)
    return out


def save_checkpoint_outputs(graph: fx.Graph) -> int:
    """Tag ``MUST_SAVE`` each forward node of a checkpointed region read by a forward node that does not
    lead back into that region (code after the region; decompositions also leave untagged nodes
    *inside* a region, which lead back into it); returns how many nodes were tagged."""
    backward = backward_nodes(graph)
    forward = [n for n in graph.nodes if n not in backward]
    region = {n: n.meta.get("ac_graph_id") for n in forward if n.meta.get("recompute") in _RECOMPUTE}
    leads_to: dict[fx.Node, frozenset] = {}  # regions reachable from a node through forward users
    for node in reversed(forward):
        ids: set = set()
        for user in node.users:
            if user in backward or user.op == "output":
                continue
            ids |= leads_to.get(user, frozenset())
            if user in region:
                ids.add(region[user])
        leads_to[node] = frozenset(ids)
    tagged = 0
    for node, rid in region.items():
        if rid is None or rid >= MST_AC_GRAPH_ID_BASE:
            continue
        if any(
            u not in region and u not in backward and u.op != "output" and rid not in leads_to[u]
            and not all(w in backward for w in u.users)  # a view kept only for the backward is not code after the region
            for u in node.users
        ):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            tagged += 1
    return tagged


class SaveCheckpointOutputsPass(ChainedPass):
    """The pass as Inductor's ``joint_custom_pre_pass``; runs ``then`` (a user's pass) after it."""

    def run(self, graph: fx.Graph) -> None:
        save_checkpoint_outputs(graph)
