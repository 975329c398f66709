"""Joint-graph pass: the inputs of checkpointed layers are marked for host offload.

With MsT and activation checkpointing what still grows with S on the GPU is the checkpoints
themselves: one tokens×hidden tensor per layer, kept from the forward to that layer's recompute.
AOT autograd can move saved tensors to host memory and back (``torch._functorch.config.
enable_activation_offloading``): after the partition it offloads every saved forward node whose
``meta["should_offload"]`` is set (``prims.device_put`` to the CPU after its last forward reader) and
reloads it in the backward before its first reader.  In torch 2.13 nothing sets that mark (the
``CheckpointPolicy.MUST_CPU_OFFLOAD`` policy exists but the partitioner does not read it), so this pass
sets it, on the joint graph before the partition (``joint_custom_pre_pass``), for exactly the
checkpoints: each forward tensor read by one user checkpointed region (HF ``gradient_checkpointing``
layers; mstfx's own per-chunk recompute tags are not checkpoints) and made outside it.  Tensors read by
several regions (rotary tables, a mask) stay on the GPU: offloading them would reload them per layer.

The partitioner offloads only what it saves, is contiguous and not a view; :func:`offloaded_nodes`
reads back what it did.
"""

from __future__ import annotations

import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from mstfx.passes.common import MST_AC_GRAPH_ID_BASE

from . import ChainedPass
from .checkpoint_outputs import backward_nodes

#: node-name prefixes AOT autograd gives its offload (forward) and reload (backward) nodes
OFFLOAD_PREFIX = "cpu_offload_"
RELOAD_PREFIX = "gpu_reload_"


def _user_region(node: fx.Node):
    """The id of the user's checkpointed region ``node`` belongs to (None outside, or in mstfx's own)."""
    if node.meta.get("recompute") is None:
        return None
    rid = node.meta.get("ac_graph_id")
    return rid if rid is not None and rid < MST_AC_GRAPH_ID_BASE else None


def mark_checkpoint_inputs(graph: fx.Graph) -> int:
    """Set ``should_offload`` on each forward tensor that exactly one user checkpointed region reads and
    that is made outside that region; returns how many nodes were marked."""
    backward = backward_nodes(graph)
    marked = 0
    for node in graph.nodes:
        if node in backward or node.op != "call_function":
            continue
        readers = {_user_region(u) for u in node.users if u not in backward and u.op != "output"}
        readers.discard(None)
        if len(readers) == 1 and _user_region(node) not in readers:
            node.meta["should_offload"] = True
            marked += 1
    return marked


def offloaded_nodes(forward: fx.GraphModule) -> list[fx.Node]:
    """The forward's offload nodes (``prims.device_put`` to the CPU, named by AOT autograd)."""
    return [n for n in forward.graph.nodes if n.op == "call_function" and n.name.startswith(OFFLOAD_PREFIX)]


def reloaded_nodes(backward: fx.GraphModule) -> list[fx.Node]:
    """The backward's reload nodes (``prims.device_put`` back to the device)."""
    return [n for n in backward.graph.nodes if n.op == "call_function" and n.name.startswith(RELOAD_PREFIX)]


class OffloadCheckpointInputsPass(ChainedPass):
    """The pass as Inductor's ``joint_custom_pre_pass`` (chained after the checkpoint-outputs pass)."""

    def run(self, graph: fx.Graph) -> None:
        mark_checkpoint_inputs(graph)
