"""How many mini-sequences M each region gets: the kinds' default rules as plain integer arithmetic,
and the choice for one region of a graph (the user's or the plan's M, else the default, applied to a
token count that may be dynamic).

One source for the backend (each kind's ``mini_sequences``, called by the pipeline's ``chunk_rule``
pass), the planner's prediction of what the backend will do, and :func:`mstfx.chunked_logprobs`.
Importing it needs no torch (the planner uses it without one): a token count can only be a
``torch.SymInt`` when torch is loaded, and the dynamic-shape guards are imported only for one.
Explicit M from the user or a plan always wins; every M is capped so a chunk holds a token.

The paper's rule (Luo et al., MsT, NeurIPS 2024, Section 3): an MLP's mini-sequence is as long as the hidden
size, so its tokens×intermediate activations shrink to about hidden×intermediate,
``M = ⌈tokens / hidden⌉``; the LM head uses ``M = ⌈vocab / hidden⌉`` so that one chunk's logits
(tokens/M × vocab) are about the size of the hidden states (tokens × hidden).

One refinement for the LM head: no chunk is shorter than :data:`MIN_LM_HEAD_CHUNK_TOKENS` tokens.  Each
LM-head chunk adds one pass over the vocab×hidden weight-gradient accumulator, so tiny chunks cost time
for no memory gain once the chunk's logits are small next to the rest of the step (measured on the
reference CPU config: M = 63 and M = 16 give the same peak, M = 16 is faster).  At long sequences the
paper's M is unchanged (Llama3-8B at 60K tokens: M = 32, 1875 tokens a chunk).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

#: The default LM-head rule never makes chunks shorter than this many tokens (``MstConfig``'s
#: ``min_lm_head_chunk_tokens`` default, and what the planner assumes).
MIN_LM_HEAD_CHUNK_TOKENS = 256


def mlp_rule(tokens: int, hidden: int) -> int:
    """``⌈tokens / hidden⌉``: a mini-sequence as long as the hidden size (MLPs and routed experts)."""
    return max(1, math.ceil(tokens / hidden))


def lm_head_rule(tokens: int, hidden: int, vocab: int, min_chunk_tokens: int = MIN_LM_HEAD_CHUNK_TOKENS) -> int:
    """``⌈vocab / hidden⌉``, but no chunk shorter than ``min_chunk_tokens`` tokens:
    ``M ≤ ⌊tokens / min_chunk_tokens⌋`` (513 tokens: 2 chunks of 257 and 256, not 3 of 171), and
    1 when the tokens are fewer than the minimum."""
    return max(1, min(math.ceil(vocab / hidden), tokens // max(1, min_chunk_tokens)))

def _symbolic(tokens: Any) -> bool:
    """Whether ``tokens`` is a dynamic size (a ``torch.SymInt``); never without torch loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(tokens, torch.SymInt)


def concrete_tokens(tokens: Any) -> int:
    """The number of tokens M is chosen for.

    Static: the number itself.  Dynamic (a SymInt): the largest count of the power-of-two bucket
    ``[2^k, 2^(k+1))`` that holds the current size, and the graph is guarded to that bucket.  A graph
    compiled at 3K tokens can then never silently run 60K tokens with 3K's M: Dynamo recompiles once
    per bucket, so the number of compiles is bounded by log2 of the length range.
    """
    if not _symbolic(tokens):
        return int(tokens)
    from torch.fx.experimental.symbolic_shapes import guard_bool, optimization_hint

    n = max(1, int(optimization_hint(tokens)))
    lo = 1 << (n.bit_length() - 1)
    guard_bool(tokens >= lo)
    guard_bool(tokens < 2 * lo)
    return 2 * lo - 1


def _fewest_tokens(tokens: Any) -> int:
    """The fewest tokens the graph can see: the count itself, or the bottom of a dynamic size's bucket
    (:func:`concrete_tokens` guards the graph to that bucket)."""
    if not _symbolic(tokens):
        return max(1, int(tokens))
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    n = max(1, int(optimization_hint(tokens)))
    return 1 << (n.bit_length() - 1)


def _capped(m: int, tokens: Any, asked: bool, what: str) -> int:
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
    return str(tokens) if _symbolic(tokens) else str(int(tokens))


def choose(tokens: Any, mini_sequences: int | None, default, what: str) -> int:
    """``mini_sequences`` if given, else ``default(concrete token count)``; capped at the tokens."""
    m = mini_sequences if mini_sequences is not None else default(concrete_tokens(tokens))
    return _capped(m, tokens, mini_sequences is not None, what)


def mlp_chunks(tokens: Any, hidden: int, mini_sequences: int | None = None) -> int:
    """M of an MLP (and of routed experts): ``mini_sequences``, else ⌈tokens / hidden⌉."""
    return choose(tokens, mini_sequences, lambda n: mlp_rule(n, hidden), "MLP")


def lm_head_chunks(
    tokens: Any,
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
