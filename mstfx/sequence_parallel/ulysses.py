"""The Ulysses attention op: SDPA over the whole sequence for a rank that holds S/N tokens.

q/k/v ``[B, H, S/N, D]`` go through one all-to-all each (functional collectives from
:mod:`mstfx.compat.distributed`: traceable by Dynamo, AOT autograd and Inductor, with an autograd rule)
to ``[B, H/N, S, D]`` (every token, this rank's H/N heads), attention runs over the whole sequence
(``is_causal`` as the graph had it) and one more all-to-all brings the output back to ``[B, H, S/N, D]``.
The rewrite pass (``mstfx/passes/sequence_parallel.py``) puts :func:`ulysses_attention` in place of
each SDPA call.
"""

from __future__ import annotations

import torch

from ..planning.cost_model import kv_heads_split
from .errors import check_heads


def _seq_to_heads(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """``[B, H, s, D]`` (s tokens of this rank) → ``[B, H/N, N·s, D]`` (this rank's heads, every token)."""
    from ..compat.distributed import functional_all_to_all

    all_to_all_single_autograd, wait_tensor = functional_all_to_all()
    b, h, s, d = x.shape
    send = x.reshape(b, world, h // world, s, d).permute(1, 0, 2, 3, 4).contiguous()  # head group j → rank j
    got = wait_tensor(all_to_all_single_autograd(send.reshape(world * b, h // world * s * d), None, None, group_name))
    # got[j] is rank j's tokens (sequence shard j) of this rank's head group
    return got.reshape(world, b, h // world, s, d).permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)


def _heads_to_seq(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """``[B, H/N, N·s, D]`` → ``[B, H, s, D]``: the inverse of :func:`_seq_to_heads`."""
    from ..compat.distributed import functional_all_to_all

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
