"""The post-grad pass that adds each chunk's partial gradient to the running sum with its chunk."""

from __future__ import annotations

import torch
import torch.fx as fx

from mstfx.post_grad import partial_sum_order as pso

aten = torch.ops.aten


def _node(g, target, args, val):
    n = g.call_function(target, args)
    n.meta["val"] = val
    return n


def _chain_of_matmuls(n_chunks: int, late_partial: bool = False) -> tuple[fx.GraphModule, list]:
    """sum_k view(bmm(x_k, w)) as autograd accumulates a gradient over n chunks, and a chain of
    pointwise terms (left to Inductor); with ``late_partial``, an unrelated op sits between the last
    partial and its add, which the pass moves up."""
    g = fx.Graph()
    w = g.placeholder("w")
    w.meta["val"] = torch.randn(1, 6, 4)
    vals = [w.meta["val"]]
    acc = None
    for k in range(n_chunks):
        x = g.placeholder(f"x{k}")
        x.meta["val"] = torch.randn(1, 5, 6)
        vals.append(x.meta["val"])
        p = _node(g, aten.bmm.default, (x, w), x.meta["val"] @ w.meta["val"])
        p = _node(g, aten.view.default, (p, [1, 5, 4]), p.meta["val"].view(1, 5, 4))
        if late_partial and k == n_chunks - 1:
            _node(g, aten.neg.default, (w,), -w.meta["val"])
        acc = p if acc is None else _node(g, aten.add.Tensor, (acc, p), acc.meta["val"] + p.meta["val"])
    pointwise = None
    for k in range(n_chunks):
        t = _node(g, aten.mul.Tensor, (w, float(k + 1)), w.meta["val"] * (k + 1))
        pointwise = t if pointwise is None else _node(g, aten.add.Tensor, (pointwise, t), pointwise.meta["val"] + t.meta["val"])
    g.output((acc, pointwise))
    return fx.GraphModule(torch.nn.Module(), g), vals


def _targets(gm):
    return [n.target for n in gm.graph.nodes]


def test_every_add_of_a_chain_of_partials_is_made_opaque_and_the_values_are_unchanged():
    gm, vals = _chain_of_matmuls(4)
    before = gm(*vals)
    assert pso.sum_partials_with_their_chunks(gm.graph) == 3
    gm.graph.lint()
    gm.recompile()
    assert _targets(gm).count(torch.ops.mstfx.accumulate.default) == 3
    assert _targets(gm).count(aten.add.Tensor) == 3  # the pointwise chain stays fusable
    for a, b in zip(before, gm(*vals)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_partials_are_left_to_inductor():
    gm, _ = _chain_of_matmuls(2)
    assert pso.sum_partials_with_their_chunks(gm.graph) == 0


def test_each_accumulate_follows_the_later_of_its_inputs():
    gm, vals = _chain_of_matmuls(3, late_partial=True)
    before = gm(*vals)
    assert pso.sum_partials_with_their_chunks(gm.graph) == 2
    gm.graph.lint()
    nodes = list(gm.graph.nodes)
    for n in nodes:
        if n.target == torch.ops.mstfx.accumulate.default:
            assert nodes.index(n) == 1 + max(nodes.index(a) for a in n.args)
    gm.recompile()
    for a, b in zip(before, gm(*vals)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_chunked_experts_weight_gradients_are_accumulated_with_their_chunks_and_match_eager(monkeypatch):
    """Tiny Mixtral, M = 4: each layer's two stacked expert-weight gradients (gate/up and down) are
    summed over the 4 runs by 3 accumulates each; loss and gradients equal eager."""
    import torch._inductor.config as inductor_config

    import mstfx
    from conftest import assert_same
    from mstfx.tools.architectures import BY_NAME, loss_and_grads

    shapes = []
    real = pso.sum_partials_with_their_chunks

    def spy(graph):
        count = real(graph)
        shapes.extend(tuple(n.meta["val"].shape) for n in graph.nodes if n.target == torch.ops.mstfx.accumulate.default)
        return count

    monkeypatch.setattr(pso, "sum_partials_with_their_chunks", spy)
    model = BY_NAME["mixtral"].build().train()
    ids = torch.randint(1, model.config.vocab_size, (1, 64))
    ref = loss_and_grads(model, ids, ids)
    with inductor_config.patch(fx_graph_cache=False):
        got = loss_and_grads(model, ids, ids, mstfx.backend(mini_sequences=4))
    assert_same(ref, got)
    c = model.config
    stacked = [s for s in shapes if len(s) == 3 and s[0] == c.num_local_experts]
    assert len(stacked) == 2 * 3 * c.num_hidden_layers, shapes
