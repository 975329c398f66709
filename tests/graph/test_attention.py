"""The attention pass: an in-graph causal mask becomes ``is_causal=True``, expanded K/V ``enable_gqa``.

Every case compares with eager on the same inputs.  Masks that are causal only for some inputs (a
padding mask, position ids) must take the masked graph when those inputs say so; masks that are not
causal (sliding windows, offsets, strict ``<``) must be left unchanged and reported.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import mstfx
from conftest import assert_same, tiny_llama
from mstfx.backend import GuardedGraph, MstBackend
from mstfx.compat import with_tracing_settings
from mstfx.passes.common import value_of
from mstfx.tools.measure import fresh_code

B, H, S, D = 2, 4, 32, 8


class RecordingBackend(MstBackend):
    """The mst backend compiling with aot_eager, keeping the graphs it hands to the compiler."""

    def __init__(self, **options):
        super().__init__(compiler="aot_eager", **options)
        self.graphs: list[fx.GraphModule] = []
        self.compiled: list = []

    def _compiler(self, example_inputs=()):
        inner = super()._compiler(example_inputs)

        def compile_and_record(gm, example_inputs):
            self.graphs.append(gm)
            return inner(gm, example_inputs)

        return compile_and_record

    def __call__(self, gm, example_inputs):
        out = super().__call__(gm, example_inputs)
        self.compiled.append(out)
        return out

    def attention(self):
        return [d for r in self.reports for d in r.decisions if d.kind == "attention"]

    def guarded(self) -> list[GuardedGraph]:
        return [c for c in self.compiled if isinstance(c, GuardedGraph)]


def _all_nodes(gm: fx.GraphModule):
    for mod in gm.modules():
        if isinstance(mod, fx.GraphModule):
            yield from mod.graph.nodes


def _square_tensors(gm: fx.GraphModule, s: int) -> list[str]:
    """Nodes whose value ends in an s×s square (a mask or attention weights)."""
    out = []
    for node in _all_nodes(gm):
        val = value_of(node)
        if isinstance(val, torch.Tensor) and val.dim() >= 2 and tuple(val.shape[-2:]) == (s, s):
            out.append(node.name)
    return out


def _sdpa_calls(gm: fx.GraphModule):
    return [n for n in _all_nodes(gm) if n.op == "call_function" and n.target in (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)]


# --------------------------------------------------------------------------------------------------
# Masks built the way Hugging Face builds them (indices from arange, compared, looked up, and-ed)
# --------------------------------------------------------------------------------------------------
def _indices(s=S):
    b = torch.arange(B)[:, None, None, None]
    q = (torch.arange(s) + 0)[None, None, :, None]
    kv = (torch.arange(s) + 0)[None, None, None, :]
    return b, q, kv


def causal_and_padding(q_, k_, v_, am, pos):
    b, q, kv = _indices()
    mask = q.new_ones((), dtype=torch.bool) & (kv <= q) & am.bool()[b, kv]
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.expand(B, -1, S, S))


def swapped_comparison(q_, k_, v_, am, pos):
    b, q, kv = _indices()
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=((q >= kv) & am.bool()[b, kv]).expand(B, -1, S, S))


def positions_and_packing(q_, k_, v_, am, pos):
    """Causal over position ids, one packed sequence per run of consecutive positions (HF's packed check)."""
    b, q, kv = _indices()
    seg = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    mask = (pos[b, kv] <= pos[b, q]) & (seg[b, q] == seg[b, kv])
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.expand(B, -1, S, S))


def strict_lower(q_, k_, v_, am, pos):
    b, q, kv = _indices()
    mask = (kv < q) | (kv == 0)  # no diagonal: not causal
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.expand(B, -1, S, S))


def sliding_window(q_, k_, v_, am, pos):
    b, q, kv = _indices()
    mask = (kv <= q) & (kv > q - 8) & am.bool()[b, kv]
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.expand(B, -1, S, S))


def offset_by_one(q_, k_, v_, am, pos):
    b, q, kv = _indices()
    kv1 = (torch.arange(S) + 1)[None, None, None, :]
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=(kv1 <= q).expand(B, -1, S, S))


def mask_from_caller(q_, k_, v_, am, pos):
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=am.bool()[:, None, None, :].expand(B, 1, S, S))


def _vmap_bhqkv(mask_fn, b, h, q, kv):
    """``mask_fn`` over every (batch, head, query, key), the way transformers 4.57 builds its masks
    (``_vmap_for_bhqkv``: four nested ``torch.vmap``, key innermost)."""
    for dims in [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)]:
        mask_fn = torch.vmap(mask_fn, in_dims=dims, out_dims=0)
    return mask_fn(b, h, q, kv)


def _vmap_ranges(s=S):
    kv = torch.arange(s)
    kv += 0  # transformers 4.57 offsets the key range in place
    return torch.arange(B), torch.arange(1), torch.arange(0, s), kv


