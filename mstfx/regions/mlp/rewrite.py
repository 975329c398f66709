"""Rewrite: an MLP region becomes a loop of M mini-sequences that is recomputed in backward.

The tokens are flattened and split into M pieces, and the chunk outputs are joined.  Two forms
(``MstConfig.chunk_form``, chosen by :func:`mstfx.passes.recompute.chunk_form`):

* **Loop** (:func:`rewrite_mlp_looped`, the default): the region becomes one call of the
  ``mstfx::chunk_loop`` operator (:mod:`mstfx.chunk_loop`) on a registered chunk body; its forward
  keeps only the region input and its backward recomputes each chunk right before that chunk's
  gradient.  The graph has one node per region whatever M is, so Dynamo, AOT and Inductor work does
  not grow with M; the body runs op by op (the activation's pointwise ops are not fused).
* **Unrolled** (:func:`rewrite_mlp`): the region's nodes are copied once per chunk.
  Every copied node is tagged ``recompute = MUST_RECOMPUTE`` with its own ``ac_graph_id``, the tags
  ``torch.utils.checkpoint`` produces under ``torch.compile``; AOT autograd copies them onto the aten
  nodes it traces, so the min-cut partitioner saves only the region input and
  ``reordering_to_mimic_autograd_engine`` places each chunk's recompute right before that chunk's
  gradient.  The chunks are distinct nodes, so CSE cannot merge them back; Dynamo, AOT and Inductor
  work grows with M.  For the ``eager`` compiler each chunk runs under ``torch.utils.checkpoint``.
A third form, one body compiled once and called M times through ``invoke_subgraph`` (what
``torch.compiler.nested_compile_region`` lowers to), was measured and removed: a higher peak than the
unrolled form on the reference config (301 vs 269 MiB) and, with M call sites, compile work still
growing with M (about 5x plain Inductor's first step at M = 64).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ... import chunked_ops
from ...passes.common import is_view, mst_meta, split_dim, tensor_of
from ...passes.recompute import next_ac_graph_id
from .graph import MlpRegion

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
        env[node].meta.pop("example_value", None)  # full-size values of the original nodes
        env[node].meta.pop("val", None)
    graph.output(_flat_output(graph, env[region.output], region.output))
    return fx.GraphModule(owner, graph), externals


def loop_body(owner: fx.GraphModule, region: MlpRegion) -> tuple[fx.GraphModule, list[fx.Node]] | None:
    """The region as a chunk body for :mod:`mstfx.chunk_loop` (placeholders renamed ``x, p0, p1, ...`` so
    that every layer's MLP of the same structure is one body), or ``None`` when something it reads
    from outside is not a tensor (a symbolic size), which the loop operator cannot take, or it reads
    module state (an attribute or submodule) rather than only its inputs."""
    body, externals = extract_body(owner, region)
    if any(not isinstance(tensor_of(ext), torch.Tensor) for ext in externals):
        return None
    if any(n.op in ("get_attr", "call_module") for n in body.graph.nodes):
        return None  # state the content hash would not cover: two bodies could share one identifier
    for i, ph in enumerate(n for n in body.graph.nodes if n.op == "placeholder"):
        ph.name = ph.target = "x" if i == 0 else f"p{i - 1}"
    body.recompile()
    return body, externals


def rewrite_mlp_looped(gm: fx.GraphModule, region: MlpRegion, chunks: int) -> fx.Node | None:
    """Replace ``region`` by one ``mstfx::chunk_loop`` call (its body registered once); ``None`` (graph
    unchanged) when the region cannot become a loop body."""
    from ... import chunk_loop

    found = loop_body(gm, region)
    if found is None:
        return None
    body, externals = found
    ident = chunk_loop.register_body(body)
    graph = gm.graph
    x, sink = region.input, region.output
    with graph.inserting_before(sink):
        flat = graph.call_function(chunked_ops.flatten_tokens, (x,))
        looped = graph.call_function(torch.ops.mstfx.chunk_loop.default, (ident, chunks, flat, list(externals)))
        mst_meta(looped).update(region=region.name, chunks=chunks)
        result = graph.call_function(chunked_ops.restore_tokens, (looped, x))
    sink.replace_all_uses_with(result)
    for node in reversed(region.nodes):
        graph.erase_node(node)
    return result


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
        body_attr = f"mst_mlp_body_{next_ac_graph_id(gm.graph)}"
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
            ac_id = next_ac_graph_id(graph)
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
