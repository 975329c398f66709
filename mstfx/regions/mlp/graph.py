"""Analyse: find token-wise MLP regions by graph structure.

A region starts at a token tensor ``x`` that feeds an *up-projection* (a linear whose output is wider
than its input: the memory amplifier), runs through token-wise ops only (pointwise activations, gate
products, casts, last-dim splits of a fused gate/up weight, identity dropout) and ends at the next
linear, the *down-projection*.  Every node inside must be used only inside the region, and every
other input must be a parameter (or derived from parameters only).  This covers SwiGLU, GeGLU,
GELU-with-bias, ReLU², fused ``gate_up_proj`` and GPT-2's ``Conv1D`` (``addmm``) without naming any of
them.  Anything else raises :class:`CantChunk` with the reason, and the graph is left as it was.

A projection may carry low-rank adapters (LoRA): ``base(x) + Σ scale·B(A(x))``, the factors linears or
matmuls (:class:`~.common.Projection`, :func:`~.common.match_adapted_projection`).  Each such sum is one
projection, so an MLP with adapters on its up- and down-projections is still one token-wise region;
the chunk body recomputes the adapters with the rest, so a trainable factor's gradient accumulates over
the chunks and a frozen base weight gets none.  An adapter factor is never an up-projection candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...passes.common import (
    stacked_weight,
    token_free_nodes,

    CantChunk,
    LinearMatch,
    Projection,
    check_no_side_effects,
    module_path,
    has_side_effects,
    is_cast,
    is_dropout,
    is_identity_dropout,
    is_last_dim_getitem,
    is_pointwise,
    is_view,
    match_adapted_projection,
    match_linear,
    match_matmul,
    plain_projection,
    split_dim,
    tensor_of,
    users_outside,
)


@dataclass
class MlpRegion:
    """One MLP found in the graph: ``nodes`` in graph order, from the up- to the down-projection."""

    input: fx.Node
    output: fx.Node
    nodes: list[fx.Node]
    up_projections: list[LinearMatch]
    down_projection: LinearMatch
    hidden: int
    intermediate: int
    tokens: int | torch.SymInt
    dtype: torch.dtype
    activation: str
    name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def gated(self) -> bool:
        return len(self.up_projections) > 1 or any(
            split_dim(n) is not None for n in self.nodes
        )


def _is_token_wise(node: fx.Node) -> bool:
    if is_dropout(node):
        if not is_identity_dropout(node):
            raise CantChunk(f"{node.name}: dropout with p > 0 inside the MLP (recompute would need RNG replay)")
        return True
    return (
        is_pointwise(node)
        or is_cast(node)
        or is_view(node)
        or split_dim(node) == -1
        or is_last_dim_getitem(node)
    )


def _describe_activation(nodes: list[fx.Node], projection_nodes: set[fx.Node] = frozenset()) -> str:
    names = []
    for n in nodes:
        if n in projection_nodes or match_linear(n) or is_cast(n) or is_view(n) or is_last_dim_getitem(n):
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if name not in names:
            names.append(name)
    return "·".join(names) if names else "identity"


def projections(graph: fx.Graph) -> dict[fx.Node, Projection]:
    """Every projection of ``graph`` (:class:`Projection`), keyed by each of its nodes: a base linear with
    the low-rank adapters summed onto it as one unit, every other linear on its own.  A sum is matched
    from its outermost add, so an adapted projection is never split into smaller ones."""
    owner: dict[fx.Node, Projection] = {}
    for node in reversed(graph.nodes):
        if node in owner:
            continue
        proj = match_adapted_projection(node)
        if proj is not None and not any(n in owner for n in proj.nodes):
            owner.update(dict.fromkeys(proj.nodes, proj))
    for node in graph.nodes:
        if node not in owner:
            lin = match_linear(node)
            if lin is not None:
                owner[node] = plain_projection(lin)
    return owner


def _region_from_up(up: Projection, free: set[fx.Node], owner: dict[fx.Node, Projection]) -> MlpRegion:
    x = up.input
    # 1. forward from the up-projection through token-wise ops to the down-projection (the sink).
    sinks: dict[fx.Node, Projection] = {}
    seen: set[fx.Node] = set()
    frontier = [up.output]
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "output":
                raise CantChunk(f"{node.name} is a graph output (escapes the MLP)")
            if has_side_effects(user):
                raise CantChunk(f"{user.name} ({getattr(user.target, '__name__', user.target)}) has side effects (in-place or stateful)")
            proj = owner.get(user)
            if proj is not None:
                lin = match_linear(user) or match_matmul(user)
                if proj.input is not node or (lin is not None and lin.input is not node):
                    raise CantChunk(f"{node.name} feeds {user.name} as a weight")
                sinks[proj.output] = proj
                continue
            if not _is_token_wise(user):
                raise CantChunk(f"{user.name} ({getattr(user.target, '__name__', user.target)}) is not a token-wise op")
            frontier.append(user)
    if len(sinks) != 1:
        raise CantChunk(f"expected one down-projection after {up.output.name}, found {len(sinks)}")
    (down,) = sinks.values()
    sink = down.output

    # 2. the region is everything between x and the sink (backward closure stopping at x / parameters).
    region: set[fx.Node] = set()
    stack = [sink]
    while stack:
        node = stack.pop()
        if node in region or node is x or node in free:
            continue
        if node.op in ("placeholder", "get_attr", "output"):
            raise CantChunk(f"the MLP also depends on the token input {node.name}")
        region.add(node)
        stack.extend(node.all_input_nodes)

    ups: dict[fx.Node, Projection] = {}
    for node in region:
        proj = owner.get(node)
        if proj is not None and proj is not down:
            if proj.input is not x:
                raise CantChunk(f"{node.name}: a projection inside the MLP that does not read its input")
            ups[proj.output] = proj
        if proj is None or node not in proj.linear_nodes:
            if not _is_token_wise(node):
                raise CantChunk(f"{node.name} is not a token-wise op")
        if node is not sink:
            escaped = users_outside(node, region)
            if escaped:
                raise CantChunk(f"{node.name} is also used by {escaped[0].name} outside the MLP")
        if node.op != "call_function" and node.op != "call_method":
            raise CantChunk(f"{node.name}: unsupported node kind {node.op}")
    if not ups:
        raise CantChunk("no up-projection reads the MLP input")

    xv = tensor_of(x)
    if xv is None or xv.dim() < 2:
        raise CantChunk(f"{x.name}: MLP input is not a [tokens, hidden] tensor")
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    nodes = sorted(region, key=order.__getitem__)
    check_no_side_effects(nodes, sink)
    tokens = math.prod(xv.shape[:-1])
    name = module_path(sink, strip_leaf=True) or sink.name
    up_projs = sorted(ups.values(), key=lambda p: order[p.output])
    adapters = sum(len(p.adapters) for p in (*up_projs, down))
    return MlpRegion(
        input=x,
        output=sink,
        nodes=nodes,
        up_projections=[p.base for p in up_projs],
        down_projection=down.base,
        hidden=int(xv.shape[-1]),
        intermediate=max(p.base.out_features for p in up_projs),
        tokens=tokens,
        dtype=xv.dtype,
        activation=_describe_activation(nodes, {n for p in (*up_projs, down) for n in p.nodes}),
        name=name,
        extra={"adapters": adapters} if adapters else {},
    )


def routed_expert_matmuls(graph: fx.Graph, param_nodes: set[fx.Node], free: set[fx.Node]) -> list[fx.Node]:
    """Token-dependent ops that multiply by a stacked ``[experts, ...]`` weight (grouped / batched mm).

    These are the routed experts of a mixture-of-experts layer: each row uses the weight of the expert it
    was routed to, and the rows were gathered by index.  Not a plain linear, so they are reported (once
    per stacked weight) and left unchanged.
    """
    found, seen = [], set()
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or node in free or match_linear(node) is not None:
            continue
        if is_pointwise(node) or is_view(node) or is_cast(node):
            continue
        args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if not any(a not in free for a in args):
            continue
        for a in args:
            w = stacked_weight(a, param_nodes)
            if w is not None and w not in seen:
                seen.add(w)
                found.append(node)
    return found


def _unique_names(regions: list[MlpRegion]) -> None:
    """Give every region of a graph its own name (the name is what ``region_chunks`` and the report use).

    The default name is the module that holds the down-projection; when two regions share it (their
    projections are direct children of one ``ModuleList``) each is named by its down-projection's own
    path (``ffn.1``, ``ffn.3``); a module called twice gets ``#2``, ``#3``... on its later calls."""
    count: dict[str, int] = {}
    for r in regions:
        count[r.name] = count.get(r.name, 0) + 1
    for r in regions:
        if count[r.name] > 1:
            r.name = module_path(r.down_projection.node) or r.down_projection.node.name
    seen: dict[str, int] = {}
    for r in regions:
        k = seen[r.name] = seen.get(r.name, 0) + 1
        if k > 1:
            r.name = f"{r.name}#{k}"