def vmapped_causal_and_padding(q_, k_, v_, am, pos):
    pad = am.bool()

    def element(b, h, q, kv):  # table[b, kv] is aten.index under 4.57's TransformGetItemToIndex
        return q.new_ones((), dtype=torch.bool) & kv.le(q).to(q.device) & torch.ops.aten.index(pad, [b, kv])

    mask = _vmap_bhqkv(element, *_vmap_ranges())
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask[:, :, :, :S])


def vmapped_sliding_window(q_, k_, v_, am, pos):
    def element(b, h, q, kv):
        return kv.le(q) & kv.gt(q - 8)

    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=_vmap_bhqkv(element, *_vmap_ranges()))


def vmapped_shared_key_range(q_, k_, v_, am, pos):
    """The key range is written in place after another reader took it: the write is seen, not private."""
    kv = torch.arange(S)
    first = kv * 1
    kv += 1
    mask = _vmap_bhqkv(lambda b, h, q, k: k.le(q), torch.arange(B), torch.arange(1), torch.arange(S), kv)
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask) + first.sum()


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g, requires_grad=True) for _ in range(3)]


def _run(fn, am, pos, backend=None):
    q, k, v = _qkv()
    f = fn if backend is None else torch.compile(fn, backend=backend, dynamic=False)
    out = f(q, k, v, am, pos)
    out.square().sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


