"""Rewrite: LM head + cross-entropy becomes one call of the fused, chunked linear cross-entropy.

The loss node is replaced by :func:`chunked_ops.linear_cross_entropy` on the flattened hidden states,
the head weight (and bias) and the flattened targets.  The old logits chain becomes dead and is
removed, unless the logits escape the graph, in which case it stays for that user only.  Only the
nodes that this rewrite made dead are removed (``erase_if_dead``), never a side-effecting node:
a whole-graph ``eliminate_dead_code()`` would delete in-place writes and vmap/autocast context
nodes whose results are unused but whose effects are not.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ... import chunked_ops
from ...passes.common import erase_if_dead, mst_meta
from .graph import LmHeadRegion


def rewrite_lm_head(graph: fx.Graph, region: LmHeadRegion, chunks: int, needs: list[bool] | None = None) -> fx.Node:
    """``needs`` (which of h, W, b need a gradient): given, the loss becomes one call of the opaque
    ``mstfx::linear_cross_entropy_loop`` operator (compile work independent of M); ``None``: the
    autograd function, which Dynamo/AOT trace chunk by chunk."""
    ce = region.loss
    with graph.inserting_before(ce):
        h = graph.call_function(chunked_ops.flatten_tokens, (region.head.input,))
        target = graph.call_method("reshape", (region.target, -1))
        if needs is not None:
            call = graph.call_function(
                torch.ops.mstfx.linear_cross_entropy_loop.default,
                (h, region.head.weight, region.head.bias, target, region.ignore_index, region.reduction,
                 chunked_ops.encode_transforms(region.transforms), chunks, list(needs)),
            )
            loss = graph.call_function(operator.getitem, (call, 0))
        else:
            loss = graph.call_function(
                chunked_ops.linear_cross_entropy,
                (h, region.head.weight, region.head.bias, target),
                {
                    "ignore_index": region.ignore_index,
                    "reduction": region.reduction,
                    "transforms": region.transforms,
                    "chunks": chunks,
                },
            )
    loss.meta.update({k: v for k, v in ce.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    mst_meta(loss).update(region=region.name, chunks=chunks)
    ce.replace_all_uses_with(loss)
    old_inputs = ce.all_input_nodes
    graph.erase_node(ce)
    erase_if_dead(graph, old_inputs)  # the logits chain, unless the logits escape (never a side effect)
    return loss
