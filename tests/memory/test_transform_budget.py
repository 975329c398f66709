"""``transform`` holds its budget when its plan needs Hugging Face checkpointing, on the transformers users
install today (5.25 broke the checkpointed layers' trace unless Dynamo's settings are applied; the step then
ran unchunked and went over the budget with no warning)."""

from __future__ import annotations

import torch

import mstfx
from conftest import tiny_llama
from mstfx.planning import planner as P
from mstfx.tools.measure import peak_bytes


def test_transform_with_checkpointing_measures_within_its_budget():
    torch.manual_seed(0)
    model = tiny_llama(layers=4, inter=512).train()
    s = 512
    ck = P.predict_peak(model, s, mode="mst+checkpointing", optimizer="none").peak
    mst = P.predict_peak(model, s, mode="mst", optimizer="none").peak
    assert ck < mst
    budget = (ck * 1.12 + mst) / 2 / P.GiB if ck * 1.12 < mst else ck * 1.12 / P.GiB
    mstfx.transform(model, budget_gb=budget, seq_len=s, optimizer="none")
    state = model._mstfx_transform
    assert state.plan.checkpointing and model.is_gradient_checkpointing
    ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    step()  # compiles
    for p in model.parameters():
        p.grad = None
    # peak_bytes counts above what is live before the step (the parameters); the plan's peak counts them too
    measured = peak_bytes(step)[0] + sum(p.numel() * p.element_size() for p in model.parameters())
    assert measured <= budget * P.GiB, (measured / 2**20, budget * 1024)
    reports = [r for b in state.backends for r in b.reports]
    assert len(reports) == 1, mstfx.explain(state.backends[0])
    assert sorted(d.kind for r in reports for d in r.chunked).count("mlp") == 4, mstfx.explain(state.backends[0])


def test_options_the_plan_sets_are_refused_and_the_model_left_unchanged():
    """``transform`` refuses every backend option a plan sets (``plan_table.planned_options``, the same
    fields ``Plan.config`` fills), before it changes the model."""
    import pytest

    from mstfx.planning.plan_table import planned_options

    model = tiny_llama()
    forward = model.forward
    for name in planned_options():
        with pytest.raises(ValueError, match=f"'{name}'.*set by the plan"):
            mstfx.transform(model, budget_gb=1.0, seq_len=64, optimizer="none", **{name: None})
        assert model.forward == forward and getattr(model, "_mstfx_transform", None) is None
    plan = P.plan(model, 64, 1.0, optimizer="none")
    assert set(planned_options()) <= set(vars(plan.config()))
