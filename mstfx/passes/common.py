"""Shared vocabulary of the mstfx passes: the bail-out exception, per-node facts and op tables.

The passes work on the *torch-level* FX graph that Dynamo hands to a backend (``torch._C._nn.linear``,
``operator.mul``, ``call_method`` nodes ...), before AOT autograd.  At that level an MLP or an LM head is
still a handful of nodes, so a chunked loop can be written as ordinary graph nodes that AOT autograd
differentiates and Inductor compiles.  Op tables here are *semantic* (pointwise, cast, view, linear),
never module or class names.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..compat.ops import FUNCTORCH_MODULES, LINEAR_FUNCTIONS

#: Key under ``node.meta`` where mstfx keeps its per-node facts (see :func:`mst_meta`).
MST_META_KEY = "mst"
#: Key under ``gm.meta`` that marks a graph as already rewritten, so it is never chunked twice.
REWRITTEN_KEY = "mst_rewritten"
#: First ``ac_graph_id`` of the recompute tags mstfx puts on MLP chunks, far above the ids Dynamo
#: gives user checkpoints, so later passes can tell the two apart.
MST_AC_GRAPH_ID_BASE = 1_000_000
#: The report error of a graph that is already rewritten (compiled as it is, not a fallback).
ALREADY_REWRITTEN = "already rewritten by mstfx"


class CantChunk(RuntimeError):
    """A region cannot be chunked; the message is the plain reason shown in the report."""


def mst_meta(node: fx.Node) -> dict[str, Any]:
    """The mutable mstfx fact dict of ``node`` (created on first use)."""
    return node.meta.setdefault(MST_META_KEY, {})


def value_of(node: Any) -> Any:
    """The example value (a FakeTensor, SymInt or constant) recorded for ``node`` by Dynamo/AOT."""
    if not isinstance(node, fx.Node):
        return node
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


#: Segments of a Dynamo module path that are wrappers, not modules of the user's model: a
#: ``torch.compile``d module (``_orig_mod``; ``_torchdynamo_inline`` when its forward is inlined into an
#: enclosing compile, e.g. ``mstfx.transform(torch.compile(model))``) and bound-method hops.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_torchdynamo_inline", "__self__", "self"})


def module_path(node: fx.Node, *, strip_leaf: bool = False) -> str:
    """Dotted module path from Dynamo's ``nn_module_stack`` (report only; never used for matching),
    as the user's model names it (``named_modules()``), so it can be given to ``region_chunks``.

    Dynamo's source string is rewritten: the leading ``L['...']``/``G['...']`` goes; a module reached
    through ``._modules['x']`` or ``.__dict__['_modules']['x']`` (PEFT's forwarding wrappers) is
    ``.x``; ``[3]`` is ``.3``; wrapper segments (:data:`_WRAPPER_SEGMENTS`) are dropped.
    ``strip_leaf`` drops the innermost module, so a projection inside an MLP names the MLP block
    (``model.layers.0.mlp``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = re.sub(r"^[LG]\['[^']*'\]", "", list(stack.values())[-1][0])
    # a forward wrapped in closures (trainers' autocast wrappers, mstfx.drop_logits) reaches the module
    # through ``wrapper.__closure__[i].cell_contents ... __self__``
    path = re.sub(r"^\.?((\w+\.)?__closure__\[\d+\]\.cell_contents\.?)+", "", path)
    path = re.sub(r"^(\[\d+\])+", "", path)  # an element of a list/tuple input
    path = re.sub(r"(?:__dict__\['_modules'\]|_modules)\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = ".".join(p for p in path.split(".") if p and p not in _WRAPPER_SEGMENTS)
    return path.rsplit(".", 1)[0] if strip_leaf and "." in path else path


def tensor_of(node: Any) -> torch.Tensor | None:
    val = value_of(node)
    return val if isinstance(val, torch.Tensor) else None


# --------------------------------------------------------------------------------------------------
# Linear projections
# --------------------------------------------------------------------------------------------------
_LINEAR_FUNCS = LINEAR_FUNCTIONS  # F.linear and its torch._C binding


@dataclass(frozen=True)
class LinearMatch:
    """A token-wise projection ``y = x @ W (+ b)``, whatever torch spelling produced it."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    in_features: int
    out_features: int


def match_linear(node: fx.Node) -> LinearMatch | None:
    """Recognise ``F.linear(x, W, b)`` (W is out×in) and ``torch.addmm(b, x2d, W)`` (GPT-2 Conv1D, W is in×out)."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR_FUNCS:
        args = list(node.args) + [None] * 3
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        wt = tensor_of(w)
        if not isinstance(x, fx.Node) or wt is None or wt.dim() != 2:
            return None
        return LinearMatch(node, x, w, b if isinstance(b, fx.Node) else None, int(wt.shape[1]), int(wt.shape[0]))
    if node.target is torch.addmm and len(node.args) == 3 and not node.kwargs:
        b, x, w = node.args
        wt = tensor_of(w)
        if not isinstance(x, fx.Node) or wt is None or wt.dim() != 2:
            return None
        return LinearMatch(node, x, w, b if isinstance(b, fx.Node) else None, int(wt.shape[0]), int(wt.shape[1]))
    return None


# --------------------------------------------------------------------------------------------------
# Adapted projections: a base linear plus low-rank adapters summed onto it (LoRA and its spellings)
# --------------------------------------------------------------------------------------------------
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.mm}
_ADD_FUNCS = {operator.add, torch.add}


def match_matmul(node: fx.Node) -> LinearMatch | None:
    """``x @ W`` (``torch.matmul``, ``torch.mm``, ``x.matmul(W)``) with a 2-D right operand (W is in×out).

    Only a *factor* of a low-rank adapter is matched this way; whether ``W`` depends on tokens is for
    the caller's region check (a region's outside inputs must be parameters)."""
    if node.op == "call_function" and node.target in _MATMUL_FUNCS and len(node.args) == 2 and not node.kwargs:
        x, w = node.args
    elif node.op == "call_method" and node.target in ("matmul", "mm", "__matmul__") and len(node.args) == 2 and not node.kwargs:
        x, w = node.args
    else:
        return None
    wt = tensor_of(w)
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or wt is None or wt.dim() != 2:
        return None
    return LinearMatch(node, x, w, None, int(wt.shape[0]), int(wt.shape[1]))


def _scalar_operand(node: fx.Node) -> fx.Node | None:
    """The tensor operand of ``t * s``, ``s * t`` or ``t / s`` where ``s`` is a number or a one-element
    tensor (an adapter's scale), else ``None``."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul, operator.truediv, torch.div):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None

    def scalar(a):
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return True
        val = tensor_of(a)
        return val is not None and val.numel() == 1

    a, b = node.args
    if isinstance(a, fx.Node) and scalar(b):
        return a
    if node.target in (operator.mul, torch.mul) and isinstance(b, fx.Node) and scalar(a):
        return b
    return None


def _carried(node: Any, chain: list[fx.Node], own: bool = False) -> Any:
    """Walk back from ``node`` through the ops an adapter may wrap around its factors (dtype casts,
    dropout, a scalar scale) and that only it uses, appending each to ``chain``; returns the first node
    that is none of them.  ``own``: ``node`` itself may have other users (it ends the path)."""
    while isinstance(node, fx.Node):
        if not own and len(node.users) != 1:
            return node
        own = False
        if is_cast(node) or is_dropout(node):
            src = node.args[0] if node.args else node.kwargs.get("input")
        else:
            src = _scalar_operand(node)
        if not isinstance(src, fx.Node):
            return node
        chain.append(node)
        node = src
    return node


@dataclass(frozen=True)
class LowRankPath:
    """``scale · B(A(x))`` with rank ``r`` smaller than both ``x``'s width and the output's: an adapter
    (LoRA) beside a projection.  The factors are linears or matmuls; casts, dropout and scalar scales
    may sit before, between and after them.  ``nodes`` is every node of the path (not ``input``)."""

    input: fx.Node
    output: fx.Node
    a: LinearMatch
    b: LinearMatch
    nodes: tuple[fx.Node, ...]

    @property
    def rank(self) -> int:
        return self.a.out_features


def _factor(node: Any) -> LinearMatch | None:
    if not isinstance(node, fx.Node):
        return None
    return match_linear(node) or match_matmul(node)


def match_low_rank_path(node: fx.Node) -> LowRankPath | None:
    """The low-rank adapter path that ends at ``node``, or ``None``.  Every node of the path but the
    last is used only by the next one, so the path is a self-contained term of a sum."""
    chain: list[fx.Node] = []
    b = _factor(_carried(node, chain, own=True))
    if b is None:
        return None
    chain.append(b.node)
    a = _factor(_carried(b.input, chain))
    if a is None or a.out_features != b.in_features:
        return None
    chain.append(a.node)
    x = _carried(a.input, chain)
    rank = a.out_features
    if not isinstance(x, fx.Node) or not (rank < a.in_features and rank < b.out_features):
        return None
    if any(len(n.users) != 1 for n in chain[1:]):
        return None
    return LowRankPath(x, node, a, b, tuple(reversed(chain)))


@dataclass(frozen=True)
class Projection:
    """A token-wise projection of ``input``: one base linear (``base``) plus the low-rank ``adapters``
    summed onto it; ``output`` holds the result, ``nodes`` every node from the base and adapters to
    ``output``.  A plain linear is a projection without adapters (``output`` is its own node)."""

    input: fx.Node
    output: fx.Node
    base: LinearMatch
    adapters: tuple[LowRankPath, ...] = ()
    nodes: tuple[fx.Node, ...] = ()

    @property
    def linear_nodes(self) -> set[fx.Node]:
        """The base linear and both factors of every adapter: the only non-token-wise ops inside."""
        return {self.base.node, *(f.node for p in self.adapters for f in (p.a, p.b))}


def plain_projection(lin: LinearMatch) -> Projection:
    return Projection(lin.input, lin.node, lin, (), (lin.node,))


def _sum_terms(node: fx.Node, adds: list[fx.Node]) -> list[Any]:
    """The terms of the sum ``node`` (a tree of two-operand adds, inner ones used only by their parent),
    appending each add to ``adds``; a node that is not such an add is one term."""
    is_add = (
        (node.op == "call_function" and node.target in _ADD_FUNCS)
        or (node.op == "call_method" and node.target == "add")
    ) and len(node.args) == 2 and not node.kwargs
    if not is_add or not (not adds or len(node.users) == 1):
        return [node]
    adds.append(node)
    terms = []
    for a in node.args:
        terms.extend(_sum_terms(a, adds) if isinstance(a, fx.Node) else [a])
    return terms


def _token_view(node: fx.Node) -> bool:
    """A view or reshape that keeps the last (feature) dim: it only regroups the tokens."""
    if not is_view(node):
        return False
    src, out = tensor_of(node.args[0]), tensor_of(node)
    return src is not None and out is not None and src.shape[-1] == out.shape[-1]


def match_adapted_projection(node: fx.Node) -> Projection | None:
    """``base(x) + Σ scale·B(A(x))`` ending at ``node`` (an add), or ``None``.  Exactly one term is not
    a low-rank path: the base linear (or matmul) of the same ``x`` the adapters read, possibly cast or
    with the tokens flattened around it; every node but ``node`` is used only inside the projection."""
    adds: list[fx.Node] = []
    terms = _sum_terms(node, adds)
    if not adds or not all(isinstance(t, fx.Node) for t in terms):
        return None
    paths, rest = [], []
    for t in terms:
        path = match_low_rank_path(t)
        (paths if path is not None else rest).append(path or t)
    if not paths or len(rest) != 1:
        return None
    wraps: list[fx.Node] = []  # casts and token views around the base (GPT-2's Conv1D: view → addmm → view)
    base_out = rest[0]
    while (is_cast(base_out) or _token_view(base_out)) and len(base_out.users) == 1:
        wraps.append(base_out)
        base_out = base_out.args[0]
    base = _factor(base_out)
    if base is None or len(base.node.users) != 1 or any(len(p.output.users) != 1 for p in paths):
        return None
    x = base.input
    if x is not paths[0].input and _token_view(x) and len(x.users) == 1:
        wraps.append(x)
        x = x.args[0]
    if any(p.input is not x for p in paths):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    inside = {base.node, *wraps, *adds, *(n for p in paths for n in p.nodes)}
    return Projection(x, node, base, tuple(paths), tuple(sorted(inside, key=order.__getitem__)))


# --------------------------------------------------------------------------------------------------
# Token-wise ops: each output row depends only on the same row of its token-shaped inputs
# --------------------------------------------------------------------------------------------------
_BINARY_BUILTINS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg}
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type_as", "contiguous", "clone"}
_VIEW_METHODS = {"view", "reshape"}
_SPLIT_METHODS = {"chunk", "split"}
_SPLIT_FUNCS = {torch.chunk, torch.split}
_DROPOUT_FUNCS = {F.dropout, torch.dropout}


@functools.lru_cache(maxsize=None)
def _aten_is_pointwise(name: str) -> bool:
    """True when an aten overload called ``name`` carries ``torch.Tag.pointwise``."""
    packet = getattr(torch.ops.aten, name.rstrip("_"), None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def _callable_name(target: Any) -> str | None:
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    module = getattr(target, "__module__", "") or ""
    if target in vars(torch).values() or module.startswith("torch"):
        return name
    return None


def is_pointwise(node: fx.Node) -> bool:
    """Elementwise ops (with broadcasting): ``silu``, ``gelu``, ``tanh``, ``mul``, ``pow``, ... ."""
    if node.op == "call_function":
        if node.target in _BINARY_BUILTINS:
            return True
        name = _callable_name(node.target)
        return name is not None and _aten_is_pointwise(name)
    if node.op == "call_method":
        return _aten_is_pointwise(str(node.target))
    return False


def is_cast(node: fx.Node) -> bool:
    """Dtype casts and copies that do not change shape (``float()``, ``to(dtype)``, ``contiguous()``)."""
    if node.op == "call_method" and node.target in _CAST_METHODS:
        src, out = tensor_of(node.args[0]), tensor_of(node)
        return src is not None and out is not None and tuple(src.shape) == tuple(out.shape)
    return False


def is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in (torch.reshape,)
    )


_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}


def is_reshape(node: fx.Node) -> bool:
    """A pure reshape: same elements in the same row-major order, only the shape changes (``view``,
    ``reshape``, ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``; never a transpose or a
    ``view(dtype)`` bit cast).  Any chain of them maps ``[..., V]`` to ``[T, V]`` by flattening the
    leading dims in order, whatever the intermediate shapes."""
    if not ((node.op == "call_method" and node.target in _RESHAPE_METHODS)
            or (node.op == "call_function" and node.target in _RESHAPE_FUNCS)):
        return False
    src, out = tensor_of(node.args[0]) if node.args else None, tensor_of(node)
    return src is not None and out is not None and src.dtype == out.dtype


def is_identity_dropout(node: fx.Node) -> bool:
    """``F.dropout`` that does nothing (p == 0 or not training): safe to recompute."""
    if node.op != "call_function" or node.target not in _DROPOUT_FUNCS:
        return False
    args = list(node.args) + [None] * 3
    p = node.kwargs.get("p", args[1] if args[1] is not None else 0.5)
    training = node.kwargs.get("training", args[2] if args[2] is not None else True)
    return p == 0 or training is False


def is_dropout(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _DROPOUT_FUNCS


def split_dim(node: fx.Node) -> int | None:
    """The dim of a ``chunk``/``split`` node, normalised to be negative; None if not a split."""
    if node.op == "call_method" and node.target in _SPLIT_METHODS:
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    elif node.op == "call_function" and node.target in _SPLIT_FUNCS:
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    else:
        return None
    src = tensor_of(node.args[0])
    if src is None or not isinstance(dim, int):
        return None
    return dim - src.dim() if dim >= 0 else dim


def is_last_dim_getitem(node: fx.Node) -> bool:
    """``t[..., a:b]`` (or an integer index into the tuple of a split)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    src, index = node.args
    if isinstance(index, int):
        return not isinstance(value_of(src), torch.Tensor)
    if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
        return True
    return False


def users_outside(node: fx.Node, region: set[fx.Node]) -> list[fx.Node]:
    return [u for u in node.users if u not in region]


# --------------------------------------------------------------------------------------------------
# Side effects: nodes that no pass may remove, move past, or copy
# --------------------------------------------------------------------------------------------------
_INPLACE_OPERATORS = {
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift,
}
#: Modules whose functions change interpreter state (vmap/jvp nesting, dual levels, batch dims):
#: Dynamo records them as nodes whose return value is often unused (HF 4.57 builds masks with vmap).
_STATEFUL_MODULES = FUNCTORCH_MODULES
#: Name fragments of state-changing functions that fx's own purity table does not list.
_STATEFUL_NAME_PARTS = ("_set_", "_enter_", "_exit_", "increment_nesting", "decrement_nesting", "_batch_dim")


@functools.lru_cache(maxsize=None)
def _inplace_flag_index(target: Any) -> int | None:
    """Position of an ``inplace`` parameter of a Python function (``F.relu(x, inplace)``), if any."""
    import inspect

    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def has_side_effects(node: fx.Node) -> bool:
    """True when ``node`` writes to memory or state that other nodes can observe.

    Conservative on purpose: in-place methods (``copy_``, ``scatter_``, ``x += y``), ``out=`` and
    ``inplace=True`` variants, mutable-schema and effectful ops (fx's own :meth:`fx.Node.is_impure`),
    random ops, grad-mode / autocast / vmap context nodes and anything called through a module.  Such a
    node is never removed, moved past, or copied by an mstfx pass, even when its result is unused:
    its effect is what matters.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return False
    if node.op == "call_module":
        return True  # opaque: we cannot see what it does
    target = node.target
    if node.op == "call_method":
        name = str(target)
        return (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__delitem__") or (
            name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__int__", "__invert__")
        )
    if node.op != "call_function":
        return True
    if node.kwargs.get("out") is not None or node.kwargs.get("inplace") is True:
        return True
    if target in _INPLACE_OPERATORS or node.is_impure():
        return True
    name = getattr(target, "__name__", "") or ""
    module = getattr(target, "__module__", "") or ""
    if module.startswith(_STATEFUL_MODULES) or any(part in name for part in _STATEFUL_NAME_PARTS):
        return True
    if name.endswith("_") and not name.endswith("__") and (module.startswith("torch") or target in vars(torch).values()):
        return True  # torch.relu_, torch.nn.init.normal_, ...
    index = _inplace_flag_index(target) if callable(target) and module.startswith("torch") else None
    return index is not None and len(node.args) > index and node.args[index] is True


def side_effect_between(first: fx.Node, last: fx.Node, ignore: set[fx.Node] = frozenset()) -> fx.Node | None:
    """The first side-effecting node strictly between ``first`` and ``last`` in graph order (or ``None``).

    A rewrite that inserts a region's computation at ``last`` moves it past every node in between; if
    one of them mutates memory the region reads, the moved computation would read the new value.
    """
    node = first.next
    while node is not last and node.op != "root":
        if node not in ignore and has_side_effects(node):
            return node
        node = node.next
    return None


def check_no_side_effects(nodes: list[fx.Node], sink: fx.Node) -> None:
    """Raise :class:`CantChunk` if a region ``nodes`` (graph order, ending at ``sink``) contains or
    crosses a side-effecting node; the region is then left unchanged and reported."""
    for node in nodes:
        if has_side_effects(node):
            raise CantChunk(f"{node.name} ({getattr(node.target, '__name__', node.target)}) has side effects (in-place or stateful)")
    first = nodes[0] if nodes else sink
    crossed = side_effect_between(first, sink, set(nodes))
    if crossed is not None:
        raise CantChunk(
            f"{crossed.name} ({getattr(crossed.target, '__name__', crossed.target)}) has side effects and lies "
            "inside the region: the rewrite would move the region's reads past it"
        )


def erase_if_dead(graph: fx.Graph, roots: list[fx.Node]) -> int:
    """Erase the nodes among ``roots`` (and, transitively, their inputs) that have no users and no side
    effects; returns how many.  Unlike ``graph.eliminate_dead_code()`` it touches only what a rewrite
    made dead, and never a node whose effect matters more than its (unused) result.  A node reached twice
    (an input of two erased nodes) is erased once."""
    erased = 0
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node._erased or node.graph is not graph or node.users or node.op not in ("call_function", "call_method"):
            continue
        if has_side_effects(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def token_free_nodes(graph: fx.Graph, param_nodes: set[fx.Node]) -> set[fx.Node]:
    """Nodes whose value does not depend on any token input (parameters and ops on parameters only)."""
    free: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or node in param_nodes:
            free.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes:
            if all(a in free for a in node.all_input_nodes):
                free.add(node)
    return free


def stacked_weight(node: fx.Node, param_nodes: set[fx.Node]) -> fx.Node | None:
    """``node`` if it is a parameter of rank >= 3 (one weight per expert) or a transpose/view of one."""
    while isinstance(node, fx.Node) and node not in param_nodes:
        if node.op == "call_method" and node.target in ("transpose", "t", "permute", "contiguous", "view", "reshape"):
            node = node.args[0]
        elif node.op == "call_function" and node.target in (torch.transpose, torch.permute):
            node = node.args[0]
        else:
            return None
    val = tensor_of(node)
    return node if val is not None and val.dim() >= 3 else None
