"""Inductor post-grad pass: each chunk's bias-gradient reduction runs with its chunk (unrolled chunks:
``MstConfig(chunk_form="unrolled")``; the default loop operator sums its chunks' gradients itself).

A chunked linear with a bias (GPT-2's ``Conv1D``, Phi, GPT-NeoX MLPs) gets one bias gradient per
chunk, ``sum(dY_k, dim=0)``, which autograd adds up.  Inductor fuses the chunk's pointwise gradient
(e.g. GELU's backward) into that reduction, then every chunk's reduction into the one kernel of their
sum; that kernel can only run after the *last* chunk, and the chunks' gradient matmuls wait for it.
So every chunk's I-wide gradient buffers were alive together and chunking did not shrink the MLP's
backward (generated code for GPT-2, S = 4096, M = 8: 17 chunk×I buffers alive at once; 4 with this
pass; measured peak 371 → 325 MB).

The pass replaces such row sums (row sums over 2-D tensors that are added together: the gradient
accumulation of a parameter used by several chunks) by :func:`row_sum`, an opaque custom op that
Inductor calls as an extern kernel, in graph order, right after its chunk's gradient.  The value is
the same sum; only where it is computed changes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import RESHAPES, ChainedPass, through

aten = torch.ops.aten


@torch.library.custom_op("mstfx::row_sum", mutates_args=())
def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(0, keepdim=True)`` for a 2-D ``x``, as an op Inductor does not fuse."""
    return x.sum(0, keepdim=True)


@row_sum.register_fake
def _(x):
    return x.new_empty((1, x.shape[1]))


_ADDS = {aten.add.Tensor, operator.add}


def _is_row_sum(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target != aten.sum.dim_IntList or node.kwargs.get("dtype") is not None:
        return False
    x = node.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    dims = list(node.args[1]) if len(node.args) > 1 else []
    return isinstance(val, torch.Tensor) and val.dim() == 2 and dims in ([0], [-2]) and len(node.args) <= 3


def chunked_row_sums(graph: fx.Graph) -> list[fx.Node]:
    """Row sums accumulated by additions of row sums (through views): one per chunk of a biased linear."""
    accumulation: set[fx.Node] = set()
    found: dict[fx.Node, None] = {}
    for node in graph.nodes:
        if _is_row_sum(node):
            accumulation.add(node)
        elif node.op == "call_function" and node.target in _ADDS and len(node.args) >= 2:
            a, b = through(node.args[0], RESHAPES), through(node.args[1], RESHAPES)
            if a in accumulation and b in accumulation:
                accumulation.add(node)
                found.update({x: None for x in (a, b) if _is_row_sum(x)})
    return list(found)


def keep_bias_grads_with_their_chunks(graph: fx.Graph) -> int:
    """Rewrite the chunks' row sums into :func:`row_sum` calls; returns how many."""
    nodes = chunked_row_sums(graph)
    for node in nodes:
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        x = node.args[0]
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.mstfx.row_sum.default, (x,))
            new.meta["val"] = x.meta["val"].sum(0, keepdim=True)
            if not keepdim:
                new = graph.call_function(aten.squeeze.dim, (new, 0))
                new.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    return len(nodes)


class BiasGradOrderPass(ChainedPass):
    """The pass as Inductor's ``post_grad_custom_post_pass``; runs ``then`` (a user's pass) after it."""

    def run(self, graph: fx.Graph) -> None:
        keep_bias_grads_with_their_chunks(graph)
