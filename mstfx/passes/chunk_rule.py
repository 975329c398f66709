"""How many mini-sequences M each region gets: the user's or the plan's number, else the kind's default
rule (:mod:`mstfx.regions.rules`, one source with the planner), applied to a token count that may be
dynamic.  Explicit M from the user or a plan always wins; every M is capped so a chunk holds a token.
"""

from __future__ import annotations

import warnings

import torch
from torch.fx.experimental.symbolic_shapes import guard_bool, optimization_hint

from ..regions.rules import MIN_LM_HEAD_CHUNK_TOKENS, lm_head_rule, mlp_rule


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
                "(a mini-sequence holds at least one token, and each extra one only adds per-chunk overhead, "
                "and compile time in the unrolled form)",
                UserWarning,
                stacklevel=4,
            )
        m = most
    return max(1, m)


def token_str(tokens) -> str:
    """A region's token count for the report (a dynamic count as its symbol)."""
    return str(tokens) if isinstance(tokens, torch.SymInt) else str(int(tokens))


def choose(tokens: int | torch.SymInt, mini_sequences: int | None, default, what: str) -> int:
    """``mini_sequences`` if given, else ``default(concrete token count)``; capped at the tokens."""
    m = mini_sequences if mini_sequences is not None else default(concrete_tokens(tokens))
    return _capped(m, tokens, mini_sequences is not None, what)


def mlp_chunks(tokens: int | torch.SymInt, hidden: int, mini_sequences: int | None = None) -> int:
    """M of an MLP (and of routed experts): ``mini_sequences``, else ⌈tokens / hidden⌉."""
    return choose(tokens, mini_sequences, lambda n: mlp_rule(n, hidden), "MLP")


def lm_head_chunks(
    tokens: int | torch.SymInt,
    hidden: int,
    vocab: int,
    mini_sequences: int | None = None,
    min_chunk_tokens: int = MIN_LM_HEAD_CHUNK_TOKENS,
) -> int:
    """M of an LM head + loss: ``mini_sequences``, else ⌈vocab / hidden⌉ with no chunk shorter than
    ``min_chunk_tokens`` tokens.  A dynamic count is held to the bound at the fewest tokens of its
    bucket (:func:`_fewest_tokens`): the graph runs every count of the bucket with this M."""
    fewest = _fewest_tokens(tokens)
    return choose(tokens, mini_sequences, lambda n: lm_head_rule(fewest, hidden, vocab, min_chunk_tokens), "LM head")
