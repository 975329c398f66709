"""Graph side of the routed-experts kind: finding the region on the torch-level graph and its chunked
rewrite (torch and FX; imported only when a graph is compiled)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ... import chunked_ops
from ...passes.common import (
    CantChunk,
    has_side_effects,
    is_cast,
    is_last_dim_getitem,
    is_pointwise,
    is_view,
    module_path,
    mst_meta,
    side_effect_between,
    split_dim,
    stacked_weight,
    tensor_of,
    token_free_nodes,
)
from ...passes.recompute import next_ac_graph_id

#: functions that make a fresh buffer: a write into one made inside the region is the region's own
_FACTORIES = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty, torch.zeros,
              torch.ones, torch.full, torch.arange}
_FACTORY_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full"}
#: in-place writes allowed into a region-made buffer
_WRITES = {operator.setitem}
_WRITE_METHODS = {"__setitem__", "index_put_", "scatter_", "copy_", "fill_", "zero_"}
#: ops that mix token slots but are how routing is made: sort the slot indices, count per expert
_ROUTING_FUNCS = {torch.sort, torch.argsort, torch.histc, torch.bincount, torch.cumsum, operator.floordiv}
_ROUTING_METHODS = {"sort", "argsort", "histc", "bincount", "cumsum", "unsqueeze", "squeeze", "float", "int", "long"}
_SORTS = {torch.sort, torch.argsort, "sort", "argsort"}
_CUMSUMS = {torch.cumsum, "cumsum"}


@dataclass
class ExpertsRegion:
    """One routed-experts region: ``nodes`` in graph order, ending at ``output`` ([T, h])."""

    inputs: list[fx.Node]
    output: fx.Node
    nodes: list[fx.Node]
    grouped_mms: list[fx.Node]
    tokens: int
    hidden: int
    top_k: int
    experts: int
    width: int  # the widest expert matmul output per slot (gate and up projections together)
    dtype: torch.dtype
    name: str = ""
    extra: dict = field(default_factory=dict)


def _is_grouped_mm(node: fx.Node, params: set, free: set) -> bool:
    """A token-dependent op that multiplies by a stacked ``[experts, ...]`` parameter."""
    if node.op not in ("call_function", "call_method") or node in free:
        return False
    args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    return any(a not in free for a in args) and any(stacked_weight(a, params) is not None for a in args)


def _is_sum_over_k(node: fx.Node) -> bool:
    """``t.sum(dim=1)`` of a [T, k, h] tensor: the experts' outputs of each token added up."""
    if not ((node.op == "call_method" and node.target == "sum") or (node.op == "call_function" and node.target is torch.sum)):
        return False
    src, out = tensor_of(node.args[0]) if node.args else None, tensor_of(node)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if src is None or out is None or src.dim() != 3 or out.dim() != 2:
        return False
    return dim in (1, -2, (1,), [1]) and not node.kwargs.get("keepdim", False)


def _output_after(gmm: fx.Node, order: dict) -> fx.Node:
    """The first sum over the k token slots that the grouped matmul ``gmm`` feeds."""
    seen, stack, sums = set(), [gmm], []
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_sum_over_k(user):
                sums.append(user)
            else:
                stack.append(user)
    if not sums:
        raise CantChunk("no sum over the top-k slots after the expert matmul (not a routed-experts layer)")
    return min(sums, key=order.__getitem__)


def _descendants(starts: list[fx.Node], stop: int, order: dict) -> set[fx.Node]:
    """Nodes computed from ``starts`` that come before position ``stop``."""
    seen, stack = set(), list(starts)
    while stack:
        for user in stack.pop().users:
            if user not in seen and order[user] < stop:
                seen.add(user)
                stack.append(user)
    return seen


def _allowed(node: fx.Node, gmms: set, tokens: int, top_k: int) -> bool:
    """An op routed experts are made of (everything else leaves the region unchanged).  The ops that
    mix token slots are held to what routing does with them, which a run of tokens reproduces on its
    own: a sort of the flat [T·k] slot indices (undone before the output), a running sum of per-expert
    counts (never over tokens: capacity-limited routing, whose drops depend on earlier tokens, is
    left alone)."""
    src = tensor_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if node.target in _SORTS:
        return src is not None and src.dim() == 1 and src.shape[0] == tokens * top_k
    if node.target in _CUMSUMS:
        return src is not None and src.dim() == 1 and src.shape[0] % tokens != 0
    if node in gmms or is_pointwise(node) or is_cast(node) or is_view(node) or split_dim(node) == -1:
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        return _getitem_ok(node)
    if node.op == "call_function":
        return node.target in _ROUTING_FUNCS or node.target in _FACTORIES
    if node.op == "call_method":
        return node.target in _ROUTING_METHODS or node.target in _FACTORY_METHODS
    return False


