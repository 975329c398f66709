"""Rewrite: an MLP region becomes a loop of M mini-sequences that is recomputed in backward.

The tokens are flattened and split into M views; the region's nodes are copied once per chunk and the
chunk outputs are concatenated.  Every copied node is tagged ``recompute = MUST_RECOMPUTE`` with its
own ``ac_graph_id``, the same tags ``torch.utils.checkpoint`` produces under ``torch.compile``.  AOT
autograd copies those tags onto the aten nodes it traces (they are in ``torch.fx.proxy``'s
``_COPY_META_FIELDS``), so the min-cut partitioner saves only the region input and recomputes each
chunk in backward, and its ``reordering_to_mimic_autograd_engine`` places each chunk's recompute right
before that chunk's gradient.  The chunks are distinct nodes, so the joint graph's CSE cannot merge
them back, and Inductor, which never fuses across a matmul, compiles each chunk body.
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .. import chunked_ops
from .common import MST_AC_GRAPH_ID_BASE, is_view, mst_meta, split_dim, tensor_of
from .find_mlp import MlpRegion

_ac_ids = itertools.count(MST_AC_GRAPH_ID_BASE)


def _copy_for_chunk(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    """Copy ``node`` so that it works on a [chunk_tokens, k] slice instead of the full tensor."""
    if is_view(node):
        out = tensor_of(node)
        return graph.call_method("reshape", (env[node.args[0]], -1, int(out.shape[-1])))
    new = graph.node_copy(node, lambda a: env.get(a, a))
    dim = split_dim(node)
    if dim is not None:  # chunk/split on the last dim: keep it the last dim of the 2-D chunk
        if "dim" in new.kwargs:
            new.kwargs = {**new.kwargs, "dim": -1}
        elif len(new.args) > 2:
            new.args = (*new.args[:2], -1, *new.args[3:])
    return new


def _flat_output(graph: fx.Graph, out: fx.Node, sink: fx.Node) -> fx.Node:
    """A chunk's copy of the region output as [chunk_tokens, k] (the sink may have been [B, S, k])."""
    val = tensor_of(sink)
    if val is not None and val.dim() != 2:
        return graph.call_method("reshape", (out, -1, int(val.shape[-1])))
    return out


def extract_body(owner: fx.GraphModule, region: MlpRegion) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The region as a standalone GraphModule ``body(x_chunk, *externals) -> y_chunk`` (2-D in, 2-D out)."""
    inside = set(region.nodes)
    externals: list[fx.Node] = []
    for node in region.nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg is not region.input and arg not in externals:
                externals.append(arg)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {region.input: graph.placeholder("x")}
    for ext in externals:
        env[ext] = graph.placeholder(ext.name)
    for node in region.nodes:
        env[node] = _copy_for_chunk(graph, node, env)
    graph.output(_flat_output(graph, env[region.output], region.output))
    return fx.GraphModule(owner, graph), externals


def rewrite_mlp(gm: fx.GraphModule, region: MlpRegion, chunks: int, *, eager: bool = False, in_checkpoint: bool = False) -> fx.Node:
    """Replace ``region`` by its chunked form; returns the node that now holds the region output.

    ``eager=False`` (for compilers) inlines each chunk with recompute tags.  ``eager=True`` calls each
    chunk through ``torch.utils.checkpoint``, the same schedule for code that runs op by op (the
    ``eager``/``aot_eager`` debug compilers and the FakeTensor memory simulation).
    """
    graph = gm.graph
    x, sink = region.input, region.output
    body_attr = None
    if eager:
        body, externals = extract_body(gm, region)
        body_attr = f"mst_mlp_body_{next(_ac_ids)}"
        gm.add_submodule(body_attr, body)
    with graph.inserting_before(sink):
        flat = graph.call_function(chunked_ops.flatten_tokens, (x,))
        pieces = graph.call_function(chunked_ops.split_tokens, (flat, chunks))
        body_node = graph.get_attr(body_attr) if eager else None
        outs = []
        for i in range(chunks):
            piece = graph.call_function(operator.getitem, (pieces, i))
            if eager:
                outs.append(graph.call_function(chunked_ops.checkpointed, (body_node, piece, *externals)))
                continue
            env = {x: piece}
            ac_id = next(_ac_ids)
            for node in region.nodes:
                new = _copy_for_chunk(graph, node, env)
                new.meta.pop("example_value", None)
                new.meta.pop("val", None)
                if not in_checkpoint:
                    new.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                    new.meta["ac_graph_id"] = ac_id
                mst_meta(new).update(region=region.name, chunk=i)
                env[node] = new
            outs.append(_flat_output(graph, env[sink], sink))
        joined = graph.call_function(torch.cat, (outs,))
        result = graph.call_function(chunked_ops.restore_tokens, (joined, x))
    sink.replace_all_uses_with(result)
    for node in reversed(region.nodes):
        graph.erase_node(node)
    return result
