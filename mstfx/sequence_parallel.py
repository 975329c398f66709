"""Ulysses sequence parallelism in the ``mst`` backend: each rank of a group holds S/N tokens.

    batch = mstfx.sequence_parallel.shard_batch(input_ids, labels, group)  # this rank's tokens, global positions
    model = mstfx.compile(model, sequence_parallel=group)
    loss = model(**batch).loss           # this rank's summed loss / the global token count
    loss.backward(); mstfx.sequence_parallel.reduce_gradients(model.parameters(), group)

**Attention.**  With ``MstConfig(sequence_parallel=group)`` the backend replaces every SDPA call of
the torch-level graph (``mstfx/passes/sequence_parallel.py``) by :func:`ulysses_attention`: q/k/v
``[B, H, S/N, D]`` go through one all-to-all each (``torch.distributed._functional_collectives``, traceable
by Dynamo, AOT autograd and Inductor, with an autograd rule) to ``[B, H/N, S, D]`` (every token,
this rank's H/N heads), attention runs over the whole sequence (``is_causal`` as the graph had it) and
one more all-to-all brings the output back to ``[B, H, S/N, D]``.  Everything else (MLPs, LM head and
loss, chunked by mst) runs per rank on its own S/N tokens.  Grouped-query K/V are split by their own
heads when N divides them; otherwise each K/V head is repeated for its query heads first (exact,
more K/V traffic).  Refused (:class:`SequenceParallelError`): H not divisible by N, an attention that
keeps a mask (padding, sliding windows, a caller's 4-D mask), attention computed without SDPA (a
softmax or flex attention in the graph: ``attn_implementation="eager"``), and at run time inputs that
fail the causal check of the attention rewrite (padding).

**Positions and loss.**  :func:`shard_batch` takes the *full* batch (every rank of the group holds
it) and returns this rank's slice with the tokens' global ``position_ids`` and labels shifted over
the *whole* sequence (the label of a shard's last token is the next rank's first token; ``-100``
after the very last).  They are passed to Hugging Face's causal-LM loss as ``shift_labels`` (it
then skips its own shift) with ``num_items_in_batch`` = the global count of labelled tokens, so it
computes ``sum(this rank's token losses) / global count``.  The sum of these over the group is the
global mean, exactly: :func:`global_loss` all-reduces it for logging, and the parameter gradients
summed over the group (:func:`reduce_gradients`) are the gradients of the global mean.  (A
data-parallel wrapper that *averages* gradients over all DP·N ranks needs each rank's loss times N.)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .planning.cost_model import kv_heads_split


class SequenceParallelError(ValueError):
    """A model or batch the Ulysses rewrite cannot run exactly; the message says why."""


def _world_and_rank(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


def check_heads(heads: int, kv_heads: int, world: int, where: str = "attention") -> None:
    """Refuse query heads that ``world`` does not divide (each rank computes H/N whole heads)."""
    if heads % world:
        raise SequenceParallelError(
            f"{where}: {heads} query heads are not divisible by the sequence-parallel group size {world}; "
            "Ulysses gives each rank H/N whole heads"
        )
    if kv_heads <= 0 or heads % kv_heads:
        raise SequenceParallelError(f"{where}: {heads} query heads are not a multiple of {kv_heads} K/V heads")


def _seq_to_heads(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """``[B, H, s, D]`` (s tokens of this rank) → ``[B, H/N, N·s, D]`` (this rank's heads, every token)."""
    from .compat.distributed import functional_all_to_all

    all_to_all_single_autograd, wait_tensor = functional_all_to_all()
    b, h, s, d = x.shape
    send = x.reshape(b, world, h // world, s, d).permute(1, 0, 2, 3, 4).contiguous()  # head group j → rank j
    got = wait_tensor(all_to_all_single_autograd(send.reshape(world * b, h // world * s * d), None, None, group_name))
    # got[j] is rank j's tokens (sequence shard j) of this rank's head group
    return got.reshape(world, b, h // world, s, d).permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)


def _heads_to_seq(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """``[B, H/N, N·s, D]`` → ``[B, H, s, D]``: the inverse of :func:`_seq_to_heads`."""
    from .compat.distributed import functional_all_to_all

    all_to_all_single_autograd, wait_tensor = functional_all_to_all()
    b, hl, full, d = x.shape
    s = full // world
    send = x.reshape(b, hl, world, s, d).permute(2, 0, 1, 3, 4).contiguous()  # sequence shard j → rank j
    got = wait_tensor(all_to_all_single_autograd(send.reshape(world * b, hl * s * d), None, None, group_name))
    # got[j] is head group j of this rank's tokens
    return got.reshape(world, b, hl, s, d).permute(1, 0, 2, 3, 4).reshape(b, world * hl, s, d)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, group_name: str, world: int,
                      dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = False) -> torch.Tensor:
    """SDPA over the whole sequence for a rank holding ``[B, H, S/N, D]`` q/k/v (the call the backend
    puts in place of each SDPA; see the module docstring).  K/V with fewer heads than the query
    (``enable_gqa``) are split by their own heads when ``world`` divides them, else repeated first, as
    few times as :func:`kv_heads_split` says."""
    import torch.nn.functional as F

    heads, kv_heads = query.shape[1], key.shape[1]
    check_heads(heads, kv_heads, world)
    split = kv_heads_split(heads, kv_heads, world)
    if split != kv_heads:  # each K/V head next to its group of query heads, as enable_gqa pairs them
        key, value = key.repeat_interleave(split // kv_heads, dim=1), value.repeat_interleave(split // kv_heads, dim=1)
        kv_heads = split
    q, k, v = (_seq_to_heads(t, world, group_name) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                         enable_gqa=kv_heads != heads)
    return _heads_to_seq(out, world, group_name)


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, group: Any = None, *,
                attention_mask: torch.Tensor | None = None, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """This rank's part of a full ``[B, S]`` batch, as keyword arguments of a Hugging Face causal LM.

    Returns ``input_ids`` and ``position_ids`` (global) of tokens ``r·S/N … (r+1)·S/N`` of rank r of
    ``group``, their labels shifted over the whole sequence (as ``labels`` and ``shift_labels``) and
    ``num_items_in_batch``, the global number of labelled tokens (a 0-d tensor).  ``labels`` default to
    ``input_ids``.  An ``attention_mask`` with any zero (padding) is refused; all ones may be passed.
    """
    world, rank = _world_and_rank(group)
    if input_ids.dim() != 2:
        raise SequenceParallelError(f"shard_batch takes input_ids of shape [batch, seq], got {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if seq % world:
        raise SequenceParallelError(f"sequence length {seq} is not divisible by the sequence-parallel group size {world}")
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise SequenceParallelError(
            "sequence parallelism supports no padding: attention_mask has zeros (pack sequences or pad to the "
            "same length with labels -100 instead)"
        )
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise SequenceParallelError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    shifted = torch.cat([labels[:, 1:], labels.new_full((batch, 1), ignore_index)], dim=1)
    count = (shifted != ignore_index).sum()
    local = seq // world
    part = slice(rank * local, (rank + 1) * local)
    positions = torch.arange(rank * local, (rank + 1) * local, device=input_ids.device).expand(batch, local)
    mine = shifted[:, part].contiguous()
    return {
        "input_ids": input_ids[:, part].contiguous(),
        "position_ids": positions.contiguous(),
        "labels": mine,
        "shift_labels": mine,
        "num_items_in_batch": count,
    }


def global_loss(loss: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The global mean loss (for logging): the sum over ``group`` of each rank's loss, detached."""
    import torch.distributed as dist

    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def reduce_gradients(parameters: Iterable[torch.nn.Parameter], group: Any = None) -> None:
    """Sum each parameter's gradient over ``group``: the gradients of the global mean loss."""
    import torch.distributed as dist

    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