def _getitem_ok(node: fx.Node) -> bool:
    """An element of a tuple (a sort's or a split's outputs), a last-dim slice, or a gather by an index
    tensor (the slot permutation, made inside the region: checked by the caller's closure).  A slice
    along the tokens (a shift) would mix runs: not allowed."""
    src, index = node.args[0], node.args[1]
    if isinstance(index, int):
        return tensor_of(src) is None
    if isinstance(index, fx.Node):
        return True
    return is_last_dim_getitem(node)


def _is_factory(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _FACTORIES) or (
        node.op == "call_method" and node.target in _FACTORY_METHODS
    )


def _is_local_write(node: fx.Node, region: set) -> bool:
    """An in-place write whose target is a buffer made inside the region (its only side effect)."""
    is_write = (node.op == "call_function" and node.target in _WRITES) or (
        node.op == "call_method" and node.target in _WRITE_METHODS
    )
    target = node.args[0] if node.args else None
    return is_write and isinstance(target, fx.Node) and target in region and _is_factory(target)


def _token_leading(node: fx.Node, tokens: int) -> bool:
    val = tensor_of(node)
    return val is not None and val.dim() >= 1 and val.shape[0] == tokens


def _region_from(out: fx.Node, gmms_in: list[fx.Node], params: set, free: set, order: dict) -> ExpertsRegion:
    """The region that ends at ``out``, fed by the expert matmuls ``gmms_in`` (those whose first sum
    over the slots is ``out``)."""
    src = tensor_of(out.args[0])
    tokens, top_k, hidden = src.shape
    if not all(isinstance(d, int) for d in (tokens, top_k, hidden)):
        raise CantChunk("a dynamic token count (routed experts are chunked at static shapes only)")
    if top_k < 2:
        raise CantChunk("top-1 routing: a token and its slot have the same count, the inputs cannot be told apart")
    from_experts = _descendants(gmms_in, order[out], order)
    region: set[fx.Node] = set()
    inputs: list[fx.Node] = []

    def close(starts: list[fx.Node]) -> None:
        """Everything ``starts`` need, back to token-major tensors made before the experts (inputs)."""
        stack = list(starts)
        while stack:
            node = stack.pop()
            if node in region or node in free or node in inputs:
                continue
            if node is not out and node not in from_experts and _token_leading(node, tokens):
                inputs.append(node)
                continue
            if node.op in ("placeholder", "get_attr"):
                raise CantChunk(f"the experts read {node.name}, which is not split by tokens")
            region.add(node)
            stack.extend(node.all_input_nodes)

    close([out])
    # the one side effect allowed: writes into a buffer the region made (the inverse permutation)
    for node in list(region):
        if _is_factory(node):
            for user in node.users:
                if user not in region and _is_local_write(user, region):
                    close([user])
    nodes = sorted(region, key=order.__getitem__)
    gmms = {n for n in nodes if _is_grouped_mm(n, params, free)}
    if not gmms:
        raise CantChunk("no expert matmul inside the region")
    for node in nodes:
        if node.op not in ("call_function", "call_method"):
            raise CantChunk(f"{node.name}: unsupported node kind {node.op}")
        if has_side_effects(node) and not _is_local_write(node, region):
            raise CantChunk(f"{node.name} ({getattr(node.target, '__name__', node.target)}) has side effects")
        if node is not out and not _allowed(node, gmms, tokens, top_k) and not _is_local_write(node, region):
            raise CantChunk(f"{node.name} ({getattr(node.target, '__name__', node.target)}) is not an op routing is made of")
        if node is not out:
            outside = [u for u in node.users if u not in region]
            if outside:
                raise CantChunk(f"{node.name} is also used by {outside[0].name} outside the experts")
        _check_constants(node, tokens, top_k)
    if not inputs:
        raise CantChunk("no token-major input")
    if _descendants(nodes, order[out], order) & set(inputs):
        raise CantChunk("an input is computed from the region itself")
    crossed = side_effect_between(nodes[0], out, region)
    if crossed is not None:
        raise CantChunk(f"{crossed.name} has side effects and lies inside the region")
    weights = [stacked_weight(a, params) for g in gmms for a in (*g.args, *g.kwargs.values()) if isinstance(a, fx.Node)]
    experts = next(int(tensor_of(w).shape[0]) for w in weights if w is not None)
    xv = tensor_of(inputs[0])
    return ExpertsRegion(
        inputs=sorted(inputs, key=order.__getitem__),
        output=out,
        nodes=nodes,
        grouped_mms=sorted(gmms, key=order.__getitem__),
        tokens=int(tokens),
        hidden=int(hidden),
        top_k=int(top_k),
        experts=experts,
        width=max(int(tensor_of(g).shape[-1]) for g in gmms),
        dtype=xv.dtype if xv is not None else src.dtype,
        name=module_path(gmms_in[0]) or gmms_in[0].name,
    )


