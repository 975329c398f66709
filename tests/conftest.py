"""Shared fixtures: tiny causal LMs built from configs (no downloads) and one training-step runner.

They live here, not in the package: the tests' models and their eager reference are the tests' own,
so a change to the shipped tools cannot move the reference the product is compared against.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))


def tiny_llama(vocab=256, hidden=64, inter=176, layers=2, tie=False, **cfg):
    """A tiny Llama (4 query / 2 K/V heads, SDPA attention, no cache), weights from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, use_cache=False,
        attn_implementation="sdpa", **cfg,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def loss_and_grads(model, ids, labels, compile_backend=None, attention_mask=None):
    """One training step of ``model``: the loss and every parameter's gradient (detached copies).

    Eager when ``compile_backend`` is None; else compiled with it as ``mstfx.compile`` compiles (under
    the tracing settings of checkpointed layers), from a step function with a code object of its own so
    no graph of an earlier call is reused."""
    model.zero_grad(set_to_none=True)

    def step(i, l, a):
        return model(input_ids=i, labels=l, attention_mask=a).loss

    if compile_backend is not None:
        from mstfx.compat import with_tracing_settings

        fresh = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, None, step.__closure__)
        step = with_tracing_settings(torch.compile(fresh, backend=compile_backend))
    loss = step(ids, labels, attention_mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


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
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture
def clone():
    return copy.deepcopy
