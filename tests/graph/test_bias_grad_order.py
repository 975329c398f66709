"""The post-grad pass that computes each bias gradient's reduction right after the gradient it sums."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import mstfx
from mstfx.post_grad import bias_grad_order as bgo

from conftest import assert_same, loss_and_grads, tiny_gpt2

aten = torch.ops.aten


def _accumulated_row_sums(n_chunks: int, lone: bool = True) -> tuple[fx.GraphModule, list]:
    """sum_k view(sum(x_k, 0, keepdim)) as autograd accumulates a bias used by n chunks, plus a lone sum."""
    g = fx.Graph()
    xs = [g.placeholder(f"x{k}") for k in range(n_chunks)]
    vals = [torch.randn(5 + k, 7) for k in range(n_chunks)]
    acc = None
    for x, v in zip(xs, vals):
        x.meta["val"] = v
        s = g.call_function(aten.sum.dim_IntList, (x, [0], True))
        s.meta["val"] = v.sum(0, keepdim=True)
        r = g.call_function(aten.view.default, (s, [7]))
        r.meta["val"] = s.meta["val"].view(7)
        acc = r if acc is None else g.call_function(aten.add.Tensor, (acc, r))
    outs = [acc]
    if lone:  # a row sum that is neither accumulated nor of a matmul's operand: left alone
        y = g.placeholder("y")
        y.meta["val"] = torch.randn(3, 7)
        outs.append(g.call_function(aten.sum.dim_IntList, (y, [0])))
        vals.append(y.meta["val"])
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g), vals


def test_every_accumulated_row_sum_is_made_opaque_and_the_values_are_unchanged():
    gm, vals = _accumulated_row_sums(4)
    before = gm(*vals)
    assert bgo.keep_bias_grads_with_their_gradients(gm.graph) == 4
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.mstfx.row_sum.default) == 4
    assert targets.count(aten.sum.dim_IntList) == 1  # the lone sum stays a fusable reduction
    after = gm(*vals)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


def test_a_row_sum_of_a_matmul_operand_is_a_bias_gradient_and_made_opaque():
    """dY read by the input-gradient matmul (through a transpose) and summed over rows: one linear's
    bias gradient, unchunked.  A row sum of a tensor no matmul reads is left alone."""
    g = fx.Graph()
    dy, w, z = g.placeholder("dy"), g.placeholder("w"), g.placeholder("z")
    vals = [torch.randn(6, 5), torch.randn(4, 5), torch.randn(6, 5)]
    for node, v in zip((dy, w, z), vals):
        node.meta["val"] = v
    dx = g.call_function(aten.mm.default, (dy, w))
    wt = g.call_function(aten.t.default, (dy,))
    dw = g.call_function(aten.mm.default, (wt, g.placeholder("x")))
    db = g.call_function(aten.sum.dim_IntList, (dy, [0], True))
    dz = g.call_function(aten.sum.dim_IntList, (z, [0], True))
    g.output((dx, dw, db, dz))
    assert bgo.keep_bias_grads_with_their_gradients(g) == 1
    sums = [n for n in g.nodes if n.target is torch.ops.mstfx.row_sum.default]
    assert [n.args[0].name for n in sums] == ["dy"]
    assert [n.args[0].name for n in g.nodes if n.target is aten.sum.dim_IntList] == ["z"]


def test_a_single_row_sum_or_other_reductions_are_left_alone():
    gm, _ = _accumulated_row_sums(1)
    assert bgo.keep_bias_grads_with_their_gradients(gm.graph) == 0
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.randn(4, 6)
    s0 = g.call_function(aten.sum.dim_IntList, (x, [1], True))  # not over rows
    s1 = g.call_function(aten.sum.dim_IntList, (x, [1], True))
    g.output(g.call_function(operator.add, (s0, s1)))
    assert bgo.keep_bias_grads_with_their_gradients(g) == 0


def test_biased_chunked_mlp_backward_uses_the_opaque_sums_and_matches_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    counts = []
    real = bgo.keep_bias_grads_with_their_gradients
    monkeypatch.setattr(bgo, "keep_bias_grads_with_their_gradients", lambda g: counts.append(real(g)) or counts[-1])
    model = tiny_gpt2(layers=1)
    ids = torch.randint(0, 256, (1, 64))
    ref = loss_and_grads(model, ids, ids)
    with inductor_config.patch(fx_graph_cache=False):
        got = loss_and_grads(model, ids, ids, mstfx.backend(mini_sequences=4, chunk_lm_head=False, chunk_form="unrolled"))
    assert_same(ref, got)
    # backward: the c_fc and c_proj biases of the one chunked MLP, one row sum per chunk each, and the
    # attention's c_attn and c_proj biases (unchunked, each read by its gradient matmuls)
    assert max(counts) == 2 * 4 + 2, counts


def test_checkpointed_gpt2_in_the_loop_form_sums_its_attention_biases_opaquely_and_matches_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    counts = []
    real = bgo.keep_bias_grads_with_their_gradients
    monkeypatch.setattr(bgo, "keep_bias_grads_with_their_gradients", lambda g: counts.append(real(g)) or counts[-1])
    model = tiny_gpt2(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 256, (1, 64))
    ref = loss_and_grads(model, ids, ids)
    with inductor_config.patch(fx_graph_cache=False):
        got = loss_and_grads(model, ids, ids, mstfx.backend(mini_sequences=4))
    assert_same(ref, got)
    # the loop operator sums its chunks' MLP bias gradients itself; the two layers' attention biases
    # (c_attn and c_proj) are left to this pass
    assert max(counts) == 2 * 2, counts
