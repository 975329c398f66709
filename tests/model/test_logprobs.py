"""Per-token log-probabilities without full logits (``mstfx.chunked_logprobs``), and graphs whose logits
are used by something other than the cross-entropy (DPO-style losses): they must stay correct."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mstfx
from conftest import assert_same, loss_and_grads, tiny_llama


def _reference(h, lin, labels, *, softcap=None, scale=None, temperature=None, ignore_index=-100):
    z = lin(h).float()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature is not None:
        z = z / temperature
    lp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != ignore_index, lp, 0.0)


def _grads(out, g, inputs):
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize(
    "opts",
    [{}, {"softcap": 5.0}, {"scale": 0.25}, {"temperature": 0.7}, {"softcap": 3.0, "temperature": 1.3}],
    ids=["plain", "softcap", "scale", "temperature", "softcap+temperature"],
)
@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_chunked_logprobs_exact(opts, chunks):
    torch.manual_seed(0)
    B, S, H, V = 2, 23, 16, 97
    h = torch.randn(B, S, H, requires_grad=True)
    lin = torch.nn.Linear(H, V)
    labels = torch.randint(0, V, (B, S))
    labels[:, ::4] = -100
    g = torch.randn(B, S)
    ref = _reference(h, lin, labels, **opts)
    kw = {"logit_scale" if k == "scale" else k: v for k, v in opts.items()}
    got = mstfx.chunked_logprobs(h, lin, labels, chunks=chunks, **kw)
    assert got.shape == (B, S) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    assert (got[:, ::4] == 0).all()
    params = [h, lin.weight, lin.bias]
    for a, b in zip(_grads(ref, g, params), _grads(got, g, params)):
        torch.testing.assert_close(b, a)


def test_chunked_logprobs_weight_tensor_bf16_and_no_ignore():
    torch.manual_seed(1)
    h = torch.randn(3, 10, 32, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(64, 32) * 0.1).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 64, (3, 10))
    ref = torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    got = mstfx.chunked_logprobs(h, w, labels, ignore_index=None)
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    ga = torch.autograd.grad(ref.sum(), [h, w])
    gb = torch.autograd.grad(got.sum(), [h, w])
    for a, b in zip(ga, gb):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_logprobs_never_builds_full_logits():
    torch.manual_seed(0)
    T, H, V, M = 256, 16, 512, 8
    h = torch.randn(T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (T,))
    with _LargestTensor() as mode:
        out = mstfx.chunked_logprobs(h, w, labels, chunks=M)
        out.sum().backward()
    assert mode.largest <= max(T * V // M, V * H), (mode.largest, T * V)


def test_chunked_logprobs_under_compile_and_dpo_loss():
    """A DPO loss on chosen/rejected sequences from a tiny Llama, through the mst backend."""
    model = tiny_llama(layers=1)
    torch.manual_seed(0)
    chosen, rejected = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    ref_logp = torch.randn(2), torch.randn(2)  # frozen reference-model sums

    def seq_logp(ids, fn):
        hidden = model.model(input_ids=ids).last_hidden_state
        return fn(hidden[:, :-1], ids[:, 1:]).sum(-1)

    full = lambda h, y: torch.log_softmax(model.lm_head(h).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    chunked = lambda h, y: mstfx.chunked_logprobs(h, model.lm_head, y, chunks=3)  # noqa: E731

    def dpo(fn):
        margin = (seq_logp(chosen, fn) - ref_logp[0]) - (seq_logp(rejected, fn) - ref_logp[1])
        return -F.logsigmoid(0.1 * margin).mean()

    def run(step):
        model.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = run(lambda: dpo(full))
    assert_same(ref, run(lambda: dpo(chunked)))
    be = mstfx.backend(compiler="aot_eager", mini_sequences=3)
    assert_same(ref, run(torch.compile(lambda: dpo(chunked), backend=be)))
    assert sum(d.kind == "mlp" for r in be.reports for d in r.chunked) >= 1, mstfx.explain(be)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_logits_used_besides_the_loss_stay_correct(compiler):
    """CE loss plus a term on the same logits (z-loss / distillation-style): the loss region is chunked
    but the logits escape, and loss and gradients still equal eager."""
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (2, 32))
    labels = ids.clone()
    labels[:, :5] = -100

    def step(i, l):
        out = model(input_ids=i, labels=l)
        z = out.logits.float()
        return out.loss + 1e-2 * torch.logsumexp(z, -1).pow(2).mean() + (z.softmax(-1)[..., 7]).mean()

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = run(step)
    be = mstfx.backend(compiler=compiler, mini_sequences=3)
    got = run(torch.compile(step, backend=be))
    assert_same(ref, got)
    assert any(r.logits_escape for r in be.reports), mstfx.explain(be)


def test_logprob_loss_without_cross_entropy_is_not_chunked_at_the_head():
    """A graph that takes log_softmax of full logits (no cross_entropy) has no LM-head region to chunk:
    the head is left alone and the MLPs still chunk; results equal eager."""
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (2, 32))

    def step(i, l):
        logits = model(input_ids=i).logits.float()
        return -torch.log_softmax(logits[:, :-1], -1).gather(-1, i[:, 1:].unsqueeze(-1)).mean()

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = run(step)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=4)
    assert_same(ref, run(torch.compile(step, backend=be)))
    kinds = [d.kind for r in be.reports for d in r.chunked]
    assert "lm_head" not in kinds and kinds.count("mlp") == 1, mstfx.explain(be)


@pytest.mark.parametrize("kwargs", [{"chunks": 0}, {"chunks": -2}, {"chunks": 2.5}, {"chunks": True}, {"temperature": 0.0}, {"softcap": -1.0}])
def test_chunked_logprobs_rejects_bad_arguments_by_name(kwargs):
    hidden, head, labels = torch.randn(2, 8, 16), torch.nn.Linear(16, 32), torch.randint(0, 32, (2, 8))
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        mstfx.chunked_logprobs(hidden, head, labels, **kwargs)
