"""Analyse + rewrite: attention fed a plain causal mask, or K/V expanded to every query head.

Under ``torch.compile`` Hugging Face's SDPA path builds its boolean mask *inside* the graph: index
tensors from ``arange`` laid along the query and key axes, compared (``kv <= q``), looked up in the
padding mask or the position ids, combined with ``&`` and expanded to B×1×S×S.  That tensor costs S²
bytes and keeps SDPA off its causal kernels.  Grouped-query layers also expand K and V to every query
head (``repeat_kv``: ``k[:, :, None].expand(...).reshape(...)``), so attention saves MHA-sized K and V.

The mask is read symbolically, node by node (:func:`analyse_mask`), into one of three verdicts:

* **causal**: it is ``key <= query`` and nothing else: SDPA gets ``is_causal=True`` and no mask;
* **causal if** some B×S ingredient passes a check (no zeros in the padding mask, positions that
  increase along each row, one packed sequence per row; see :mod:`mstfx.attention_ops`).  Ingredients
  that are compile-time constants are checked now.  The others are checked on every call by a small
  guard graph (:func:`build_guard`) that reads only those B×S inputs: the backend runs the causal graph
  when every check holds and a second graph that keeps the mask otherwise (compiled on first need), so
  the result is exact for every input.  (A ``torch.cond`` inside the graph would avoid the host-side
  check, but ``cond`` cannot run inside an activation-checkpointed body, where the layers are.)
* anything else (sliding windows, chunked attention, offsets, a 4-D mask handed in by the caller) is
  left unchanged and the report says why.

transformers 4.57 builds the same mask element by element under four nested ``torch.vmap`` (batch,
head, query, key: ``_vmap_for_bhqkv``), which Dynamo records as ``_add_batch_dim`` / ``_remove_batch_dim``
nodes between ``_vmap_increment_nesting`` / ``_vmap_decrement_nesting`` context nodes; its key range is
``kv = arange(n); kv += offset`` (an in-place add) and the attention interface slices the mask to the
key length (``mask[:, :, :, :n]``, inside the checkpointed layer when it is one).  The reader accepts
these by structure (:func:`_vmap_levels`, :func:`_private_inplace_add`, :func:`_identity_slice_of`) and
removes the whole vmap block once the mask is dead (:func:`_erase_vmap_blocks`); transformers 5 builds
it from broadcast index tensors, without any of them.

K/V whose heads are repeated for the query heads are replaced by the unexpanded tensors with
``enable_gqa=True`` (exact: SDPA broadcasts each K/V head to its group of query heads).  The repeat is
read by structure (:func:`_repeated_heads`): HF's ``repeat_kv``, ``unsqueeze``/``expand``/``flatten``
(nanoGPT, torchtitan, with the heads transposed into place afterwards), ``split`` groups expanded
(litgpt) or ``repeat_interleave``; a repeat in the other order (tiled heads) is left and reported.  The same rewrite runs inside activation-
checkpointed bodies, whose mask arrives as an operand built in the outer graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import attention_ops
from ..compat.ops import SDPA_FUNCTIONS, is_functorch_function
from .common import erase_if_dead, has_side_effects, module_path, tensor_of, value_of
from ..vocabulary import Action
from .report import ATTENTION, RegionDecision

SDPA_FUNCS = SDPA_FUNCTIONS  # the public function and its torch._C binding
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

#: Largest ingredient evaluated at compile time to prove a check (elements); larger ones are checked at run time.
_MAX_CONSTANT_ELEMENTS = 1 << 22


class NotCausal(Exception):
    """The mask is not (provably) the causal mask; the message is the reason shown in the report."""


# --------------------------------------------------------------------------------------------------
# Abstract values of the mask's construction
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Range:
    """``arange(length) + offset`` (1-D)."""

    length: Any
    offset: Any


@dataclass(frozen=True)
class _Index:
    """A :class:`_Range` laid along one dim of the 4-D mask (0 batch, 2 query, 3 key), size 1 elsewhere."""

    dim: int
    length: Any
    offset: Any


@dataclass(frozen=True)
class _Lookup:
    """``table[batch, index]``: one value of a B×S ingredient per query (dim 2) or per key (dim 3)."""

    table: fx.Node
    dim: int


@dataclass(frozen=True)
class _Term:
    """A boolean mask: the causal mask (``causal``) or all True, provided every check holds."""

    causal: bool
    checks: tuple[tuple[str, fx.Node], ...] = ()


_ABSTRACT = (_Range, _Index, _Lookup, _Term)
_COMPARE = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq",
    torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt", torch.eq: "eq",
}
_COMPARE_METHODS = {"le", "lt", "ge", "gt", "eq", "__le__", "__lt__", "__ge__", "__gt__", "__eq__"}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and}
_AND_METHODS = {"__and__", "logical_and", "bitwise_and"}


def _same(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _full_index(idx: Any) -> int | None:
    """The dim of the one full slice in a 4-entry index of Nones (``r[None, None, :, None]``)."""
    if not isinstance(idx, tuple) or len(idx) != 4:
        return None
    slices = [i for i, e in enumerate(idx) if isinstance(e, slice)]
    if len(slices) != 1 or idx[slices[0]] != slice(None, None, None):
        return None
    return slices[0] if all(e is None for i, e in enumerate(idx) if i != slices[0]) else None


def _as_term(val: Any, node: fx.Node) -> _Term:
    if isinstance(val, _Term):
        return val
    if isinstance(val, _Lookup):  # a boolean ingredient looked up per key or query: a padding mask
        return _Term(False, (("all_true", val.table),))
    if val is True:
        return _Term(False)
    raise NotCausal(f"{node.name} combines a non-boolean term into the mask")


def _compare(kind: str, a: Any, b: Any, node: fx.Node) -> _Term:
    asked = kind
    if kind in ("ge", "gt"):  # a >= b is b <= a
        kind, a, b = {"ge": "le", "gt": "lt"}[kind], b, a
    if kind == "le" and isinstance(a, _Index) and isinstance(b, _Index):
        if (a.dim, b.dim) == (3, 2) and _same(a.length, b.length) and _same(a.offset, b.offset):
            return _Term(True)  # key <= query
    if kind == "le" and isinstance(a, _Lookup) and isinstance(b, _Lookup) and a.table is b.table:
        if (a.dim, b.dim) == (3, 2):  # pos[key] <= pos[query]: causal when positions increase along rows
            return _Term(True, (("rows_increasing", a.table),))
    if kind == "eq" and isinstance(a, _Lookup) and isinstance(b, _Lookup) and a.table is b.table:
        if {a.dim, b.dim} == {2, 3}:  # id[query] == id[key]: all True when each row has one id
            return _Term(False, (("rows_constant", a.table),))
    raise NotCausal(
        f"{node.name} ({asked}) is not the causal condition key <= query "
        "(a sliding window, chunked attention or offset mask is left unchanged)"
    )


_INPLACE_ADD = {operator.iadd: operator.add, operator.isub: operator.sub}


def _private_inplace_add(node: fx.Node) -> Any | None:
    """``operator.add``/``sub`` for ``x += c`` / ``x -= c`` whose ``x`` has no reader but this node, else None.

    transformers 4.57 offsets its key range in place (``kv_arange += kv_offset``).  Nothing else reads
    the tensor written to, and it is a new tensor (made by ``arange`` or an out-of-place add, not a view
    or a no-op ``.to`` of another), so no other node can see the write and it means ``x + c`` (the
    reader still checks that ``x`` is an index range)."""
    if node.op != "call_function" or node.target not in _INPLACE_ADD or node.kwargs or len(node.args) != 2:
        return None
    dest = node.args[0]
    if not isinstance(dest, fx.Node) or set(dest.users) != {node}:
        return None
    if dest.op != "call_function" or dest.target not in (torch.arange, operator.add, operator.sub):
        return None
    return _INPLACE_ADD[node.target]


def _batch_dim_op(node: fx.Node) -> str | None:
    """``"add"``/``"remove"`` for functorch's ``_add_batch_dim`` / ``_remove_batch_dim`` nodes (vmap under Dynamo)."""
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", "")
    if not is_functorch_function(node.target):
        return None
    return {"_add_batch_dim": "add", "_remove_batch_dim": "remove"}.get(name)


_VMAP_BOOKKEEPING = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "lazy_load_decompositions")


def _vmap_bookkeeping(node: fx.Node) -> str | None:
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return name if name in _VMAP_BOOKKEEPING and is_functorch_function(node.target) else None


def _vmap_levels(mask: fx.Node) -> dict[int, int]:
    """The dim of the 4-D mask each vmap level stands for, read off the chain of ``_remove_batch_dim``
    nodes that produces the mask (empty unless there is exactly one such chain among its inputs).

    ``vmap`` over batch, head, query and key (levels 1..4, ``out_dims=0``) ends with
    ``_remove_batch_dim(t, 4, S, 0)`` ... ``_remove_batch_dim(t, 1, B, 0)``: the outermost removal
    gives dim 0, the next dim 1, and so on."""
    tops, seen, stack = [], set(), [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _batch_dim_op(node) == "remove" and not any(_batch_dim_op(u) == "remove" and u.args[0] is node for u in node.users):
            tops.append(node)
        stack.extend(node.all_input_nodes)
    if len(tops) != 1:
        return {}
    levels: list[int] = []
    node = tops[0]
    while isinstance(node, fx.Node) and _batch_dim_op(node) == "remove":
        if len(node.args) != 4 or node.kwargs or node.args[3] != 0 or not isinstance(node.args[1], int):
            return {}
        levels.append(node.args[1])
        node = node.args[0]
    if len(levels) != 4 or len(set(levels)) != 4:
        return {}
    return {level: dim for dim, level in enumerate(levels)}


def _identity_slice_of(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``x[:, :, :, :n]`` (slices from 0, step 1) that keeps every element of ``x``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    base, idx = node.args
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not isinstance(base, fx.Node) or not idx or not all(
        isinstance(e, slice) and e.start in (None, 0) and e.step in (None, 1) for e in idx
    ):
        return None
    src, out = tensor_of(base), tensor_of(node)
    if src is None or out is None or src.dim() != out.dim():
        return None
    return base if all(_same(a, b) for a, b in zip(src.shape, out.shape)) else None


class _MaskReader:
    """Evaluates the mask's construction over :class:`_Range`/:class:`_Index`/:class:`_Lookup`/
    :class:`_Term`.  Any other node is an opaque tensor (an *ingredient*); comparing opaque tensors, or
    transforming a boolean term in a way this reader does not know, is a :class:`NotCausal`."""

    def __init__(self, levels: dict[int, int] | None = None) -> None:
        self.memo: dict[fx.Node, Any] = {}
        self.levels = levels or {}  # vmap level -> mask dim (see _vmap_levels)

    def __call__(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node not in self.memo:
            self.memo[node] = self._eval(node)
        return self.memo[node]

    def _eval(self, node: fx.Node) -> Any:
        size = value_of(node)
        if isinstance(size, (int, torch.SymInt)) and not isinstance(size, bool):
            return size  # a size (under dynamic shapes a symbol such as the sequence length): compared exactly
        if node.op not in ("call_function", "call_method"):
            return None
        target = node.target
        batch_dim = _batch_dim_op(node)
        if batch_dim is not None:  # vmap's batch dims: no effect of their own (levels checked by _vmap_levels)
            return self._batch_dim(node, batch_dim)
        inplace = _private_inplace_add(node)
        if inplace is not None:
            target = inplace
        elif has_side_effects(node):
            raise NotCausal(f"{node.name} has side effects")
        args = list(fx.node.map_aggregate(node.args, self))
        if node.op == "call_function" and target is torch.arange:
            if len(args) == 1:
                return _Range(args[0], 0)
            if len(args) == 2 or (len(args) == 3 and args[2] == 1):
                return _Range(args[1] - args[0], args[0])
            return None
        if inplace is not None and not isinstance(args[0], _Range):
            raise NotCausal(f"{node.name} writes in place to a tensor that is not an index range")
        if node.op == "call_function" and target in (operator.add, operator.sub) and len(args) == 2:
            shift = [a for a in args if isinstance(a, (int, torch.SymInt))]
            ranged = [a for a in args if isinstance(a, (_Range, _Index))]
            if len(shift) == 1 and len(ranged) == 1 and (target is operator.add or args[1] is shift[0]):
                r, c = ranged[0], shift[0] if target is operator.add else -shift[0]
                return _Range(r.length, r.offset + c) if isinstance(r, _Range) else _Index(r.dim, r.length, r.offset + c)
        if node.op == "call_function" and target is operator.getitem and len(args) == 2:
            base, idx = args
            if isinstance(base, _Range):
                dim = _full_index(idx)
                if dim is not None:
                    return _Index(dim, base.length, base.offset)
            elif base is None and isinstance(idx, tuple) and all(isinstance(i, _Index) for i in idx):
                if len(idx) == 2 and idx[0].dim == 0 and idx[1].dim in (2, 3) and _same(idx[0].offset, 0):
                    return _Lookup(node.args[0], idx[1].dim)
                if len(idx) == 1 and idx[0].dim in (2, 3):
                    return _Lookup(node.args[0], idx[0].dim)
            elif isinstance(base, _Term) and _identity_slice_of(node) is not None:
                return base  # mask[:, :, :, :n] that keeps the whole mask
        if node.op == "call_function" and target in (torch.ops.aten.index, torch.ops.aten.index.Tensor) and len(args) == 2:
            base, idx = args  # table[b, i] under vmap (transformers 4.57's TransformGetItemToIndex)
            if base is None and isinstance(idx, (list, tuple)) and len(idx) == 2 and all(isinstance(i, _Index) for i in idx):
                if idx[0].dim == 0 and idx[1].dim in (2, 3) and _same(idx[0].offset, 0):
                    return _Lookup(node.args[0], idx[1].dim)
        kind = _COMPARE.get(target) if node.op == "call_function" else (
            str(target).strip("_") if target in _COMPARE_METHODS else None
        )
        if kind is not None and len(args) == 2:
            return _compare(kind, args[0], args[1], node)
        if (node.op == "call_function" and target in _AND) or (node.op == "call_method" and target in _AND_METHODS):
            if len(args) == 2:
                a, b = _as_term(args[0], node), _as_term(args[1], node)
                return _Term(a.causal or b.causal, a.checks + tuple(c for c in b.checks if c not in a.checks))
        if node.op == "call_method" and target == "new_ones" and isinstance(args[0], _ABSTRACT):
            size = args[1] if len(args) > 1 else node.kwargs.get("size")
            if tuple(size) == () and node.kwargs.get("dtype") is torch.bool:
                return _Term(False)
        if node.op == "call_method" and target in ("to", "expand", "contiguous") and isinstance(args[0], _ABSTRACT):
            val = tensor_of(node)
            if target != "to" or (val is not None and val.dtype in (torch.bool, tensor_of(node.args[0]).dtype)):
                return args[0]  # a device move, a no-op cast or a broadcast keeps the meaning
        if any(isinstance(a, _Term) for a in args) or any(isinstance(self(v), _Term) for v in node.kwargs.values()):
            raise NotCausal(f"{node.name} ({getattr(target, '__name__', target)}) transforms the mask in a way not recognised")
        return None  # an opaque tensor (an ingredient, or indices used some other way: not the causal condition)

    def _batch_dim(self, node: fx.Node, op: str) -> Any:
        """``_add_batch_dim(range, 0, level)`` is the index along the level's dim; ``_remove_batch_dim``
        of a boolean term is that term over one more dim.  Anything else is not recognised."""
        args = list(fx.node.map_aggregate(node.args, self))
        level = args[2] if op == "add" else args[1] if len(args) > 1 else None
        if level in self.levels and not node.kwargs and len(args) in (3, 4):
            if op == "add" and isinstance(args[0], _Range) and args[1] == 0:
                return _Index(self.levels[level], args[0].length, args[0].offset)
            if op == "remove" and isinstance(args[0], _Term) and args[3] == 0:
                return args[0]
        raise NotCausal(f"{node.name} ({op} a vmap batch dim) is not part of a mask built over batch, head, query and key")


@dataclass
class MaskAnalysis:
    """The verdict on one mask node (see the module docstring)."""

    mask: fx.Node
    causal: bool  # False: all True under the checks (no mask needed at all)
    checks: list[tuple[str, fx.Node]]  # still to run at run time
    construction: list[fx.Node]  # the nodes that build the mask, in graph order
    ingredients: list[fx.Node]  # the tensors they read from outside


def _constant_value(node: fx.Node) -> torch.Tensor | None:
    """``node``'s value when it depends on no graph input and is small (evaluated now), else None."""
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("call_function", "call_method") or has_side_effects(n):
            return None
        val = value_of(n)
        if isinstance(val, torch.Tensor) and val.numel() > _MAX_CONSTANT_ELEMENTS:
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
    env: dict[fx.Node, Any] = {}

    def on_cpu(a: Any) -> Any:  # evaluated here, whatever device the graph targets (meta, cuda)
        return env[a] if isinstance(a, fx.Node) else torch.device("cpu") if isinstance(a, torch.device) else a

    try:
        for n in sorted(order, key=_position(node.graph)):
            args = fx.node.map_aggregate(n.args, on_cpu)
            kwargs = fx.node.map_aggregate(n.kwargs, on_cpu)
            env[n] = n.target(*args, **kwargs) if n.op == "call_function" else getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:
        return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None


def _position(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def analyse_mask(mask: fx.Node) -> MaskAnalysis:
    """Read how ``mask`` is built; raise :class:`NotCausal` unless it is (conditionally) causal."""
    if mask.op == "placeholder":
        raise NotCausal("the mask is a graph input (built outside the compiled region)")
    reader = _MaskReader(_vmap_levels(mask))
    term = reader(mask)
    if not isinstance(term, _Term):
        raise NotCausal(f"{mask.name} is not a mask built from query/key indices")
    checks = []
    for kind, table in term.checks:
        const = _constant_value(table)
        if const is None:
            checks.append((kind, table))
        elif not bool(attention_ops.CHECKS[kind](const)):
            raise NotCausal(f"its {table.name} fails {kind} (e.g. packed sequences): the mask is not causal")
    construction = sorted((n for n, v in reader.memo.items() if isinstance(v, _ABSTRACT)), key=_position(mask.graph))
    inside = set(construction)
    ingredients: list[fx.Node] = []
    for n in construction:
        for a in n.all_input_nodes:
            if a not in inside and a not in ingredients:
                ingredients.append(a)
    for n in ingredients:
        val = value_of(n)
        if tensor_of(n) is None and not (isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)):
            raise NotCausal(f"the mask reads {n.name}, which is neither a tensor nor a size")
    return MaskAnalysis(mask, term.causal, checks, construction, ingredients)


# --------------------------------------------------------------------------------------------------
# SDPA calls
# --------------------------------------------------------------------------------------------------
def sdpa_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of the SDPA call ``node`` (``query`` … ``enable_gqa``), positional or keyword;
    shared with the sequence-parallel rewrite, which reads and rebuilds the same calls."""
    i = _SDPA_ARGS.index(name)
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def sdpa_with(node: fx.Node, **changes: Any) -> tuple[tuple, dict]:
    """``node``'s arguments as (q, k, v) + keywords, with ``changes`` applied (a change to None drops the
    keyword): the arguments of a replacement call."""
    kwargs = {name: sdpa_arg(node, name) for name in _SDPA_ARGS[3:] if sdpa_arg(node, name) is not None}
    kwargs.update(changes)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return tuple(sdpa_arg(node, n) for n in _SDPA_ARGS[:3]), kwargs


_LAYOUT_METHODS = {"transpose", "permute", "contiguous"}
_LAYOUT_FUNCS = {torch.transpose, torch.permute}
_MERGE_METHODS = {"reshape", "view", "flatten"}
_MERGE_FUNCS = {torch.reshape, torch.flatten}


@dataclass(frozen=True)
class _RepeatedHeads:
    """K or V whose heads were repeated for the query heads, read back to the tensor before the repeat.

    ``source`` is the unexpanded tensor; ``squeeze`` a size-1 dim of it to drop first (a group axis
    left by ``split``), or None; ``layout`` the transposes/permutes between the repeat and SDPA, to
    apply to the unexpanded tensor as well; each K/V head serves the ``n_rep`` query heads next to it."""

    source: fx.Node
    squeeze: int | None
    layout: tuple[fx.Node, ...]
    n_rep: Any


class _NotGqa(Exception):
    """A head repeat that ``enable_gqa`` cannot replace; the message is the reason shown in the report."""


def _is_call(node: Any, methods: set, funcs: set) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in methods) or (node.op == "call_function" and node.target in funcs)
    )


def _layout_dim(node: fx.Node, pos: int, rank: int) -> int | None:
    """Where dim ``pos`` goes through the transpose/permute/contiguous ``node`` (None: not readable)."""
    args = list(node.args[1:])
    if node.target == "contiguous":
        return pos
    if node.target in ("transpose", torch.transpose):
        dims = [node.kwargs.get("dim0", args[0] if args else None), node.kwargs.get("dim1", args[1] if len(args) > 1 else None)]
        if not all(isinstance(d, int) for d in dims):
            return None
        a, b = (d % rank for d in dims)
        return b if pos == a else a if pos == b else pos
    dims = node.kwargs.get("dims", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
    if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
        return None
    dims = [d % rank for d in dims]
    return dims.index(pos) if pos in dims else None


def _inserted_dim(node: Any) -> tuple[fx.Node, int] | None:
    """``(x, d)`` when ``node`` is ``x`` with a size-1 dim inserted at ``d`` (``unsqueeze(d)``, ``x[:, :, None]``)."""
    if not isinstance(node, fx.Node) or not isinstance(node.args[0] if node.args else None, fx.Node):
        return None
    src, out = tensor_of(node.args[0]), tensor_of(node)
    if src is None or out is None or out.dim() != src.dim() + 1:
        return None
    if _is_call(node, {"unsqueeze"}, {torch.unsqueeze}):
        d = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return (node.args[0], d % out.dim()) if isinstance(d, int) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        idx = node.args[1]
        full = slice(None, None, None)
        if sum(e is None for e in idx) != 1 or sum(e is Ellipsis for e in idx) > 1:
            return None
        if not all(e is None or e is Ellipsis or e == full for e in idx):
            return None
        at = idx.index(None)
        after_ellipsis = Ellipsis in idx and idx.index(Ellipsis) < at
        return node.args[0], (out.dim() - (len(idx) - at) if after_ellipsis else at)
    return None


def _repeated_heads(node: Any) -> _RepeatedHeads | None:
    """Read ``node`` (an SDPA key or value) as K/V heads repeated in place, each K/V head followed by
    the query heads of its group, which is the pairing ``enable_gqa`` makes (query head j reads K/V
    head j // n_rep).  Recognised by structure, whatever the spelling:

    * a size-1 dim right after the heads (``x[:, :, None]``, ``unsqueeze``, or a group axis of size 1
      from ``split``), ``expand``-ed to n_rep and merged into the heads (``reshape``/``view``/``flatten``);
    * ``repeat_interleave(n_rep, dim=heads)``;

    either followed by transposes/permutes that bring the heads to dim -3 of the SDPA input.
    Returns None when ``node`` repeats nothing; raises :class:`_NotGqa` for a repeat in the other order
    (``expand`` before the heads: query head j would read K/V head j mod H_kv)."""
    layout: list[fx.Node] = []
    while _is_call(node, _LAYOUT_METHODS, _LAYOUT_FUNCS) and isinstance(node.args[0], fx.Node):
        layout.append(node)
        node = node.args[0]
    layout.reverse()
    out = tensor_of(node)
    if out is None or not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    rank = out.dim()
    if _is_call(node, {"repeat_interleave"}, {torch.repeat_interleave}):
        names = ("repeats", "dim", "output_size")
        given = dict(zip(names, node.args[1:]), **node.kwargs)
        rep, dim, src = given.get("repeats"), given.get("dim"), tensor_of(node.args[0])
        if not isinstance(dim, int) or isinstance(value_of(rep), torch.Tensor) or src is None or src.dim() != rank:
            return None
        rep, heads, squeeze, source = value_of(rep), dim % rank, None, node.args[0]
    elif _is_call(node, _MERGE_METHODS, _MERGE_FUNCS) and _is_call(node.args[0], {"expand"}, set()):
        expand = node.args[0]
        before, after = tensor_of(expand.args[0]), tensor_of(expand)
        if before is None or after is None or before.dim() != after.dim() or after.dim() != rank + 1:
            return None
        grown = [i for i in range(after.dim()) if not _same(before.shape[i], after.shape[i])]
        if len(grown) != 1 or not _same(before.shape[grown[0]], 1):
            return None
        g, shape = grown[0], tuple(after.shape)
        rep = shape[g]
        if g > 0 and _shape_is(out, shape[: g - 1] + (shape[g - 1] * rep,) + shape[g + 1 :]):
            heads = g - 1  # (H_kv, n_rep) merged: head j reads K/V head j // n_rep
        elif g + 1 < len(shape) and _shape_is(out, shape[:g] + (rep * shape[g + 1],) + shape[g + 2 :]):
            raise _NotGqa(
                f"{node.name} repeats K/V heads in tile order (query head j reads K/V head j mod H_kv); "
                "enable_gqa pairs head j with K/V head j // n_rep, so K/V stay expanded"
            )
        else:
            return None
        inserted = _inserted_dim(expand.args[0])
        source, squeeze = (inserted[0], None) if inserted is not None and inserted[1] == g else (expand.args[0], g)
    else:
        return None
    for op in layout:
        heads = _layout_dim(op, heads, rank)
        if heads is None:
            return None
    if heads != rank - 3:
        return None  # the repeated dim is not SDPA's head dim
    if isinstance(rep, int) and rep <= 1:
        return None
    return _RepeatedHeads(source, squeeze, tuple(layout), rep)


def _shape_is(val: torch.Tensor, shape: tuple) -> bool:
    return val.dim() == len(shape) and all(_same(a, b) for a, b in zip(val.shape, shape))


def _build_unexpanded(graph: fx.Graph, kv: _RepeatedHeads) -> fx.Node:
    """The unexpanded K/V in SDPA's layout: ``source`` (squeezed) through the same transposes."""
    node = kv.source
    if kv.squeeze is not None:
        node = graph.call_method("squeeze", (node, kv.squeeze))
    for op in kv.layout:
        if op.op == "call_method":
            node = graph.call_method(op.target, (node, *op.args[1:]), dict(op.kwargs))
        else:
            node = graph.call_function(op.target, (node, *op.args[1:]), dict(op.kwargs))
    return node


def _rewrite_gqa(sdpa: fx.Node) -> tuple[Any, str | None]:
    """Hand SDPA the unexpanded K/V with ``enable_gqa=True``.  Returns the group size (None when not
    rewritten) and, for a repeat that cannot be rewritten, the reason."""
    if sdpa_arg(sdpa, "enable_gqa"):
        return None, None
    old = [sdpa_arg(sdpa, "key"), sdpa_arg(sdpa, "value")]
    try:
        k, v = (_repeated_heads(n) for n in old)
    except _NotGqa as err:
        return None, str(err)
    if k is None or v is None:
        return None, None
    if not _same(k.n_rep, v.n_rep):
        return None, f"K and V repeat their heads by different factors ({k.n_rep}, {v.n_rep}): K/V stay expanded"
    with sdpa.graph.inserting_before(sdpa):
        new_k, new_v = _build_unexpanded(sdpa.graph, k), _build_unexpanded(sdpa.graph, v)
    args, kwargs = sdpa_with(sdpa, enable_gqa=True)
    sdpa.args, sdpa.kwargs = (args[0], new_k, new_v), kwargs
    erase_if_dead(sdpa.graph, old)
    return k.n_rep, None


def _mask_source(mask: Any) -> Any:
    """``mask`` without identity slices (transformers 4.57's ``mask[:, :, :, :key_len]`` in the attention
    interface): inside a checkpointed body the slice is taken of the placeholder that brings the mask in."""
    while (base := _identity_slice_of(mask)) is not None:
        mask = base
    return mask


def _make_causal(sdpa: fx.Node, analysis: MaskAnalysis) -> None:
    args, kwargs = sdpa_with(sdpa, attn_mask=None, is_causal=analysis.causal or None)
    sdpa.args, sdpa.kwargs = args, kwargs


def _describe(causal: bool, checks: list[tuple[str, fx.Node]]) -> str:
    what = "causal mask → is_causal=True" if causal else "all-True mask dropped"
    if checks:
        listed = ", ".join(f"{kind}({table.name})" for kind, table in checks)
        what += f" when {listed} (checked each step; the masked graph otherwise)"
    return what


def _zero_dropout_check(dropout: fx.Node, outer_of: dict, main: fx.GraphModule) -> tuple[str, fx.Node] | None:
    """A run-time check that a dropout probability read from the graph is 0, or None.

    Under ``dynamic=True`` Dynamo lifts the module's float ``attention_dropout`` to a 0-d tensor input and
    SDPA receives ``tensor.item()``.  The causal kernel is taken only when it is 0 (as in HF training with
    ``attention_dropout = 0.0``); with dropout the masked graph runs, as written."""
    if dropout.op != "call_method" or dropout.target != "item" or not isinstance(dropout.args[0], fx.Node):
        return None
    source = outer_of.get(dropout.args[0], dropout.args[0])
    if not isinstance(source, fx.Node) or source.graph is not main.graph or source.op != "placeholder":
        return None
    val = tensor_of(source)
    return ("zero", source) if val is not None and val.numel() == 1 else None


def build_guard(graph: fx.Graph, checks: list[tuple[str, fx.Node]], owner: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with ``graph``'s placeholders that returns the conjunction of ``checks``: whether
    the causal rewrite is exact for these inputs.  It reads only the small B×S ingredients."""
    needed: set[fx.Node] = set()
    stack = [table for _, table in checks]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        if has_side_effects(node) or node.op not in ("placeholder", "call_function", "call_method", "get_attr"):
            raise NotCausal(f"the guard would have to run {node.name}")
        needed.add(node)
        stack.extend(node.all_input_nodes)
    guard = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = guard.placeholder(node.name)
        elif node in needed:
            env[node] = guard.node_copy(node, lambda a: env[a])
    preds = [guard.call_function(attention_ops.CHECKS[kind], (env[table],)) for kind, table in checks]
    guard.output(guard.call_function(attention_ops.all_of, tuple(preds)))
    return fx.GraphModule(owner, guard)


def rewrite_attention(
    main: fx.GraphModule, bodies: list[tuple[fx.GraphModule, fx.Node]], *, assume_checks: bool
) -> tuple[list[RegionDecision], fx.GraphModule | None]:
    """Rewrite every SDPA call of ``main`` and of the checkpointed ``bodies`` (each with the
    ``tag_activation_checkpoint`` node that calls it).

    A mask that is causal only under run-time checks is rewritten when ``assume_checks`` (the caller
    then guards the graph with :func:`build_guard` on the returned checks) and kept otherwise.
    Returns one decision per call and the guard of the checks assumed (None when none were).
    """
    decisions: list[RegionDecision] = []
    analyses: dict[fx.Node, MaskAnalysis | NotCausal] = {}
    assumed: list[tuple[str, fx.Node]] = []

    def analysis_of(mask: fx.Node) -> MaskAnalysis | NotCausal:
        if mask not in analyses:
            try:
                analyses[mask] = analyse_mask(mask)
            except NotCausal as err:
                analyses[mask] = err
            except Exception as err:  # a reader bug must cost the rewrite of this mask, nothing else
                analyses[mask] = NotCausal(f"could not read the mask ({type(err).__name__}: {err})")
        return analyses[mask]

    for owner, hop in [(main, None), *bodies]:
        outer_of = {}
        if hop is not None:
            phs = [n for n in owner.graph.nodes if n.op == "placeholder"]
            outer_of = dict(zip(phs, hop.args[1:]))
        calls = [n for n in owner.graph.nodes if n.op == "call_function" and n.target in SDPA_FUNCS]
        released = {_mask_source(sdpa_arg(n, "attn_mask")) for n in calls} - {None}
        for sdpa in calls:
            decisions.append(_rewrite_one(main, sdpa, outer_of, analysis_of, assumed if assume_checks else None))
        if hop is not None:
            _drop_unused_operands(owner, hop, released)
    guard = build_guard(main.graph, assumed, main) if assumed else None  # before the ingredients die
    for analysis in analyses.values():
        if isinstance(analysis, MaskAnalysis):
            _erase_dead_mask(main.graph, analysis)
    return decisions, guard


def _vmap_block(graph: fx.Graph, inner: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The outermost ``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting`` pair around ``inner``."""
    depth, start, found = 0, None, False
    for node in graph.nodes:
        kind = _vmap_bookkeeping(node)
        if kind == "_vmap_increment_nesting":
            if depth == 0:
                start, found = node, False
            depth += 1
        elif kind == "_vmap_decrement_nesting":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0 and found:
                return start, node
        elif node is inner:
            if depth == 0:
                return None
            found = True
    return None


def _erase_dead_mask(graph: fx.Graph, analysis: MaskAnalysis) -> None:
    """Erase a mask the rewrite left without users: its construction (every node of which the reader
    accepted: pure, a private in-place add or a vmap batch dim), the ingredients only it read, and a
    vmap block left with nothing but its own bookkeeping (nesting balanced, nothing inside observes it)."""
    if analysis.mask.users:
        return
    batched = [n for n in analysis.construction if _batch_dim_op(n)]
    block = _vmap_block(graph, batched[0]) if batched else None
    for node in reversed(analysis.construction):
        if not node.users:
            graph.erase_node(node)
    erase_if_dead(graph, list(analysis.ingredients))
    if block is None:
        return
    first, last = block
    if first.prev.op != "root" and _vmap_bookkeeping(first.prev) == "lazy_load_decompositions":
        first = first.prev
    span, node = [], first
    while True:
        span.append(node)
        if node is last:
            break
        node = node.next
    if all(_vmap_bookkeeping(n) or (_batch_dim_op(n) and not n.users) for n in span):
        inputs = [a for n in span for a in n.all_input_nodes if a not in span]
        for n in reversed(span):
            graph.erase_node(n)
        erase_if_dead(graph, inputs)


def _rewrite_one(
    main: fx.GraphModule, sdpa: fx.Node, outer_of: dict, analysis_of, assumed: list | None
) -> RegionDecision:
    """Rewrite one SDPA call; checks it relies on are added to ``assumed`` (None: rely on none)."""
    where = module_path(sdpa) or sdpa.name
    q = tensor_of(sdpa_arg(sdpa, "query"))
    tokens = int(q.shape[-2]) if q is not None and isinstance(q.shape[-2], int) else None
    done = []
    group, gqa_why_not = _rewrite_gqa(sdpa)
    if group is not None:
        done.append(f"K/V unexpanded (enable_gqa, {group} query heads per K/V head)")
    mask = sdpa_arg(sdpa, "attn_mask")
    dropout = sdpa_arg(sdpa, "dropout_p")
    why_not = None
    if isinstance(mask, fx.Node):
        source = _mask_source(mask)
        outer = outer_of.get(source, source)
        analysis = analysis_of(outer) if isinstance(outer, fx.Node) and outer.graph is main.graph else None
        dropout_check = _zero_dropout_check(dropout, outer_of, main) if isinstance(dropout, fx.Node) else None
        checks = (analysis.checks + [dropout_check]) if isinstance(analysis, MaskAnalysis) and dropout_check else \
            getattr(analysis, "checks", [])
        if analysis is None:
            why_not = "the mask comes from outside the graph"
        elif isinstance(analysis, NotCausal):
            why_not = f"mask not plain causal: {analysis}"
        elif sdpa_arg(sdpa, "is_causal") or (not isinstance(dropout, fx.Node) and float(dropout or 0.0) != 0.0):
            why_not = "mask with is_causal=True or dropout"
        elif isinstance(dropout, fx.Node) and dropout_check is None:
            why_not = f"the dropout probability {dropout.name} is computed in the graph"
        elif checks and assumed is None:
            why_not = f"mask kept: this is the graph for inputs that fail {_describe(analysis.causal, checks)}"
        else:
            _make_causal(sdpa, analysis)
            if source is not mask:
                erase_if_dead(sdpa.graph, [mask])
            if assumed is not None:
                assumed += [c for c in checks if c not in assumed]
            done.append(_describe(analysis.causal, checks))
    why_not = "; ".join(r for r in (gqa_why_not, why_not) if r) or None
    if not done:
        return RegionDecision(ATTENTION, where, Action.SKIPPED, why_not or "no mask and no expanded K/V: nothing to do", tokens=tokens)
    detail = "; ".join(done) + (f"; {why_not}" if why_not else "")
    return RegionDecision(ATTENTION, where, Action.REWRITTEN, "S×S mask / expanded K/V", tokens=tokens, detail=detail)


def _drop_unused_operands(body: fx.GraphModule, hop: fx.Node, released: set[fx.Node]) -> None:
    """Remove the ``released`` body placeholders (masks) the rewrite left without users, and their operands."""
    phs = [n for n in body.graph.nodes if n.op == "placeholder"]
    dead = {i for i, ph in enumerate(phs) if ph in released and not ph.users}
    if not dead:
        return
    operands = list(hop.args[1:])
    for i in dead:
        body.graph.erase_node(phs[i])
    hop.args = (hop.args[0], *[op for i, op in enumerate(operands) if i not in dead])  # the caller recompiles


#: Key under ``gm.meta`` of a graph whose attention rewrite relies on run-time checks (:class:`MaskGuard`).
GUARD_KEY = "mst_mask_guard"


@dataclass
class MaskGuard:
    """What the backend needs to keep a check-dependent rewrite exact: ``guard(*inputs)`` says whether
    the rewritten graph is exact for these inputs, ``masked`` is the graph to run when it is not."""

    guard: fx.GraphModule
    masked: fx.GraphModule
