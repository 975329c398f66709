"""Inductor post-grad pass: each bias gradient's reduction runs right after the gradient it sums.

A linear with a bias (GPT-2's ``Conv1D``, Qwen2's q/k/v projections, Phi and GPT-NeoX MLPs) gets its
bias gradient as a row sum of its output gradient, ``sum(dY, dim=0)``.  Inductor fuses that reduction
into whichever kernel suits its scheduler, which is not always soon after ``dY`` is made, and ``dY``
(tokens × output features) stays alive until that kernel runs:

* **chunked linears** (unrolled chunks, ``MstConfig(chunk_form="unrolled")``) get one row sum per
  chunk, which autograd adds up.  Inductor fuses the chunk's pointwise gradient (e.g. GELU's backward)
  into its reduction, then every chunk's reduction into the one kernel of their sum; that kernel can
  only run after the *last* chunk, so every chunk's I-wide gradient buffers were alive together and
  chunking did not shrink the MLP's backward (generated code for GPT-2, S = 4096, M = 8: 17 chunk×I
  buffers alive at once; 4 with this pass; the measured peaks are in docs/planning.md).
* **the first layer's q/k/v bias** (tied GPT-2 with checkpointing): Inductor fuses its row sum into
  the step's last kernel, the embedding's backward, so the S × 3h output gradient is alive while the
  vocab-sized embedding gradient is made, the step's peak (the measured peaks before and after are in
  docs/planning.md).

The pass replaces the row sums that are bias gradients — row sums of a 2-D tensor that a matmul also
reads (the output gradient a linear's input and weight gradients are made from), or that are added
together (the accumulation of a bias shared by several chunks) — by :func:`row_sum`, an opaque custom
op that Inductor calls as an extern kernel, in graph order, right after the gradient.  The value is
the same sum; only where it is computed changes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import DENSE_MATMULS, RESHAPES, ChainedPass, through

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


#: ops between a gradient and the matmul that reads it: reshapes and the weight gradient's transpose
_TO_MATMUL = RESHAPES | {aten.t.default, aten.permute.default}


def _read_by_matmul(x: fx.Node) -> bool:
    """Whether a matmul reads ``x`` (through reshapes and transposes): a linear's output gradient."""
    seen, todo = set(), [x]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in DENSE_MATMULS:
                return True
            if user.op == "call_function" and user.target in _TO_MATMUL:
                todo.append(user)
    return False


def bias_grad_row_sums(graph: fx.Graph) -> list[fx.Node]:
    """Row sums of a tensor a matmul also reads (the bias gradient beside the input/weight gradient),
    and the chunks' row sums of :func:`chunked_row_sums`, in graph order."""
    found = set(chunked_row_sums(graph))
    found.update(n for n in graph.nodes if _is_row_sum(n) and _read_by_matmul(through(n.args[0], RESHAPES)))
    return [n for n in graph.nodes if n in found]


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


def keep_bias_grads_with_their_gradients(graph: fx.Graph) -> int:
    """Rewrite the bias gradients' row sums into :func:`row_sum` calls; returns how many."""
    nodes = bias_grad_row_sums(graph)
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
        keep_bias_grads_with_their_gradients(graph)