def find_mlp_regions(
    graph: fx.Graph, param_nodes: set[fx.Node], exclude: set[fx.Node] = frozenset()
) -> tuple[list[MlpRegion], list[tuple[str, str]]]:
    """All MLP regions of ``graph`` plus ``(where, reason)`` for each candidate that was left alone.

    ``exclude`` holds nodes already claimed by another region kind (the LM head's projection, routed
    experts): never part of an MLP, and a claimed stacked-weight matmul is not reported here.
    """
    free = token_free_nodes(graph, param_nodes)
    owner = projections(graph)
    regions: list[MlpRegion] = []
    skipped: list[tuple[str, str]] = []
    claimed: set[fx.Node] = set()
    for node in graph.nodes:
        proj = owner.get(node)
        if proj is None or node is not proj.base.node:
            continue  # not a linear, or a factor of a low-rank adapter
        lin = proj.base
        if node in claimed or node in exclude or proj.input in free:
            continue
        if lin.out_features <= lin.in_features:
            continue  # not an amplifier
        try:
            region = _region_from_up(proj, free, owner)
            if exclude.intersection(region.nodes):
                raise CantChunk("overlaps a region of another kind")
        except CantChunk as err:
            skipped.append((module_path(proj.output, strip_leaf=True) or proj.output.name, str(err)))
            continue
        claimed.update(region.nodes)
        regions.append(region)
    _unique_names(regions)
    experts: dict[str, int] = {}
    for node in routed_expert_matmuls(graph, param_nodes, free):
        if node in exclude:
            continue
        where = module_path(node, strip_leaf=True) or node.name
        experts[where] = experts.get(where, 0) + 1
    for where, n in experts.items():
        skipped.append(
            (
                where,
                f"routed experts ({n} matmul(s) with a stacked [experts, ...] weight on tokens gathered by "
                "index): not a plain linear, left unchanged",
            )
        )
    return regions, skipped
