"""Runtime checks behind the attention rewrite's guard (called from rewritten graphs).

Each check reads one small B×S ingredient of a Hugging Face mask (padding mask, position ids, packed
sequence ids) or a 0-d dropout probability and answers, as a 0-d bool tensor, whether that ingredient leaves the causal mask
unchanged.  The rewritten graph takes SDPA's causal kernel when every check holds and the original
masked call otherwise (``torch.cond``), so the result is exact for every input.
"""

from __future__ import annotations

import torch


def all_true(table: torch.Tensor) -> torch.Tensor:
    """A padding mask with no zeros masks nothing."""
    return table.bool().all()


def rows_increasing(table: torch.Tensor) -> torch.Tensor:
    """Positions that strictly increase along each row order keys as their indices do, so
    ``pos[key] <= pos[query]`` is ``key <= query``."""
    return (table[..., 1:] > table[..., :-1]).all()


def rows_constant(table: torch.Tensor) -> torch.Tensor:
    """One packed-sequence id per row: ``id[query] == id[key]`` holds everywhere."""
    return (table == table[..., :1]).all()


def zero(table: torch.Tensor) -> torch.Tensor:
    """A dropout probability of 0 (read from the graph) drops nothing: the causal kernel computes the same."""
    return (table == 0).all()


#: Check name (as the attention pass records it) → function.
CHECKS = {"all_true": all_true, "rows_increasing": rows_increasing, "rows_constant": rows_constant, "zero": zero}


def all_of(*preds: torch.Tensor) -> torch.Tensor:
    """The conjunction of 0-d bool predicates."""
    out = preds[0]
    for pred in preds[1:]:
        out = out & pred
    return out
