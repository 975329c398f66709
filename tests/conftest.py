"""Shared fixtures: tiny causal LMs built from configs (no downloads) and an eager reference runner."""

from __future__ import annotations

import copy

import pytest
import torch

from mstfx.tools.architectures import loss_and_grads, tiny_llama  # noqa: E402,F401  (one step runner and tiny Llama for every test)

torch.set_num_threads(max(1, torch.get_num_threads()))


def tiny_gpt2(vocab=256, hidden=64, layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # else HF logs a warning inside forward: a graph break before the loss
    return model


def assert_same(ref, got, rtol=1e-4, atol=1e-5):
    ref_loss, ref_grads = ref
    loss, grads = got
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol, equal_nan=True)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def clone():
    return copy.deepcopy
