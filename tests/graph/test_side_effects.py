"""No pass removes, moves past, or copies a node with side effects.

In-place writes whose result is unused (``buf.copy_(x)``, ``scatter_``), ``out=`` variants and vmap /
grad-mode context nodes matter for their effect, not their value.  A region that contains or crosses
one is left unchanged and reported; nothing outside a region is ever removed.  Each case compares the
loss, every gradient and every mutated buffer with eager.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import mstfx
from mstfx.passes.common import CantChunk, check_no_side_effects, erase_if_dead, has_side_effects


# --------------------------------------------------------------------------------------------------
# The classifier and the graph helpers, on hand-made graphs
# --------------------------------------------------------------------------------------------------
def _graph_with(*calls):
    g = fx.Graph()
    x, b = g.placeholder("x"), g.placeholder("b")
    nodes = [g.create_node(op, target, tuple(x if a == "x" else b if a == "b" else a for a in args), kw) for op, target, args, kw in calls]
    return g, nodes


@pytest.mark.parametrize(
    "op,target,args,kwargs,effect",
    [
        ("call_method", "copy_", ("b", "x"), {}, True),
        ("call_method", "scatter_", ("b", 0, "x", "x"), {}, True),
        ("call_method", "add_", ("x", 1), {}, True),
        ("call_method", "__iadd__", ("x", 1), {}, True),
        ("call_function", operator.setitem, ("b", 0, 1.0), {}, True),
        ("call_function", operator.iadd, ("x", 1), {}, True),
        ("call_function", torch.add, ("x", "x"), {"out": "b"}, True),
        ("call_function", F.relu, ("x",), {"inplace": True}, True),
        ("call_function", F.relu, ("x", True), {}, True),
        ("call_function", torch.relu_, ("x",), {}, True),
        ("call_function", torch._C._functorch._vmap_increment_nesting, (2, "error"), {}, True),
        ("call_function", torch._C._functorch._vmap_decrement_nesting, (), {}, True),
        ("call_function", torch._C._set_grad_enabled, (False,), {}, True),
        ("call_function", torch.rand, (3,), {}, True),
        ("call_function", F.relu, ("x",), {}, False),
        ("call_function", F.relu, ("x", False), {}, False),
        ("call_function", operator.add, ("x", 1), {}, False),
        ("call_method", "view", ("x", -1), {}, False),
        ("call_method", "sum", ("x",), {}, False),
        ("call_function", F.scaled_dot_product_attention, ("x", "x", "x"), {}, False),
    ],
)
def test_side_effect_classifier(op, target, args, kwargs, effect):
    kwargs = {k: ("b" if v == "b" else v) for k, v in kwargs.items()}
    g, (node,) = _graph_with((op, target, args, kwargs))
    if "out" in kwargs:
        node.kwargs = {"out": next(n for n in g.nodes if n.name == "b")}
    assert has_side_effects(node) is effect


def test_erase_if_dead_keeps_unused_in_place_writes():
    g, (write, pure, consumer) = _graph_with(
        ("call_method", "copy_", ("b", "x"), {}),
        ("call_function", operator.mul, ("x", 2), {}),
        ("call_function", operator.add, ("x", 1), {}),
    )
    consumer.args = (pure, 1)
    g.output(None)
    # the consumer is what a rewrite replaced: it and its now-dead input go, the unused write stays
    assert erase_if_dead(g, [consumer]) == 2
    assert write in g.nodes and write.graph is g


def test_region_crossing_a_write_is_refused():
    g, (first, write, last) = _graph_with(
        ("call_function", operator.mul, ("x", 2), {}),
        ("call_method", "copy_", ("b", "x"), {}),
        ("call_function", operator.add, ("x", 1), {}),
    )
    last.args = (first, 1)
    with pytest.raises(CantChunk, match="side effects"):
        check_no_side_effects([first, last], last)
    check_no_side_effects([write.next], write.next)  # a region of one pure node crosses nothing


# --------------------------------------------------------------------------------------------------
# Small modules through the backend: buffers written in place inside and around regions
# --------------------------------------------------------------------------------------------------
class _Lm(torch.nn.Module):
    """Embedding → SwiGLU MLP → LM head → cross-entropy, with a buffer written in place at ``where``."""

    def __init__(self, where: str, vocab=64, d=16, inter=48):
        super().__init__()
        self.where = where
        self.emb = torch.nn.Embedding(vocab, d)
        self.gate, self.up, self.down = (torch.nn.Linear(d, inter, bias=False), torch.nn.Linear(d, inter, bias=False),
                                         torch.nn.Linear(inter, d, bias=False))
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("buf", torch.zeros(d))
        self.register_buffer("hits", torch.zeros((), dtype=torch.long))

    def forward(self, ids, labels):
        h = self.emb(ids)
        if self.where == "before_mlp":
            self.buf.copy_(h.detach().mean((0, 1)))  # result unused; read below
        a = F.silu(self.gate(h))
        if self.where == "inside_mlp":
            a.mul_(self.up(h))  # in-place inside the region: the MLP must be left alone
        else:
            a = a * self.up(h)
        if self.where == "crossing_mlp":
            self.hits.add_(1)  # a write between the up- and down-projection, result unused
        h = h + self.down(a) + self.buf
        if self.where == "between_head_and_loss":
            logits = self.head(h)
            self.buf.copy_(h.detach().mean((0, 1)))  # a write between head and loss, result unused
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1)) + self.buf.sum()
        if self.where == "scatter":
            self.buf.scatter_(0, labels.view(-1)[:4] % self.buf.numel(), h.detach()[0, :4, 0])
            h = h + self.buf
        logits = self.head(h)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


def _step(model, ids, labels, backend=None):
    model.zero_grad(set_to_none=True)
    fn = model if backend is None else torch.compile(model, backend=backend)
    loss = fn(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize(
    "where,chunked",
    [
        ("before_mlp", {"mlp", "lm_head"}),  # effects outside every region: both regions still chunked
        ("scatter", {"mlp", "lm_head"}),
        ("inside_mlp", {"lm_head"}),  # the MLP holds a write: left unchanged and reported
        ("crossing_mlp", {"lm_head"}),  # a write inside the MLP's span
        ("between_head_and_loss", {"mlp"}),  # a write inside the head's span
    ],
)
@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_in_place_writes_inside_and_around_regions(where, chunked, compiler):
    torch.manual_seed(0)
    model = _Lm(where)
    ids = torch.randint(0, 64, (2, 24))
    labels = torch.randint(0, 64, (2, 24))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _step(model, ids, labels)
    model.load_state_dict(state)
    be = mstfx.backend(compiler=compiler, mini_sequences=3)
    got = _step(model, ids, labels, be)
    torch.testing.assert_close(got[0], ref[0])
    for part in (1, 2):  # every gradient and every buffer the step wrote
        assert got[part].keys() == ref[part].keys()
        for name in ref[part]:
            torch.testing.assert_close(got[part][name], ref[part][name], msg=lambda m: f"{name}: {m}")
    report = mstfx.explain(be)
    assert {d.kind for r in be.reports for d in r.chunked} == chunked, report
    assert all(r.error is None for r in be.reports), report
    if chunked != {"mlp", "lm_head"}:
        assert "side effects" in report, report
