"""A second backward through the same graph (``retain_graph=True``) gives eager's gradients.

The loop operators save what their backward needs (the chunk loop its inputs, the fused LM head + loss
the head gradients made in forward); a backward that consumed or overwrote any of them would make the
second backward's gradients wrong while the first stays right.  Inductor's donated buffers (saved
tensors reused as scratch in backward) refuse ``retain_graph`` on their own, so they are turned off
here, scoped to the test, as a user who needs two backwards does.
"""

from __future__ import annotations

import copy

import torch

import mstfx
from mstfx.tools.architectures import sample_batch, summarize
from mstfx.tools.measure import fresh_code

from conftest import tiny_llama


def _two_backwards(model, ids, labels, backend=None):
    """Gradients after the first and after the second of two backwards of one loss."""
    fn = lambda i, l: model(input_ids=i, labels=l).loss  # noqa: E731
    if backend is not None:
        fn = torch.compile(fresh_code(fn), backend=backend)
    loss = fn(ids, labels)
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    return first, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_second_backward_matches_eager_with_mlp_and_lm_head_loops():
    model = tiny_llama()
    ids, labels = sample_batch()
    ref_first, ref_second = _two_backwards(copy.deepcopy(model), ids, labels)
    be = mstfx.backend(mini_sequences=4)  # Inductor, loop form
    with torch._functorch.config.patch(donated_buffer=False):
        first, second = _two_backwards(model, ids, labels, be)
    chunked, _ = summarize(be)
    assert chunked["mlp"] == 2 and chunked["lm_head"] == 1, mstfx.explain(be)
    assert be.config.chunk_form == "loop"
    for name in ref_second:
        torch.testing.assert_close(first[name], ref_first[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} 1st: {m}")
        torch.testing.assert_close(second[name], ref_second[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} 2nd: {m}")
    # the second backward added the same gradients again (not stale or overwritten saved tensors)
    for name in ref_second:
        torch.testing.assert_close(second[name], 2 * first[name], rtol=1e-4, atol=1e-5, msg=name)
