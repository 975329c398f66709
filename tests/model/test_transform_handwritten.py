"""``transform`` on a model written by hand (no Hugging Face ``.config``): it refuses with both ways out,
or plans from an architecture given as ``config=`` (the model's own parameters still give the count and
dtype) and trains like eager."""

from __future__ import annotations

import copy

import pytest
import torch

import mstfx
from test_handwritten_models import D, S, V, NanoGPT

CONFIG = dict(model_type="gpt2", hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=V, n_positions=S, tie_word_embeddings=True)


def test_transform_refuses_a_model_without_an_architecture_and_says_what_to_do():
    model = NanoGPT()
    with pytest.raises(TypeError, match=r"no Hugging Face '\.config'.*config=.*mstfx\.compile\(model, mini_sequences=M\)"):
        mstfx.transform(model, budget_gb=1)
    assert "forward" not in model.__dict__  # left as it was


def test_transform_plans_from_a_config_hint_and_trains_like_eager():
    torch.manual_seed(0)
    model = NanoGPT()
    ref_model = copy.deepcopy(model)
    idx = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(0))
    ref = ref_model(idx, idx)
    ref.backward()
    mstfx.transform(model, budget_gb=1, batch=2, optimizer="none", config=CONFIG, seq_len=S, compiler="aot_eager")
    state = model._mstfx_transform
    assert state.plan is not None and state.longest_seq_len >= S
    assert state.plan.breakdown.params == pytest.approx(sum(p.numel() * 4 for p in model.parameters()), rel=0.05)
    loss = model(idx, idx)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