def _inputs(padding=0, packed=False):
    am = torch.ones(B, S, dtype=torch.long)
    if padding:
        am[1, -padding:] = 0  # right padding: every query still sees at least one key
    pos = torch.arange(S).repeat(B, 1)
    if packed:
        pos[0, S // 2:] = torch.arange(S - S // 2)  # two sequences packed into row 0
    return am, pos


def _compare(fn, am, pos, backend):
    ref = _run(fn, am, pos)
    got = _run(fn, am, pos, backend)
    torch.testing.assert_close(got[0], ref[0], equal_nan=True)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("fn", [causal_and_padding, swapped_comparison, positions_and_packing, vmapped_causal_and_padding])
def test_causal_mask_rewritten_and_guarded(fn):
    torch._dynamo.reset()
    be = RecordingBackend()
    _compare(fn, *_inputs(), be)
    (decision,) = be.attention()
    assert decision.action == "rewritten" and "is_causal=True" in decision.detail, mstfx.explain(be)
    sdpa = _sdpa_calls(be.graphs[0])
    assert sdpa and all(n.kwargs.get("attn_mask") is None and n.kwargs.get("is_causal") for n in sdpa)
    assert _square_tensors(be.graphs[0], S) == []
    assert not [n for n in _all_nodes(be.graphs[0]) if "functorch" in str(getattr(n.target, "__module__", ""))], \
        "a vmap block is left after its mask died"
    (guarded,) = be.guarded()
    assert guarded.calls == {"causal": 1, "masked": 0}
    # inputs the causal kernel would get wrong: the guard must route them to the graph with the mask
    bad = _inputs(packed=True) if fn is positions_and_packing else _inputs(padding=5)
    _compare(fn, *bad, be)
    assert guarded.calls == {"causal": 1, "masked": 1}


@pytest.mark.parametrize(
    "fn,why",
    [(strict_lower, "causal condition"), (sliding_window, "sliding window"), (offset_by_one, "causal condition"), (mask_from_caller, ""),
     (vmapped_sliding_window, "sliding window"), (vmapped_shared_key_range, "side effects")],
)
def test_masks_that_are_not_causal_are_left_unchanged(fn, why):
    torch._dynamo.reset()
    be = RecordingBackend()
    _compare(fn, *_inputs(padding=3), be)
    decisions = be.attention()
    assert [d.action for d in decisions] == ["skipped"], mstfx.explain(be)
    assert why in decisions[0].reason
    assert not be.guarded()


def test_constant_positions_need_no_guard():
    """Position ids made in the graph (arange) are checked at compile time: no per-step guard."""

    def fn(q_, k_, v_, am, pos):
        return positions_and_packing(q_, k_, v_, am, torch.arange(S).repeat(B, 1))

    torch._dynamo.reset()
    be = RecordingBackend()
    _compare(fn, *_inputs(), be)
    assert [d.action for d in be.attention()] == ["rewritten"]
    assert not be.guarded()
    assert "when" not in be.attention()[0].detail


# --------------------------------------------------------------------------------------------------
# A real model: gradient-checkpointed GQA Llama, with and without padding
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [0, 6, None])  # None: no attention_mask at all
@pytest.mark.parametrize("checkpointing", [True, False])
def test_llama_attention_rewritten_exactly(checkpointing, padding):
    model = tiny_llama(layers=2)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seq = 40  # no weight or activation of this model is 40×40: an S×S tensor is a mask
    ids = torch.randint(1, 256, (2, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids) if padding is not None else None
    labels = ids.clone()
    if padding:
        mask[1, -padding:] = 0
        labels[1, -padding:] = -100

    def step(backend=None):
        model.zero_grad(set_to_none=True)
        f = lambda i, l, a: model(input_ids=i, labels=l, attention_mask=a).loss  # noqa: E731
        loss = (with_tracing_settings(torch.compile(f, backend=backend)) if backend else f)(ids, labels, mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = step()
    torch._dynamo.reset()
    be = RecordingBackend(mini_sequences=4)
    assert_same(ref, step(be))
    attention = be.attention()
    assert len(attention) == 2 and all(d.action == "rewritten" for d in attention), mstfx.explain(be)
    assert all("enable_gqa" in d.detail and "is_causal=True" in d.detail for d in attention)
    main = be.graphs[0]
    assert _square_tensors(main, seq) == [], "an S×S tensor is left in the rewritten graph"
    for sdpa in _sdpa_calls(main):
        assert value_of(sdpa.args[1]).shape[1] == 2  # K with its 2 KV heads, not the 4 query heads
    if padding is None:  # positions made in the graph: checked at compile time, nothing to guard
        assert not be.guarded()
        return
    (guarded,) = be.guarded()
    assert guarded.calls == ({"causal": 0, "masked": 1} if padding else {"causal": 1, "masked": 0})


def test_rewrite_attention_off():
    model = tiny_llama(layers=1)
    ids = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    be = RecordingBackend(rewrite_attention=False)
    torch.compile(lambda i: model(input_ids=i, labels=i, attention_mask=torch.ones_like(i)).loss, backend=be)(ids)
    assert be.attention() == [] and not be.guarded()
    with pytest.raises(ValueError, match="rewrite_attention"):
        mstfx.MstConfig(rewrite_attention="yes")


# --------------------------------------------------------------------------------------------------
# Dynamic shapes: the mask's ranges have a symbolic length (what mstfx.transform compiles)
# --------------------------------------------------------------------------------------------------
def _dynamic_mask_fn(shift_keys: bool):
    """HF's construction with lengths read from the inputs; ``shift_keys`` offsets the key range by the
    length of another input (a different symbol): that mask is not causal and must be kept."""

    def fn(q_, k_, v_, extra):
        b, s = q_.shape[0], q_.shape[-2]
        q = (torch.arange(s) + 0)[None, None, :, None]
        kv = (torch.arange(s) + (extra.shape[0] if shift_keys else 0))[None, None, None, :]
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=(kv <= q).expand(b, -1, s, s))

    return fn


@pytest.mark.parametrize("shift_keys", [False, True])
def test_symbolic_lengths_are_compared_exactly(shift_keys):
    fn = _dynamic_mask_fn(shift_keys)
    be = RecordingBackend()
    compiled = torch.compile(fresh_code(fn), backend=be, dynamic=True)
    for s in (24, 40):  # the second length reuses the dynamic graph
        q, k, v = (t[:, :, :s].detach().requires_grad_() for t in _qkv())
        extra = torch.zeros(3)
        ref = fn(q, k, v, extra)
        got = compiled(q, k, v, extra)
        torch.testing.assert_close(got, ref, equal_nan=True)
    decisions = be.attention()
    assert decisions, "the dynamic graph was not compiled through the mst backend"
    expected = "skipped" if shift_keys else "rewritten"
    assert all(d.action == expected for d in decisions), mstfx.explain(be)
    if not shift_keys:
        assert all(n.kwargs.get("attn_mask") is None and n.kwargs.get("is_causal") for g in be.graphs for n in _sdpa_calls(g))


def test_llama_attention_rewritten_under_dynamic_shapes():
    """``dynamic=True`` (mstfx.transform's compile): the mask reads the symbolic sequence length; it is
    still recognised as causal, guarded each step, and exact for every length and padding."""
    model = tiny_llama(layers=1)
    be = RecordingBackend(mini_sequences=2)
    f = torch.compile(fresh_code(lambda i, l, a: model(input_ids=i, labels=l, attention_mask=a).loss),
                      backend=be, dynamic=True)
    for seq, padding in ((40, 0), (56, 0), (56, 5)):
        ids = torch.randint(1, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        mask, labels = torch.ones_like(ids), ids.clone()
        if padding:
            mask[1, -padding:], labels[1, -padding:] = 0, -100

        def step(fn):
            model.zero_grad(set_to_none=True)
            loss = fn(ids, labels, mask)
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

        assert_same(step(lambda i, l, a: model(input_ids=i, labels=l, attention_mask=a).loss), step(f))
    attention = be.attention()
    assert attention and all(d.action == "rewritten" and "is_causal=True" in d.detail for d in attention), mstfx.explain(be)
    (guarded,) = be.guarded()
    assert guarded.calls["causal"] >= 1 and guarded.calls["masked"] == 1
