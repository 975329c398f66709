"""The LM head's default rule never makes a chunk shorter than ``min_lm_head_chunk_tokens``; the
backend's rule, the planner's prediction of it and the rule itself agree."""

from __future__ import annotations

import pytest
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from mstfx.planning import cost_model as cm
from mstfx.planning.planner import default_chunks
from mstfx.regions import rules
from mstfx.regions.rules import MIN_LM_HEAD_CHUNK_TOKENS, lm_head_rule

HIDDEN, VOCAB = 64, 50_000  # ⌈V/h⌉ = 782: the shortest-chunk bound decides below


@pytest.mark.parametrize("tokens", [1, 255, 256, 511, 512, 513, 767, 768, 1000, 4097])
def test_no_lm_head_chunk_shorter_than_the_minimum(tokens):
    m = lm_head_rule(tokens, HIDDEN, VOCAB)
    assert m == max(1, tokens // MIN_LM_HEAD_CHUNK_TOKENS)
    if m > 1:  # the shortest of M near-equal chunks has ⌊tokens/M⌋ tokens
        assert tokens // m >= MIN_LM_HEAD_CHUNK_TOKENS
    assert rules.lm_head_chunks(tokens, HIDDEN, VOCAB) == m
    arch = cm.Arch(hidden=HIDDEN, intermediate=128, layers=1, heads=4, kv_heads=4, head_dim=16, vocab=VOCAB)
    assert default_chunks(arch, tokens)[1] == m  # what the planner predicts the backend does


def test_513_tokens_make_two_chunks_not_three():
    assert lm_head_rule(513, HIDDEN, VOCAB) == 2
    assert lm_head_rule(513, HIDDEN, VOCAB, min_chunk_tokens=100) == 5  # the minimum is a parameter
    assert lm_head_rule(513, 512, 1024) == 2  # ⌈V/h⌉ still decides when it is the smaller


def test_dynamic_token_count_keeps_the_minimum_over_its_whole_bucket():
    """A dynamic graph runs every count of its power-of-two bucket with one M: the bucket's fewest
    tokens decide the bound (512..1023 tokens: M = 2, never 3)."""
    env = ShapeEnv()
    sym = env.create_symintnode(env.create_symbol(1000, source=ConstantSource("tokens")), hint=1000)
    m = rules.lm_head_chunks(sym, HIDDEN, VOCAB)
    assert m == 2
    assert 512 // m >= MIN_LM_HEAD_CHUNK_TOKENS
