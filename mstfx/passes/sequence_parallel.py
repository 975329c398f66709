"""Rewrite: every SDPA call becomes Ulysses attention across the sequence-parallel group.

Runs on the torch-level graph after the attention pass (``attention.py``), so a causal mask built in
the graph is already ``is_causal=True`` and grouped-query K/V are unexpanded.  Each SDPA call (in the
graph and in checkpointed bodies) is replaced by :func:`mstfx.sequence_parallel.ulysses_attention`
with the same arguments plus the group's name and size; AOT autograd traces through it (the
all-to-alls are functional collectives with an autograd rule).  A call that still has a mask, or
whose query heads the group size does not divide, is refused with
:class:`~mstfx.sequence_parallel.SequenceParallelError`: attention within each rank's shard alone
would be silently wrong, so there is no fallback.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from ..planning.cost_model import kv_heads_split
from ..sequence_parallel import SequenceParallelError, check_heads, ulysses_attention
from .attention import SDPA_FUNCS, sdpa_arg, sdpa_with
from .common import module_path, tensor_of
from ..vocabulary import Action
from .report import ATTENTION, RegionDecision

log = logging.getLogger("mstfx")


def _refuse_masked_inputs(*_: Any) -> None:
    raise SequenceParallelError(
        "sequence parallelism: these inputs need the attention mask (padding, or positions that do not increase "
        "along each row); only an all-ones attention_mask is supported"
    )


def _static_heads(node: Any, where: str) -> int:
    val = tensor_of(node)
    if val is None or val.dim() != 4:
        raise SequenceParallelError(f"{where}: SDPA input {getattr(node, 'name', node)} is not a known 4-D tensor")
    try:
        return int(val.shape[1])
    except Exception as err:  # a symbolic head count
        raise SequenceParallelError(f"{where}: the number of heads is not static ({val.shape[1]})") from err


def _rewrite_one(sdpa: fx.Node, group_name: str, world: int) -> RegionDecision:
    where = module_path(sdpa) or sdpa.name
    if sdpa_arg(sdpa, "attn_mask") is not None:
        raise SequenceParallelError(
            f"{where}: sequence parallelism needs attention without a mask (plain causal or none); this call keeps "
            "its mask (padding, a sliding window, a caller's 4-D mask, or rewrite_attention=False)"
        )
    heads, kv_heads = _static_heads(sdpa_arg(sdpa, "query"), where), _static_heads(sdpa_arg(sdpa, "key"), where)
    check_heads(heads, kv_heads, world, where)
    (q, k, v), kwargs = sdpa_with(sdpa)
    sdpa.target = ulysses_attention
    sdpa.args, sdpa.kwargs = (q, k, v), {**kwargs, "group_name": group_name, "world": world}
    tokens = tensor_of(q).shape[-2]
    split = kv_heads_split(heads, kv_heads, world)
    kv = (f"K/V split by their {kv_heads} heads" if split == kv_heads
          else f"{kv_heads} K/V heads repeated to {split} before the split")
    detail = (f"Ulysses all-to-all, {heads // world} of {heads} heads per rank over {tokens}×{world} tokens "
              f"(is_causal={bool(kwargs.get('is_causal'))}; {kv})")
    return RegionDecision(ATTENTION, where, Action.REWRITTEN, "sequence parallel", tokens=f"{tokens}×{world}", detail=detail)


_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}


def _other_attention(owner: fx.GraphModule) -> fx.Node | None:
    """A softmax or flex attention call: attention computed without SDPA (e.g. ``attn_implementation="eager"``)."""
    for n in owner.graph.nodes:
        if (n.op == "call_function" and (n.target in _SOFTMAX or "flex_attention" in getattr(n.target, "__name__", ""))) \
                or (n.op == "call_method" and n.target == "softmax"):
            return n
    return None


def rewrite_sequence_parallel(main: fx.GraphModule, bodies: list[fx.GraphModule], group: Any) -> list[RegionDecision]:
    """Replace every SDPA call of ``main`` and ``bodies`` by Ulysses attention over ``group``.  A graph
    without SDPA but with a softmax or flex attention is refused: that attention would see one shard."""
    import torch.distributed as dist

    world, group_name = dist.get_world_size(group), group.group_name
    owners = [main, *bodies]
    if not any(n.op == "call_function" and n.target in SDPA_FUNCS for o in owners for n in o.graph.nodes):
        other = next((n for n in map(_other_attention, owners) if n is not None), None)
        if other is not None:
            raise SequenceParallelError(
                f"sequence parallelism splits scaled_dot_product_attention calls only; this graph computes a softmax "
                f"or flex attention ({module_path(other) or other.name}) without one (load the model with "
                "attn_implementation='sdpa')"
            )
    decisions = []
    for owner in owners:
        calls = [n for n in owner.graph.nodes if n.op == "call_function" and n.target in SDPA_FUNCS]
        for sdpa in calls:
            decisions.append(_rewrite_one(sdpa, group_name, world))
        if calls and owner is not main:
            owner.recompile()
    log.debug("mstfx: %d attention call(s) split across %d ranks (Ulysses)", len(decisions), world)
    return decisions


def refusing_graph(like: fx.GraphModule) -> fx.GraphModule:
    """A graph with ``like``'s inputs that raises :class:`SequenceParallelError` when traced or run:
    the stand-in for the graph that keeps the mask (inputs that fail the causal check)."""
    graph = fx.Graph()
    phs = [graph.placeholder(n.name) for n in like.graph.nodes if n.op == "placeholder"]
    graph.output(graph.call_function(_refuse_masked_inputs, tuple(phs)))
    return fx.GraphModule(torch.nn.Module(), graph)
