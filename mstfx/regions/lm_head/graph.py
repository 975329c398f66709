"""Analyse: find LM head + cross-entropy regions by graph structure.

Pattern (torch level)::

    logits = linear(h, W, b?)                    # W: vocab × hidden, tied to the embedding or not
    z = transforms(logits)                       # any of: float()/to(dtype), * c, / c, tanh, and the
                                                 # reshapes view(-1, V), reshape(B*S, V), flatten(0, 1)
    loss = cross_entropy(z, target, ignore_index=i, reduction='mean'|'sum')
    loss = loss / n                              # optional, left as written (a sum over a token count)

``transforms`` covers logit scaling (Cohere, Granite) and soft-capping ``c·tanh(z/c)`` (Gemma 2).  The
reshapes may take any path (``flatten()`` then ``view(-1, V)``): a pure reshape keeps the row-major
order, so ending at ``[tokens, vocab]`` from ``[..., vocab]`` they flatten the leading dims in order,
as the rewrite does.  A transpose or permute of the logits is not a reshape and is left unchanged.
A ``reduction='sum'`` loss divided afterwards (``/ n_tokens``: a number, a size, a 0-d tensor such as
``(labels != -100).sum()``, or anything else) keeps that divide as written: it applies to the chunked
sum exactly as it did to the whole one.  The report names it.
If the logits (or any intermediate) are also used elsewhere, typically returned as a graph output,
the region is still rewritten for the loss but reported as ``logits escape``: the full logits then
still exist for that other user.

A graph with no loss whose LM head output is returned (the caller, e.g. a trainer, computes the loss
outside the compiled graph) has nothing to chunk; :func:`find_escaping_logits` finds that case so the
report can say why the LM head was left alone.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...passes.common import (
    CantChunk,
    LinearMatch,
    check_no_side_effects,
    is_cast,
    is_reshape,
    match_linear,
    module_path,
    tensor_of,
    value_of,
)

_CE_FUNCS = {F.cross_entropy}
_CE_DEFAULTS = {
    "weight": None,
    "size_average": None,
    "ignore_index": -100,
    "reduce": None,
    "reduction": "mean",
    "label_smoothing": 0.0,
}
#: Ops that move the logits' dims, so that the loss rows are no longer the tokens in order.
_REORDERS = {"transpose", "permute", "t", "movedim", "swapaxes", "swapdims", "flip", "roll",
             torch.transpose, torch.permute, torch.t, torch.movedim, torch.swapaxes, torch.swapdims,
             torch.flip, torch.roll}
_CE_ORDER = ["input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"]


@dataclass
class LmHeadRegion:
    loss: fx.Node
    head: LinearMatch
    target: fx.Node
    transforms: tuple
    ignore_index: int
    reduction: str
    tokens: int | torch.SymInt
    hidden: int
    vocab: int
    dtype: torch.dtype
    logits_escape: bool
    chain: list[fx.Node]
    name: str = "lm_head"
    after: str = ""  # what the graph does to the loss next, for the report (``÷ n_tokens``)


def _ce_args(node: fx.Node) -> dict:
    bound = dict(_CE_DEFAULTS)
    for key, val in zip(_CE_ORDER, node.args):
        bound[key] = val
    bound.update(node.kwargs)
    return bound


def _scalar(arg) -> float | None:
    if isinstance(arg, numbers.Number) and not isinstance(arg, bool):
        return float(arg)
    return None


def _transform_of(node: fx.Node, src: fx.Node) -> tuple | None:
    """The logit transform that ``node`` applies to ``src``, or None if it is not one we can invert."""
    if is_cast(node):
        return ("cast", tensor_of(node).dtype)
    if is_reshape(node):
        return ("view",)
    target = node.target
    if node.op == "call_function" and target in (operator.mul, torch.mul) or (
        node.op == "call_method" and target == "mul"
    ):
        other = node.args[1] if node.args[0] is src else node.args[0]
        c = _scalar(other)
        return ("scale", c) if c is not None else None
    if node.op == "call_function" and target in (operator.truediv, torch.div) or (
        node.op == "call_method" and target == "div"
    ):
        if node.args[0] is src and not node.kwargs:
            c = _scalar(node.args[1])
            return ("scale", 1.0 / c) if c else None
        return None
    if (node.op == "call_function" and target in (torch.tanh, F.tanh)) or (
        node.op == "call_method" and target == "tanh"
    ):
        return ("tanh",)
    return None


def match_lm_head(ce: fx.Node) -> LmHeadRegion:
    """Match the chain ``linear → transforms → cross_entropy`` that ends at ``ce``."""
    args = _ce_args(ce)
    if args["weight"] is not None:
        raise CantChunk("cross_entropy with class weights")
    if args["size_average"] is not None or args["reduce"] is not None:
        raise CantChunk("cross_entropy with legacy size_average/reduce arguments")
    if args["label_smoothing"] not in (0, 0.0):
        raise CantChunk("cross_entropy with label smoothing")
    if args["reduction"] not in ("mean", "sum"):
        raise CantChunk(f"cross_entropy with reduction={args['reduction']!r} (only 'mean' and 'sum' are exact as a scalar)")
    if not isinstance(args["ignore_index"], int):
        raise CantChunk("ignore_index is not a constant")
    z, target = args["input"], args["target"]
    zv, tv = tensor_of(z), tensor_of(target)
    if zv is None or tv is None or zv.dim() != 2 or tv.dim() != 1:
        raise CantChunk("cross_entropy input is not [tokens, vocab] with [tokens] targets")
    if tv.dtype not in (torch.int64, torch.int32):
        raise CantChunk("cross_entropy with probability targets")

    chain: list[fx.Node] = []
    transforms: list[tuple] = []
    node = z
    while True:
        head = match_linear(node)
        if head is not None:
            break
        if node.op == "placeholder":
            raise CantChunk(
                f"the logits ({node.name}) are an input of this graph: a graph break separates the LM head "
                "from the loss (see torch._dynamo.explain)"
            )
        if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
            raise CantChunk(f"{node.name}: no LM head projection found before the loss")
        # the token operand of a binary op may be the second argument (c * z)
        src = next((a for a in node.args if isinstance(a, fx.Node) and tensor_of(a) is not None), None)
        t = _transform_of(node, src)
        if t is None and node.target in _REORDERS:
            raise CantChunk(
                f"{node.name} ({node.target if isinstance(node.target, str) else node.target.__name__}) reorders "
                "the logits: the loss rows are not the hidden states' tokens in order (not a pure flatten)"
            )
        if t is None:
            raise CantChunk(f"{node.name} ({getattr(node.target, '__name__', node.target)}) between LM head and loss is not a supported logit transform")
        if t[0] != "view":
            transforms.append(t)
        chain.append(node)
        node = src
    chain.append(node)
    check_no_side_effects(chain[::-1], ce)  # the rewrite moves the head and its transforms to the loss
    escape = any(u not in chain and u is not ce for n in chain for u in n.users)
    if head.node.target is torch.addmm:
        raise CantChunk("LM head written as addmm (transposed weight) is not supported")
    hv, wv = tensor_of(head.input), tensor_of(head.weight)
    if hv is None or wv is None:
        raise CantChunk("LM head without shape information")
    if not _same_size(zv.shape[-1], wv.shape[0]):
        raise CantChunk(f"the loss reads the logits reshaped to {tuple(zv.shape)}: not [tokens, vocab={wv.shape[0]}]")
    tokens = math.prod(hv.shape[:-1])
    if not isinstance(tokens, torch.SymInt) and not isinstance(zv.shape[0], torch.SymInt) and tokens != zv.shape[0]:
        raise CantChunk("LM head rows do not map one-to-one to loss rows")
    transforms.reverse()
    return LmHeadRegion(
        loss=ce,
        head=head,
        target=target,
        transforms=tuple(transforms),
        ignore_index=int(args["ignore_index"]),
        reduction=str(args["reduction"]),
        tokens=tokens,
        hidden=int(wv.shape[1]),
        vocab=int(wv.shape[0]),
        dtype=hv.dtype,
        logits_escape=escape,
        chain=chain,
        after=_divide_after(ce, str(args["reduction"])),
    )


def _same_size(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def _divide_after(ce: fx.Node, reduction: str) -> str:
    """``÷ n`` when the loss's one user divides it by something (a sum over a token count), else ""."""
    if len(ce.users) != 1:
        return ""
    user = next(iter(ce.users))
    divide = (user.op == "call_function" and user.target in (operator.truediv, torch.div, torch.true_divide)) or (
        user.op == "call_method" and user.target in ("div", "true_divide", "__truediv__")
    )
    if not divide or len(user.args) != 2 or user.args[0] is not ce or user.kwargs:
        return ""
    divisor = user.args[1]
    name = divisor.name if isinstance(divisor, fx.Node) else repr(divisor)
    val = value_of(divisor)
    if isinstance(val, torch.Tensor) and val.dim() > 0:
        return f"then divided by the non-scalar {name} {tuple(val.shape)} (left as written)"
    return f"then ÷ {name} (kept, after the chunked {reduction})"


def find_lm_head_regions(graph: fx.Graph) -> tuple[list[LmHeadRegion], list[tuple[str, str]]]:
    regions, skipped = [], []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _CE_FUNCS:
            try:
                regions.append(match_lm_head(node))
            except CantChunk as err:
                skipped.append((node.name, str(err)))
    return regions, skipped


#: The report's reason for an LM head whose logits are a graph output and whose loss is not in the graph.
LOGITS_LEAVE = (
    "not chunked: logits leave the compiled graph (loss computed outside, e.g. by the trainer); use "
    "mstfx.drop_logits(model) and read the model's own .loss (labels passed in), or for TRL "
    "mstfx.integrations.trl.MstSFTTrainer"
)


def find_escaping_logits(graph: fx.Graph, params: set[fx.Node]) -> list[tuple[str, str]]:
    """LM heads whose logits are returned by ``graph`` that computes no loss from them: ``(where, why)``.

    An LM head here is a projection by a parameter that widens (vocab > hidden) whose output, through
    logit transforms only (casts, views, scaling, soft-capping), is a graph output.  Only meaningful
    for a graph with no ``cross_entropy`` (the caller checks)."""
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if out is None:
        return []
    returned = set(out.all_input_nodes)
    found = []
    for node in graph.nodes:
        head = match_linear(node)
        if head is None or head.weight not in params or head.out_features <= head.in_features:
            continue
        frontier, seen = [node], set()
        while frontier:  # the head's output and its logit transforms
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            frontier += [u for u in n.users if _transform_of(u, n) is not None]
        if seen & returned:
            found.append((module_path(node) or node.name, LOGITS_LEAVE))
    return found