def _check_constants(node: fx.Node, tokens: int, top_k: int) -> None:
    """Shape constants that hold the token count must be ones the rewrite can resize: a view's leading
    dim, a factory's size.  Any other int equal to T or T·k is ambiguous: the region is left alone."""
    if is_view(node):
        val = tensor_of(node)
        if val is None or val.dim() < 1 or val.shape[0] % tokens or not all(isinstance(d, int) for d in val.shape[1:]):
            raise CantChunk(f"{node.name}: a view whose leading dim is not a multiple of the tokens")
        return
    if _is_factory(node):
        nested = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, (tuple, list))]
        if any(isinstance(d, int) and d >= tokens and d % tokens == 0 for seq in nested for d in seq):
            raise CantChunk(f"{node.name}: a buffer sized by the tokens in a shape tuple")
        return
    ints = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
    if tokens > top_k and any(a in (tokens, tokens * top_k) for a in ints):
        raise CantChunk(f"{node.name} holds the token count as a constant")


def _copy_for_run(graph: fx.Graph, node: fx.Node, env: dict, tokens: int, run: int) -> fx.Node:
    """``node`` for a run of ``run`` tokens: views keep their trailing dims, factories are resized."""
    if is_view(node):
        val = tensor_of(node)
        return graph.call_method("reshape", (env[node.args[0]], -1, *(int(d) for d in val.shape[1:])))
    new = graph.node_copy(node, lambda a: env.get(a, a))
    if node.op == "call_function" and node.target in _FACTORIES:
        new.args = tuple(a // tokens * run if isinstance(a, int) and not isinstance(a, bool) and a >= tokens and a % tokens == 0
                         else a for a in new.args)
    return new


def find_regions(graph, params: set, claimed: set) -> tuple[list, list[tuple[str, str]]]:
    """The routed-experts regions of ``graph`` and the candidates left alone, with why."""
    free = token_free_nodes(graph, params)
    order = {n: i for i, n in enumerate(graph.nodes)}
    gmms = [n for n in graph.nodes if _is_grouped_mm(n, params, free)]
    regions, skipped, taken = [], {}, set(claimed)
    by_output: dict[fx.Node, list[fx.Node]] = {}
    for gmm in gmms:
        if gmm in taken:
            continue
        try:
            by_output.setdefault(_output_after(gmm, order), []).append(gmm)
        except CantChunk as err:
            skipped.setdefault(module_path(gmm) or gmm.name, f"routed experts: {err}")
    for out, group in by_output.items():
        where = module_path(group[0]) or group[0].name
        try:
            region = _region_from(out, group, params, free, order)
            if taken.intersection(region.nodes):
                raise CantChunk("overlaps a region already taken")
        except CantChunk as err:
            skipped.setdefault(where, f"routed experts: {err}")
            continue
        taken.update(region.nodes)
        regions.append(region)
    return regions, list(skipped.items())


def rewrite(owner, region: ExpertsRegion, m: int, ctx) -> str:
    """Every token-major input narrowed per run, the region copied per run and tagged for recompute."""
    graph = owner.graph
    out = region.output
    sizes = chunked_ops.chunk_sizes(region.tokens, m)
    with graph.inserting_before(out):
        outs, start = [], 0
        for i, run in enumerate(sizes):
            # one narrow per input and run (not a split and its getitems): AOT autograd gives a
            # multi-output split's getitems the recompute tags of their first reader, and the
            # partitioner can then neither save nor recompute the split
            env = {x: graph.call_function(torch.narrow, (x, 0, start, run)) for x in region.inputs}
            start += run
            ac_id = next_ac_graph_id(graph)
            for node in region.nodes:
                new = _copy_for_run(graph, node, env, region.tokens, run)
                new.meta.pop("example_value", None)
                new.meta.pop("val", None)
                if not ctx.in_checkpoint and not ctx.eager:
                    new.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                    new.meta["ac_graph_id"] = ac_id
                mst_meta(new).update(region=region.name, chunk=i)
                env[node] = new
            outs.append(env[out])
        joined = graph.call_function(torch.cat, (outs,))
    out.replace_all_uses_with(joined)
    for node in reversed(region.nodes):
        graph.erase_node(node)
    return "" if not ctx.eager else "; no recompute (eager compiler)"
