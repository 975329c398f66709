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
_LINEAR_FUNCS = {torch._C._nn.linear, F.linear}


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
_STATEFUL_MODULES = ("torch._C._functorch", "torch._functorch")
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
    made dead, and never a node whose effect matters more than its (unused) result."""
    erased = 0
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.graph is not graph or node.users or node.op not in ("call_function", "call_method"):
            continue
        if has_side_effects(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased
