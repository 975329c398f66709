"""Inductor post-grad pass: each chunk's partial gradient is added to the running sum with its chunk
(chunks unrolled in the graph: routed experts, and MLPs with ``chunk_form="unrolled"``).

Chunked routed experts run the stacked expert weights ``[E, ...]`` through grouped matmuls once per
chunk, so backward gets one partial gradient of those weights per chunk (and the partials of any
other tensor the chunks share), which autograd adds up in a chain of ``aten.add``.  Inductor inlines
pointwise adds and fuses the whole chain into one kernel; that kernel can only run after the *last*
chunk, so all M partials are alive together (tiny Mixtral, S = 4096, M = 8: 8 copies of the experts'
weight gradient at the end of each layer's backward; a real Mixtral in bf16 holds 2.8 GB per copy
per layer).  Dense MLPs do not suffer this for their weights: Inductor's post-grad ``addmm`` pattern
already turns each ``add(mm, acc)`` into one ``addmm`` per chunk, so those chains never reach here as
adds.

The pass finds chains of ``aten.add.Tensor`` (through views) that sum at least
:data:`MIN_TERMS` terms, each the output of a non-pointwise producer (a batched or grouped matmul, or an
extern or custom op: what Inductor cannot fuse into the sum anyway), and replaces every add of the chain by
:func:`accumulate`, an opaque custom op that Inductor calls as an extern kernel, in graph order,
placed right after the later of its two inputs.  Then at most the running sum, one partial and the
new sum are alive.  The values are the same sums in the same order; only when they are computed
changes.  Chains of pointwise terms (a chunk's input gradient scattered into the whole sequence by
``slice_scatter``) are left to Inductor: fused, they read each chunk's small gradient once, while
materialized, each term would be a whole-sequence buffer.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..compat.functorch import is_op_overload
from . import BATCHED_MATMULS, RESHAPES, ChainedPass, through

aten = torch.ops.aten

#: the fewest terms a chain must sum to be rewritten: two partials summed once fuse without harm
MIN_TERMS = 3


@torch.library.custom_op("mstfx::accumulate", mutates_args=())
def accumulate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` for two tensors of one shape and dtype, as an op Inductor does not fuse."""
    return a + b


@accumulate.register_fake
def _(a, b):
    return a + b


_VIEWS = RESHAPES | {aten.unsqueeze.default}
#: aten producers that Inductor lowers to extern (matmul) kernels rather than fusable loops.  Plain
#: ``mm`` / ``addmm`` are not among them: Inductor's own ``addmm`` pattern already sums a chain of
#: them one matmul at a time (a dense weight's gradient), and where it leaves one (the attention's
#: q/k/v input gradient, three terms) the fused sum reads each term once and costs nothing extra
_EXTERN_PRODUCERS = (BATCHED_MATMULS | {aten.convolution.default, aten.convolution_backward.default}
                     | ({aten._scaled_mm.default} if hasattr(aten, "_scaled_mm") else set()))


def _is_partial(node) -> bool:
    """The output of a matmul or of an extern/custom op (through ``getitem`` for a tuple's)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        node = node.args[0]
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
    target = node.target
    if target in _EXTERN_PRODUCERS:
        return True
    return is_op_overload(target) and target.namespace not in ("aten", "prims")


def _is_plain_add(node: fx.Node) -> bool:
    """``a + b`` of two tensors of the result's shape and dtype (no broadcast, no alpha, no promotion)."""
    if node.op != "call_function" or node.target != aten.add.Tensor or len(node.args) != 2:
        return False
    if node.kwargs.get("alpha", 1) != 1:
        return False
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    for arg in node.args:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.shape != out.shape or val.dtype != out.dtype:
            return False
    return True


def partial_sum_chains(graph: fx.Graph) -> list[fx.Node]:
    """The adds (in graph order) of every chain that sums at least :data:`MIN_TERMS` partials."""
    terms: dict[fx.Node, int] = {}  # add in a chain of partials -> how many partials it sums
    operands: dict[fx.Node, tuple] = {}
    for node in graph.nodes:
        if not _is_plain_add(node):
            continue
        parts = [through(a, _VIEWS) for a in node.args]
        if all(p in terms or _is_partial(p) for p in parts):
            terms[node] = sum(terms.get(p, 1) for p in parts)
            operands[node] = tuple(p for p in parts if p in terms)
    chosen: set[fx.Node] = set()
    stack = [n for n, t in terms.items() if t >= MIN_TERMS]
    while stack:
        node = stack.pop()
        if node not in chosen:
            chosen.add(node)
            stack.extend(operands[node])
    return [n for n in graph.nodes if n in chosen]


def sum_partials_with_their_chunks(graph: fx.Graph) -> int:
    """Rewrite the chains' adds into :func:`accumulate` calls, each placed right after the later of its
    two inputs; returns how many."""
    adds = partial_sum_chains(graph)
    if not adds:
        return 0
    position = {n: float(i) for i, n in enumerate(graph.nodes)}
    origin: dict[fx.Node, fx.Node] = {}  # an inserted node -> the original node it follows
    tail: dict[fx.Node, fx.Node] = {}  # an original node -> the last node inserted after it
    for node in adds:
        a, b = node.args
        anchor = max((a, b), key=lambda x: position[x])
        base = origin.get(anchor, anchor)
        after = tail.get(base, base)
        with graph.inserting_after(after):
            new = graph.call_function(torch.ops.mstfx.accumulate.default, (a, b))
        new.meta["val"] = node.meta["val"]
        position[new] = position[after] + (position[base] + 1 - position[after]) / 2
        origin[new], tail[base] = base, new
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    return len(adds)


class PartialSumOrderPass(ChainedPass):
    """The pass as Inductor's ``post_grad_custom_post_pass``; runs ``then`` (the bias-gradient pass, then
    a user's pass) after it."""

    def run(self, graph: fx.Graph) -> None:
        sum_partials_with_their_chunks(graph)
