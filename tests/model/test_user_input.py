"""What the backend tells a user about their options and graphs: unknown region names, an M above the
token count, an LM head at one mini-sequence (fused, not chunked), distinct names for MLPs in a ModuleList, and one
report per graph under dynamic shapes (Dynamo's restarted attempts are not graphs of the program)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mstfx
from conftest import assert_same, loss_and_grads, tiny_llama


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class _TwoKinds(nn.Module):
    """MLP modules in a ModuleList, and bare projections that are direct children of one."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Mlp(), _Mlp()])
        self.ffn = nn.ModuleList([nn.Linear(16, 64), nn.Linear(64, 16), nn.Linear(16, 64), nn.Linear(64, 16)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        for i in (0, 2):
            x = x + self.ffn[i + 1](F.relu(self.ffn[i](x)))
        return x.square().mean()


def _step(model, backend, x):
    model.zero_grad(set_to_none=True)
    loss = (model(x) if backend is None else torch.compile(model, backend=backend)(x))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_mlps_in_a_module_list_get_distinct_names():
    model, x = _TwoKinds(), torch.randn(1, 32, 16)
    ref = _step(model, None, x)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=2)
    assert_same(ref, _step(model, be, x))
    names = [d.where for d in be.reports[-1].chunked]
    assert sorted(names) == ["blocks.0", "blocks.1", "ffn.1", "ffn.3"], mstfx.explain(be)


def test_region_chunks_apply_to_one_of_two_sibling_projections():
    model, x = _TwoKinds(), torch.randn(1, 32, 16)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=2, region_chunks={"ffn.3": 4})
    _step(model, be, x)
    m = {d.where: d.chunks for d in be.reports[-1].chunked}
    assert m["ffn.3"] == 4 and m["ffn.1"] == 2, mstfx.explain(be)


def test_unknown_region_chunks_names_warn_with_the_names_that_exist():
    model, x = _TwoKinds(), torch.randn(1, 32, 16)
    be = mstfx.backend(compiler="aot_eager", region_chunks={"blocks.7": 2, "blocks.0": 2})
    with pytest.warns(UserWarning, match=r"\['blocks.7'\].*blocks.0.*blocks.1"):
        _step(model, be, x)


def test_known_region_chunks_names_do_not_warn():
    model, x = _TwoKinds(), torch.randn(1, 32, 16)
    be = mstfx.backend(compiler="aot_eager", region_chunks={"blocks.0": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _step(model, be, x)


def test_an_m_above_the_token_count_is_capped_with_a_warning():
    model, x = _TwoKinds(), torch.randn(1, 8, 16)
    ref = _step(model, None, x)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=200)
    with pytest.warns(UserWarning, match="M = 200 is more than the 8 tokens"):
        got = _step(model, be, x)
    assert_same(ref, got)
    assert {d.chunks for d in be.reports[-1].chunked} == {8}, mstfx.explain(be)


def test_lm_head_with_one_mini_sequence_does_not_read_chunked():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 64))
    ref = loss_and_grads(model, ids, ids)
    be = mstfx.backend(compiler="aot_eager", mini_sequences={"mlp": 2, "lm_head": 1})
    assert_same(ref, loss_and_grads(model, ids, ids, be))
    text = mstfx.explain(be)
    head_rows = [line for line in text.splitlines() if line.strip().startswith("lm_head+loss")]
    assert head_rows and all("fused (M = 1)" in r and " chunked " not in r for r in head_rows), text
    assert "2 region(s) chunked, 1 fused at M = 1" in text


def test_dynamic_graph_is_reported_and_counted_once():
    """Under dynamic=True Dynamo restarts its analysis (to specialise a float) after calling the backend:
    the restarted attempt is not a graph of the program."""
    from torch._dynamo.utils import counters

    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 300))
    counters.clear()
    be = mstfx.backend(compiler="aot_eager")
    fn = torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend=be, dynamic=True)
    fn(ids).backward()
    assert len(be.reports) == 1, mstfx.explain(be)
    assert counters["mstfx"]["regions_chunked"] == len(be.reports[0].chunked) > 0


@pytest.mark.parametrize("last", [0, -1, 1.5])
def test_explain_last_must_be_a_positive_count(last):
    with pytest.raises(ValueError, match="last"):
        mstfx.explain(last=last)
