"""transform plans per (batch, length) bucket: a batch larger than the one planned gets its own plan."""

from __future__ import annotations

import pytest
import torch

from mstfx.planning import planner as P
from mstfx.transform import batch_bucket_of, transform

from conftest import tiny_llama

#: 12.3 MiB: the tiny Llama at S = 512 fits unchunked at batch 1, needs mst at batch 3-4, fits no plan at 8
BUDGET_GB = 0.012
S = 512


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, S), generator=torch.Generator().manual_seed(batch))


def test_batch_bucket_rule():
    assert [batch_bucket_of(b) for b in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    # capped at transform's batch when the input's fits it, as S is capped at seq_len
    assert batch_bucket_of(3, max_batch=3) == 3 and batch_bucket_of(2, max_batch=3) == 2
    assert batch_bucket_of(5, max_batch=3) == 8


def test_a_larger_batch_gets_its_own_plan_and_an_infeasible_one_raises_before_running():
    model = tiny_llama()
    assert P.plan(model, S, BUDGET_GB, batch=1).mode == "standard"  # the premise: batch 1 needs nothing
    transform(model, budget_gb=BUDGET_GB, compiler="eager")
    state = model._mstfx_transform

    model(input_ids=_ids(1), labels=_ids(1)).loss.backward()
    first = state.buckets[(1, S)][0]
    assert (first.batch, first.mode) == (1, "standard")

    model.zero_grad(set_to_none=True)
    model(input_ids=_ids(3), labels=_ids(3)).loss.backward()
    assert set(state.buckets) == {(1, S), (4, S)}
    p, _, backend = state.buckets[(4, S)]
    assert p.batch >= 3 and p.mode.startswith("mst") and p.fits
    assert p.mini_sequences["mlp"] > 1
    # the batch-1 plan (nothing chunked) would not have fitted batch 3
    assert P.predict_peak(model, S, batch=3, mode=first.mode, optimizer="adamw").peak > BUDGET_GB * P.GiB
    chunked = {d.kind: d.chunks for r in backend.reports for d in r.chunked}
    assert chunked.get("mlp", 1) > 1 and chunked.get("lm_head", 1) > 1, chunked

    # batch 8 cannot fit any plan: the error names it, and nothing of the input runs
    calls = []
    hook = model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(P.InfeasibleBudgetError, match="batch 8") as info:
        model(input_ids=_ids(8), labels=_ids(8))
    hook.remove()
    assert info.value.batch == 8 and calls == []
    assert set(state.buckets) == {(1, S), (4, S)}
