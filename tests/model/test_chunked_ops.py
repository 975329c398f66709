"""The fused chunked linear cross-entropy against eager F.cross_entropy, over shapes, dtypes and masks."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings

from mstfx import chunked_ops


def _reference(h, w, b, t, ignore_index, reduction, transforms):
    z = F.linear(h, w, b)
    for tr in transforms:
        z = z.to(tr[1]) if tr[0] == "cast" else z * tr[1] if tr[0] == "scale" else torch.tanh(z)
    return F.cross_entropy(z, t, ignore_index=ignore_index, reduction=reduction)


def _grads(fn, *leaves):
    for x in leaves:
        x.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [x.grad.clone() for x in leaves]


TRANSFORMS = [
    (("cast", torch.float32),),
    (("scale", 0.0625), ("cast", torch.float32)),  # Cohere / Granite style logit scaling
    (("scale", 1 / 30.0), ("tanh",), ("scale", 30.0), ("cast", torch.float32)),  # Gemma 2 soft-capping
    (),  # loss computed in the model dtype
]


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 70),
    chunks=st.integers(1, 12),
    vocab=st.sampled_from([7, 33, 128]),
    hidden=st.sampled_from([4, 16]),
    reduction=st.sampled_from(["mean", "sum"]),
    ignore=st.sampled_from(["none", "some", "first_half", "all_but_one"]),
    transforms=st.sampled_from(TRANSFORMS),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
# fp32 sum reduction: the chunked and eager sums round differently, by more than a fixed 1e-6 (eager
# itself is that far from fp64 here); the check against fp64 must accept it
@example(tokens=26, chunks=8, vocab=33, hidden=16, reduction="sum", ignore="none", transforms=TRANSFORMS[0], bias=True,
         dtype=torch.float32)
def test_matches_eager(tokens, chunks, vocab, hidden, reduction, ignore, transforms, bias, dtype):
    g = torch.Generator().manual_seed(tokens * 31 + chunks)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, vocab, (tokens,), generator=g)
    if ignore == "some":
        t[::3] = -100
    elif ignore == "first_half":
        t[: tokens // 2] = -100  # whole chunks with nothing to learn
    elif ignore == "all_but_one":
        t[1:] = -100
    transforms = tuple(("cast", dtype) if tr[0] == "cast" else tr for tr in transforms)
    leaves = [h, w] + ([b] if bias else [])
    ref = _grads(lambda: _reference(h, w, b, t, -100, reduction, transforms), *leaves)
    got = _grads(
        lambda: chunked_ops.linear_cross_entropy(
            h, w, b, t, reduction=reduction, transforms=transforms, chunks=chunks
        ),
        *leaves,
    )
    if dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-10, equal_nan=True)
        torch.testing.assert_close(got[0], ref[0], **tol)
        for a, e in zip(got[1], ref[1]):
            torch.testing.assert_close(a, e, **tol)
        return
    # fp32: both sides round differently (chunked sums), so compare each with the fp64 truth; the chunked
    # result may be off by a few times eager's own error, plus a few fp32 ulps of the tensor's scale
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    h64, w64, b64 = leaves64[0], leaves64[1], leaves64[2] if bias else None
    tr64 = tuple(("cast", torch.float64) if tr[0] == "cast" else tr for tr in transforms)
    truth = _grads(lambda: _reference(h64, w64, b64, t, -100, reduction, tr64), *leaves64)
    for name, a, e, x in zip(["loss", "dh", "dw", "db"], [got[0], *got[1]], [ref[0], *ref[1]], [truth[0], *truth[1]]):
        if torch.isnan(x).any():
            assert torch.equal(torch.isnan(a), torch.isnan(x)), name
            continue
        eager_err = (e.double() - x).abs().max().item()
        bound = 4 * eager_err + 8 * torch.finfo(torch.float32).eps * x.abs().max().item() + 1e-30
        err = (a.double() - x).abs().max().item()
        assert err <= bound, f"{name}: chunked error {err:.3g} vs fp64, eager's {eager_err:.3g}, bound {bound:.3g}"


def test_bf16_accumulates_in_fp32():
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(500, 32, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 500, (300,))
    ref = _grads(lambda: F.cross_entropy(F.linear(h, w).float(), t), h, w)
    got = _grads(lambda: chunked_ops.linear_cross_entropy(h, w, None, t, chunks=7), h, w)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, e in zip(got[1], ref[1]):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)


def test_all_ignored_mean_is_nan_like_eager():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    t = torch.full((5,), -100)
    ref = F.cross_entropy(F.linear(h, w), t)
    got = chunked_ops.linear_cross_entropy(h, w, None, t, chunks=2)
    assert torch.isnan(ref) and torch.isnan(got)
    got.backward()  # eager's gradient is exactly zero here, not NaN
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_upstream_gradient_scales():
    torch.manual_seed(1)
    h = torch.randn(10, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    t = torch.randint(0, 9, (10,))
    ref = _grads(lambda: 3.5 * _reference(h, w, None, t, -100, "sum", (("cast", torch.float32),)), h, w)
    got = _grads(lambda: 3.5 * chunked_ops.linear_cross_entropy(h, w, None, t, reduction="sum", chunks=3), h, w)
    for a, e in zip(got[1], ref[1]):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("n,m", [(0, 3), (2, 5), (10, 3), (10, 10), (7, 1)])
def test_chunk_sizes_cover_every_token(n, m):
    sizes = chunked_ops.chunk_sizes(n, m)
    assert len(sizes) == m and sum(sizes) == n and min(sizes) >= 0 and max(sizes) - min(sizes) <= 1


def test_bad_arguments():
    h, w, t = torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        chunked_ops.linear_cross_entropy(h, w, None, t, reduction="none")
    with pytest.raises(ValueError, match="chunks"):
        chunked_ops.linear_cross_entropy(h, w, None, t, chunks=0)
