"""How many mini-sequences M each region gets when the user does not say.

The paper's rule (Luo et al., MsT, NeurIPS 2024, §3): an MLP's mini-sequence is as long as the hidden
size, so its S×I intermediates shrink to about d×I, ``M = ⌈tokens / hidden⌉``; the LM head uses
``M = ⌈vocab / hidden⌉`` so that one chunk's logits (tokens/M × vocab) are about the size of the
hidden states (tokens × hidden).

One refinement of ours for the LM head: a chunk keeps at least ``min_chunk_tokens`` tokens (default
256).  Each LM-head chunk adds one pass over the vocab×hidden weight-gradient accumulator, so tiny
chunks cost time for no memory gain once the chunk's logits are small next to the rest of the step
(measured on the reference CPU config: M = 63 and M = 16 give the same peak, M = 16 is faster).
At long sequences the paper's M is unchanged (Llama3-8B at 60K tokens: M = 32, 1875 tokens a chunk).
Explicit M from the user or a plan always wins.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.fx.experimental.symbolic_shapes import guard_bool, optimization_hint


def concrete_tokens(tokens: int | torch.SymInt) -> int:
    """The number of tokens M is chosen for.

    Static: the number itself.  Dynamic (a SymInt): the largest count of the power-of-two bucket
    ``[2^k, 2^(k+1))`` that holds the current size, and the graph is guarded to that bucket.  A graph
    compiled at 3K tokens can then never silently run 60K tokens with 3K's M: Dynamo recompiles once
    per bucket, so the number of compiles is bounded by log2 of the length range.
    """
    if not isinstance(tokens, torch.SymInt):
        return int(tokens)
    n = max(1, int(optimization_hint(tokens)))
    lo = 1 << (n.bit_length() - 1)
    guard_bool(tokens >= lo)
    guard_bool(tokens < 2 * lo)
    return 2 * lo - 1


def _fewest_tokens(tokens: int | torch.SymInt) -> int:
    """The fewest tokens the graph can see: the count itself, or the bottom of a dynamic size's bucket
    (:func:`concrete_tokens` guards the graph to that bucket)."""
    if not isinstance(tokens, torch.SymInt):
        return max(1, int(tokens))
    n = max(1, int(optimization_hint(tokens)))
    return 1 << (n.bit_length() - 1)


def _capped(m: int, tokens: int | torch.SymInt, asked: bool, what: str) -> int:
    """``m`` capped so that every chunk holds at least one token; a user's M above that is warned about."""
    most = _fewest_tokens(tokens)
    if m > most:
        if asked:
            warnings.warn(
                f"mstfx: {what} M = {m} is more than the {most} tokens this graph can see; using M = {most} "
                "(a mini-sequence holds at least one token, and each extra one is an unrolled copy that only "
                "adds compile time)",
                UserWarning,
                stacklevel=3,
            )
        m = most
    return max(1, m)


def mlp_chunks(tokens: int | torch.SymInt, hidden: int, override: int | None = None) -> int:
    n = concrete_tokens(tokens)
    m = override if override is not None else math.ceil(n / hidden)
    return _capped(m, tokens, override is not None, "MLP")


def lm_head_chunks(
    tokens: int | torch.SymInt,
    hidden: int,
    vocab: int,
    override: int | None = None,
    min_chunk_tokens: int = 256,
) -> int:
    n = concrete_tokens(tokens)
    if override is not None:
        m = override
    else:
        m = min(math.ceil(vocab / hidden), math.ceil(n / max(1, min_chunk_tokens)))
    return _capped(m, tokens, override is not None, "LM head")
