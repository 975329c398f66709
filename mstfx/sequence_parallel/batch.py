"""The data side of sequence parallelism: this rank's shard of a batch, and the loss and gradients
reduced over the group (positions, shifted labels and the global token count make the per-rank losses
sum to the global mean exactly; see :mod:`mstfx.sequence_parallel`)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .errors import SequenceParallelError


def _world_and_rank(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


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
