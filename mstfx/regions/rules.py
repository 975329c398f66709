"""The default number of mini-sequences M of each region kind, as plain integer arithmetic.

One source for the backend's chunk rule (``mstfx.passes.chunk_rule``, which adds the dynamic-shape
guards), the planner's prediction of what the backend will do, and :func:`mstfx.chunked_logprobs`.
No torch import: the planner uses it without one.

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
