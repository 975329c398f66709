"""Planner, transform and their errors.  Fast tier: pure planning + one eager-compiled tiny model.
Slow tier (``-m slow``): the measured budget sweep and the compile count over 5 lengths."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import mstfx
from mstfx.planning import planner as P
from mstfx.planning import cost_model as cm
from mstfx.model_configs.source import PRESETS
from mstfx.transform import bucket_of, transform, untransform

from conftest import tiny_llama

REF_CFG = dict(PRESETS["reference"])
#: deeper: there every kind of plan is the cheapest at some budget (2 layers at S = 16384: mst alone
#: beats mst+checkpointing, whose recompute makes all MLP chunks at once, and the S×S mask dominates)
DEEP_CFG = {**REF_CFG, "num_hidden_layers": 16}


def _peak(**kw):
    return P.predict_peak(REF_CFG, 4096, optimizer="none", **kw).peak


# --- planner choices -------------------------------------------------------------------------------



def _step_matches_eager(model, ref, ids):
    """One training step of ``model`` and of its eager copy ``ref`` on ``ids``: same loss and every
    gradient; returns ``model``'s output."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    r = ref(input_ids=ids, labels=ids)
    r.loss.backward()
    torch.testing.assert_close(out.loss, r.loss, rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
    return out

def test_roomy_budget_plans_nothing():
    p = P.plan(REF_CFG, 4096, 10.0, optimizer="none")
    assert (p.mode, p.checkpointing) == ("standard", False) and set(p.mini_sequences.values()) == {1}
    assert p.fits and p.predicted_peak == pytest.approx(_peak(mode="standard"))


def test_each_kind_of_plan_between_the_minima():
    """Fast: one budget between consecutive plan kinds' smallest peaks gets exactly that kind."""
    s = 16384

    def least(mode, m_mlp, m_head):
        ms = None if m_mlp is None else {"mlp": m_mlp, "lm_head": m_head}
        return P.predict_peak(DEEP_CFG, s, mode=mode, optimizer="none", mini_sequences=ms).peak

    std = least("standard", None, None)
    head = least("mst", 1, 64)
    mst = least("mst", 64, 64)
    ck_head = least("mst+checkpointing", 1, 64)
    ck = least("mst+checkpointing", 64, 64)
    assert std > head > mst > ck_head > ck
    kinds = []
    for lo, hi in ((head, std), (mst, head), (ck_head, mst), (ck, ck_head)):
        p = P.plan(DEEP_CFG, s, (lo + hi) / 2 / P.GiB, optimizer="none", margin=0)
        assert p.predicted_peak <= p.budget_bytes
        kinds.append((p.mode, p.mini_sequences["mlp"] > 1, p.mini_sequences["lm_head"] > 1))
    assert kinds == [("mst", False, True), ("mst", True, True), ("mst+checkpointing", False, True),
                     ("mst+checkpointing", True, True)]
    # MLPs inside checkpointed layers are chunked too: the backend config of that plan says so
    assert P.plan(DEEP_CFG, s, (ck + ck_head) / 2 / P.GiB, optimizer="none", margin=0).config().chunk_mlp
    with pytest.raises(P.InfeasibleBudgetError) as info:
        P.plan(DEEP_CFG, s, 0.9 * ck / P.GiB, optimizer="none", margin=0, allow_offload=False)
    assert info.value.min_peak_bytes == pytest.approx(ck)
    # below that, only the checkpoints in host memory fit (the fifth, last plan)
    assert P.plan(DEEP_CFG, s, 0.9 * ck / P.GiB, optimizer="none", margin=0).mode == "mst+checkpointing+offload"


@pytest.mark.slow
def test_cheapest_plan_order_as_budget_shrinks():
    s = 16384
    std = P.predict_peak(DEEP_CFG, s, optimizer="none").peak
    ranks, seen = [], []
    for k in range(40):
        budget = std * 1.01 * 0.93**k / P.GiB
        try:
            p = P.plan(DEEP_CFG, s, budget, optimizer="none", margin=0, allow_offload=False)
        except P.InfeasibleBudgetError:
            ranks.append(4)
            seen.append("infeasible")
            continue
        assert p.predicted_peak <= budget * P.GiB
        rank = 0 if p.mode == "standard" else 3 if p.checkpointing else 2 if p.mini_sequences["mlp"] > 1 else 1
        ranks.append(rank)
        seen.append((p.mode, p.mini_sequences["mlp"], p.mini_sequences["lm_head"]))
    assert ranks == sorted(ranks), seen  # a smaller budget never gets a cheaper plan
    assert set(ranks) == {0, 1, 2, 3, 4}, seen  # every kind of plan is chosen somewhere on the way


def test_fewest_chunks_that_fit():
    # the fewest *equal* chunks: every smaller M that divides the 4096 tokens does not fit
    std = _peak(mode="standard")
    for fraction in (0.8, 0.6, 0.5):
        p = P.plan(REF_CFG, 4096, fraction * std / P.GiB, optimizer="none", margin=0)
        assert p.mode == "mst" and 4096 % p.mini_sequences["lm_head"] == 0 and 4096 % p.mini_sequences["mlp"] == 0
        for m in range(2, p.mini_sequences["lm_head"]):
            if 4096 % m == 0:
                assert P.predict_peak(REF_CFG, 4096, mode="mst", optimizer="none", mini_sequences={"mlp": p.mini_sequences["mlp"], "lm_head": m}).peak > p.budget_bytes
        for m in range(2, p.mini_sequences["mlp"]):
            if 4096 % m == 0:
                assert P.predict_peak(REF_CFG, 4096, mode="mst", optimizer="none", mini_sequences={"mlp": m, "lm_head": p.mini_sequences["lm_head"]}).peak > p.budget_bytes


def test_uneven_token_counts_keep_the_fewest_chunks():
    # 4099 tokens is prime: no equal split within the cap, so M stays the solved fewest count
    p = P.plan(REF_CFG, 4099, 0.6 * _peak(mode="standard") / P.GiB, optimizer="none")
    assert p.mode == "mst" and p.mini_sequences["lm_head"] > 1
    assert P._even_chunks(3, 4096, 64) == 4 and P._even_chunks(3, 4099, 64) == 3 and P._even_chunks(5, 4096, 4) == 5


def test_plan_needs_checkpointing_when_chunking_alone_is_not_enough():
    mst_min = P.predict_peak(DEEP_CFG, 16384, mode="mst", optimizer="none", mini_sequences=64).peak
    ck_min = P.predict_peak(DEEP_CFG, 16384, mode="mst+checkpointing", optimizer="none", mini_sequences=64).peak
    assert ck_min < mst_min
    p = P.plan(DEEP_CFG, 16384, (ck_min + mst_min) / 2 / P.GiB, optimizer="none", margin=0)
    assert p.checkpointing and p.mode == "mst+checkpointing"
    assert p.config().mini_sequences == p.mini_sequences


def test_margin_keeps_headroom_on_gradients_and_activations():
    # a budget between the bare predicted peak and the peak with 10% on grads + activations: the bare
    # plan is plain compile, the default plan chunks (so a 10% under-prediction still fits)
    b = P.predict_peak(REF_CFG, 4096, optimizer="adamw")
    budget = (b.peak + 0.05 * (b.grads + b.activations)) / P.GiB
    assert P.plan(REF_CFG, 4096, budget, margin=0).mode == "standard"
    p = P.plan(REF_CFG, 4096, budget)
    assert p.mode == "mst" and p.margin == P.MARGIN
    static = p.breakdown.params + p.breakdown.optimizer
    assert p.planned_peak == pytest.approx(static + (p.predicted_peak - static) * 1.1)
    assert p.planned_peak <= p.budget_bytes
    # the longest S shrinks with the margin, and obeys it
    s0, s1 = (P.longest_seq_len(REF_CFG, 1.5, mode="standard", margin=m) for m in (0.0, 0.1))
    assert s1 < s0
    at = P.predict_peak(REF_CFG, s1, mode="standard")
    assert cm.with_margin(at.params + at.optimizer, at.peak, 0.1) <= 1.5 * P.GiB < P.predict_peak(REF_CFG, s0 + 1, mode="standard").peak
    for bad in (-0.1, 1.0, float("nan"), "10%", True):
        with pytest.raises(ValueError, match="margin"):
            P.plan(REF_CFG, 4096, 10, margin=bad)


def test_infeasible_error_gives_the_numbers_with_and_without_margin():
    with pytest.raises(P.InfeasibleBudgetError) as info:
        P.plan(REF_CFG, 65536, 0.5, optimizer="none")
    err = info.value
    assert err.min_planned_bytes > err.min_peak_bytes > err.budget_bytes
    assert "10% planning margin" in str(err) and "S =" in str(err) and "larger budget" in str(err)
    # the longest S it names fits with the margin
    p = P.plan(REF_CFG, err.longest_seq_len, 0.5, optimizer="none")
    assert p.fits


def test_optimizer_and_precision_change_the_plan_static_part():
    a = P.plan(REF_CFG, 1024, 10, optimizer="none").breakdown
    b = P.plan(REF_CFG, 1024, 10, optimizer="adamw").breakdown
    c = P.plan(REF_CFG, 1024, 10, optimizer="adamw", mixed_precision="amp").breakdown
    assert b.optimizer == 2 * a.params and a.optimizer == 0
    assert c.params == a.params / 2 and c.optimizer == a.params * 3


def test_plan_config_and_backend_apply_the_numbers():
    p = P.plan(REF_CFG, 4096, 0.8 * _peak(mode="standard") / P.GiB, optimizer="none")
    cfg = p.config()
    assert isinstance(cfg, mstfx.MstConfig)
    assert cfg.mini_sequences["lm_head"] == p.mini_sequences["lm_head"] and cfg.chunk_lm_head
    assert cfg.chunk_mlp == (p.mini_sequences["mlp"] > 1)
    assert isinstance(p.backend(), mstfx.MstBackend)
    std = P.plan(REF_CFG, 1024, 10, optimizer="none").config()
    assert not std.chunk_mlp and not std.chunk_lm_head


def test_print_plan_is_a_table_with_the_report_columns():
    text = str(P.plan(REF_CFG, 4096, 0.8 * _peak(mode="standard") / P.GiB, optimizer="none"))
    for word in ("region", "shape", "before", "after", "M", "FLOPs", "lm_head", "mlp", "predicted peak", "fits"):
        assert word in text, word


def test_mini_sequences_is_the_one_chunk_knob_of_the_planner():
    """``mini_sequences`` means what it means in MstConfig: an int for every region kind, a dict per kind."""
    from mstfx.regions.registry import REGION_KINDS

    one = P.predict_peak(REF_CFG, 4096, mode="mst", optimizer="none", mini_sequences=8)
    per_kind = P.predict_peak(REF_CFG, 4096, mode="mst", optimizer="none", mini_sequences={"mlp": 8, "lm_head": 8})
    assert one == per_kind and one.mini_sequences["mlp"] == one.mini_sequences["lm_head"] == 8
    # a kind left out follows the backend's rule; its M differs from the one given here
    rule = P.predict_peak(REF_CFG, 4096, mode="mst", optimizer="none")
    head_only = P.predict_peak(REF_CFG, 4096, mode="mst", optimizer="none", mini_sequences={"lm_head": 2})
    assert head_only.mini_sequences["lm_head"] == 2 and head_only.mini_sequences["mlp"] == rule.mini_sequences["mlp"]
    assert P.longest_seq_len(REF_CFG, 1.5, mode="mst", mini_sequences=8) == P.longest_seq_len(
        REF_CFG, 1.5, mode="mst", mini_sequences={"mlp": 8, "lm_head": 8})
    for bad, match in (({"mlp": 8, "attention": 2}, "unknown region kinds"), (0, "positive integer"),
                       ({"lm_head": -1}, "positive integer"), (2.5, "positive integer")):
        with pytest.raises(ValueError, match=match):
            P.predict_peak(REF_CFG, 4096, mode="mst", mini_sequences=bad)
        with pytest.raises(ValueError, match=match):
            P.longest_seq_len(REF_CFG, 1.5, mode="mst", mini_sequences=bad)
    # a plan's M per kind: every registry kind the cost model chunks (each follows an M symbol), and
    # its backend config carries the same numbers
    p = P.plan(REF_CFG, 4096, 0.6 * _peak(mode="standard") / P.GiB, optimizer="none", margin=0)
    chunked = {k.name for k in REGION_KINDS if k.cost_symbol in ("M_mlp", "M_head")}
    assert p.mode == "mst" and set(p.mini_sequences) == chunked == set(p.breakdown.mini_sequences)
    assert p.mini_sequences["lm_head"] > 1 and p.config().mini_sequences == p.mini_sequences
    for k in REGION_KINDS:
        assert p.config().mini_sequences_for(k.name, None) == p.mini_sequences[k.name]
    # the plan's numbers predict the plan's peak
    again = P.predict_peak(REF_CFG, 4096, mode=p.mode, optimizer="none", mini_sequences=p.mini_sequences)
    assert again.peak == pytest.approx(p.predicted_peak)


def test_predict_and_longest_agree():
    for mode in ("standard", "checkpointing"):
        s = P.longest_seq_len(REF_CFG, 1.5, mode=mode)
        assert P.predict_peak(REF_CFG, s, mode=mode).peak <= 1.5 * P.GiB < P.predict_peak(REF_CFG, s + 1, mode=mode).peak
    s = P.longest_seq_len(REF_CFG, 1.5, mode="mst", mini_sequences=8)
    assert P.predict_peak(REF_CFG, s, mode="mst", mini_sequences=8).peak <= 1.5 * P.GiB
    # M following S by the rule: longer than any fixed-M plan at this budget
    assert P.longest_seq_len(REF_CFG, 1.5, mode="mst") >= s


def test_arch_from_module_dict_json_and_preset(tmp_path):
    model = tiny_llama()
    arch = P.arch_of(model)
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert (arch.hidden, arch.intermediate, arch.vocab, arch.gated) == (64, 176, 256, True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(REF_CFG))
    assert P.arch_of(str(path)) == P.arch_of(REF_CFG) == P.arch_of(str(tmp_path))
    assert P.arch_of("reference").hidden == 512
    gpt2 = P.arch_of({"n_embd": 256, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "model_type": "gpt2"})
    assert not gpt2.gated and gpt2.intermediate == 1024 and gpt2.tied


# --- every error path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf"), "70", None, True, [70], complex(1, 1)])
def test_bad_budget_is_a_value_error(bad):
    with pytest.raises(ValueError, match="budget_gb"):
        P.plan(REF_CFG, 4096, bad)
    with pytest.raises(ValueError, match="budget_gb"):
        P.longest_seq_len(REF_CFG, bad)


@pytest.mark.parametrize("kw", [dict(seq_len=0), dict(seq_len=1.5), dict(batch=0), dict(optimizer="adam"),
                                dict(mixed_precision="int8"), dict(max_chunks=0), dict(max_chunks=10**6)])
def test_bad_options_are_value_errors(kw):
    seq_len = kw.pop("seq_len", 4096)
    with pytest.raises(ValueError):
        P.plan(REF_CFG, seq_len, 1.0, **kw)


def test_unknown_model_and_bad_source():
    with pytest.raises(ValueError, match="cannot read config /no/such/model-xyz: no such file"):
        P.plan("/no/such/model-xyz", 1024, 1.0)
    with pytest.raises(ValueError, match="unknown model or config 'llama-9000'.*llama3-8b"):
        P.plan("llama-9000", 1024, 1.0)
    with pytest.raises(TypeError):
        P.plan(12345, 1024, 1.0)
    with pytest.raises(ValueError, match="num_hidden_layers.*missing"):
        P.plan({"hidden_size": 8}, 1024, 1.0)
    with pytest.raises(ValueError, match="mode"):
        P.predict_peak(REF_CFG, 1024, mode="fast")


def test_infeasible_budget_gives_min_peak_and_longest_s():
    with pytest.raises(P.InfeasibleBudgetError) as info:
        P.plan(REF_CFG, 65536, 0.5, optimizer="none")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.min_peak_bytes > 0.5 * P.GiB and 0 < err.longest_seq_len < 65536
    assert f"S = {err.longest_seq_len}" in str(err) and f"{err.min_peak_bytes / P.GiB:.3g} GiB" in str(err)
    # the longest S the message gives does fit with the maximal plan
    fits = P.plan(REF_CFG, err.longest_seq_len, 0.5, optimizer="none")
    assert fits.predicted_peak <= 0.5 * P.GiB
    assert mstfx.InfeasibleBudgetError is P.InfeasibleBudgetError


def test_infeasible_when_static_bytes_alone_exceed():
    with pytest.raises(P.InfeasibleBudgetError, match="no sequence fits") as info:
        P.plan(REF_CFG, 1024, 0.2, optimizer="adamw")
    assert info.value.longest_seq_len == 0


def test_cli(capsys, tmp_path):
    from mstfx.cli import main

    assert main(["plan", "--config", "reference", "--seq-len", "4096", "--budget-gb", "0.7", "--optimizer", "none"]) == 0
    out = capsys.readouterr().out
    assert "lm_head" in out and "predicted peak" in out and "longest S" in out
    assert main(["plan", "--config", "reference", "--seq-len", "65536", "--budget-gb", "0.4"]) == 1
    assert "smallest achievable peak" in capsys.readouterr().err.replace("\n", " ")
    assert main(["plan", "--config", "reference", "--seq-len", "4096", "--budget-gb", "-3"]) == 2
    assert main(["plan", "--config", "reference", "--seq-len", "4096", "--budget-gb", "nan"]) == 2


# --- transform -------------------------------------------------------------------------------------------


def test_transform_errors_leave_the_model_unchanged():
    model = tiny_llama()
    fwd = model.forward
    for bad in (0, float("nan"), "1"):
        with pytest.raises(ValueError):
            transform(model, budget_gb=bad, seq_len=1024)
    with pytest.raises(P.InfeasibleBudgetError):
        transform(model, budget_gb=1e-4, seq_len=1024)
    with pytest.raises(TypeError):
        transform("model", budget_gb=1.0)
    with pytest.raises(ValueError):
        transform(model, budget_gb=1.0, seq_len=1024, min_lm_head_chunk_tokens=0)  # bad backend option
    assert model.forward == fwd and "forward" not in model.__dict__
    assert not model.is_gradient_checkpointing and getattr(model, "_mstfx_transform", None) is None


def test_bucket_rule():
    assert [bucket_of(s) for s in (1, 256, 257, 1000, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]
    assert bucket_of(3000, max_seq_len=3000) == 3000 and bucket_of(5000, max_seq_len=3000) == 8192


def test_transform_trains_like_eager_and_drops_logits():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    # a budget that needs chunking at S = 512 for this tiny model
    need = P.predict_peak(model, 512, mode="standard", optimizer="none").peak
    out_model = transform(model, budget_gb=0.9 * need / P.GiB, seq_len=512, optimizer="none", compiler="eager")
    assert out_model is model
    state = model._mstfx_transform
    assert state.plan.mode.startswith("mst")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    out = _step_matches_eager(model, ref, ids)
    assert out.logits is None
    assert set(state.buckets) == {(1, 512)}  # (batch bucket, length bucket)
    # compiled with dynamic shapes, the S×S mask still goes: the plan's memory assumes it does
    attention = [d for be in state.backends for r in be.reports for d in r.decisions if d.kind == "attention"]
    assert attention and all("is_causal=True" in (d.detail or "") for d in attention), mstfx.explain(state.backends[0])
    assert model(input_ids=ids).logits is not None  # inference keeps its logits
    untransform(model)
    assert "forward" not in model.__dict__


def test_transform_enables_checkpointing_when_the_plan_needs_it():
    model = tiny_llama(layers=12)
    arch = P.arch_of(model)
    s = 4096
    ck = P.predict_peak(model, s, mode="mst+checkpointing", optimizer="none", mini_sequences=64).peak
    mst = P.predict_peak(model, s, mode="mst", optimizer="none", mini_sequences=64).peak
    assert ck < mst, arch
    transform(model, budget_gb=(ck + mst) / 2 / P.GiB, seq_len=s, optimizer="none", compiler="eager")
    assert model.is_gradient_checkpointing and model._mstfx_transform.plan.checkpointing
    untransform(model)
    assert not model.is_gradient_checkpointing


# --- slow: measured ------------------------------------------------------------------------------------


def _reference_llama():
    from transformers import LlamaForCausalLM

    from mstfx.tools.bench import reference_config

    torch.manual_seed(0)
    return LlamaForCausalLM(reference_config(4096)).train()


def _measured_peak(model, ids) -> int:
    """Profiler method (mstfx.tools.measure): bytes above what is live at the start, grads None beforehand."""
    from mstfx.tools.measure import peak_bytes

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    step()
    for p in model.parameters():
        p.grad = None
    return peak_bytes(step)[0]


def _tight_budget_case(fraction, dtype=torch.float32):
    """Transform with the *tightest* budget the plan for ``fraction`` × the standard prediction accepts
    (its own peak with the default margin), so no slack hides an under-prediction; measure one step."""
    model = _reference_llama().to(dtype)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    std = P.predict_peak(model, 4096, mode="standard", optimizer="none").peak
    if fraction == "minimum":  # the smallest budget any plan accepts: the infeasible error's own number
        with pytest.raises(P.InfeasibleBudgetError) as info:
            P.plan(model, 4096, 0.1 * std / P.GiB, optimizer="none")
        fraction = info.value.min_planned_bytes * (1 + 1e-9) / std
    tight = P.plan(model, 4096, fraction * std / P.GiB, optimizer="none").planned_peak / P.GiB
    transform(model, budget_gb=tight, seq_len=4096, optimizer="none")
    plan = model._mstfx_transform.plan
    ids = torch.randint(0, 32000, (1, 4096), generator=torch.Generator().manual_seed(0))
    peak = _measured_peak(model, ids) + params
    print(f"{dtype} fraction {fraction:.3g}: plan {plan.mode} M={plan.mini_sequences}, budget "
          f"{tight * 1024:.0f} MiB, predicted {plan.predicted_peak / P.MiB:.0f} MiB, measured {peak / P.MiB:.0f} MiB")
    assert peak <= tight * P.GiB, (plan.mode, peak, tight)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [1.2, 0.8, 0.6, 0.5, "minimum"])
def test_budget_sweep_measured_peak_within_budget(fraction):
    """Whenever transform accepts a budget, params + measured peak stay within it (reference config, S=4096)."""
    _tight_budget_case(fraction)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.7, "minimum"])
def test_budget_sweep_bf16_model(fraction):
    """The same for the reference model in bf16 (planned as bf16 because its parameters are)."""
    _tight_budget_case(fraction, torch.bfloat16)


@pytest.mark.slow
def test_budget_below_minimum_raises_with_numbers():
    model = _reference_llama()
    with pytest.raises(P.InfeasibleBudgetError) as info:
        transform(model, budget_gb=0.3, seq_len=4096, optimizer="none")
    assert math.isfinite(info.value.min_peak_bytes) and "S =" in str(info.value)
    assert getattr(model, "_mstfx_transform", None) is None


@pytest.mark.slow
def test_five_lengths_compile_a_bounded_number_of_times():
    model = tiny_llama()
    transform(model, budget_gb=1.0, seq_len=2048, optimizer="none")
    for s in (300, 400, 700, 1000, 1500):
        ids = torch.randint(0, 256, (1, s))
        model(input_ids=ids, labels=ids).loss.backward()
    state = model._mstfx_transform
    assert len(state.buckets) == 3  # 512, 1024, 2048
    assert state.compiles <= 2 * len(state.buckets)


def test_a_bf16_module_is_planned_in_bf16_unless_told_otherwise():
    model = tiny_llama().to(torch.bfloat16)
    inferred = P.predict_peak(model, 1024, mode="mst")
    assert inferred.peak == pytest.approx(P.predict_peak(model, 1024, mode="mst", mixed_precision="bf16").peak)
    assert inferred.params == sum(p.numel() for p in model.parameters()) * 2
    fp32 = P.predict_peak(tiny_llama(), 1024, mode="mst")
    assert fp32.params == 2 * inferred.params
    # an explicit choice wins (bf16 weights with fp32 master copies)
    assert P.predict_peak(model, 1024, mode="mst", mixed_precision="amp", optimizer="adamw").optimizer > 0
    assert P.plan(model, 1024, 10).breakdown.params == inferred.params


# --- units, backbones, the table, optimizer setups -------------------------------------------------------


def test_budgets_are_gib():
    assert P.plan(REF_CFG, 1024, 1.0, optimizer="none").budget_bytes == 2**30
    assert "GiB" in str(P.plan(REF_CFG, 1024, 1.0, optimizer="none")) and " GB" not in str(P.plan(REF_CFG, 1024, 1.0))


def _backbone_and_lm(cls_model, cls_lm, cfg):
    torch.manual_seed(0)
    return cls_model(cfg), cls_lm(cfg)


def test_a_backbone_has_no_lm_head_row_and_bert_is_not_gated():
    from transformers import BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM, LlamaModel

    small = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
    llama, llama_lm = _backbone_and_lm(LlamaModel, LlamaForCausalLM, LlamaConfig(**small))
    bert, bert_lm = _backbone_and_lm(BertModel, BertForMaskedLM, BertConfig(**small))
    for backbone in (llama, bert):
        arch = P.arch_of(backbone)
        assert not arch.lm_head and arch.n_params == sum(p.numel() for p in backbone.parameters())
        p = P.plan(backbone, 4096, 100, optimizer="none")
        assert "lm_head" not in [r.region for r in p.rows] and "lm_head" not in str(p)
    assert P.arch_of(llama_lm).lm_head and P.arch_of(bert_lm).lm_head
    assert P.arch_of(llama).gated and P.arch_of(llama_lm).gated
    assert not P.arch_of(bert).gated and not P.arch_of(bert_lm).gated  # one up-projection per layer
    # a backbone's plan under pressure chunks the MLPs, never an LM head it does not have
    need = P.predict_peak(llama, 4096, mode="standard", optimizer="none").peak
    tight = P.plan(llama, 4096, 0.7 * need / P.GiB, optimizer="none", margin=0)
    assert tight.mini_sequences["lm_head"] == 1 and tight.mini_sequences["mlp"] > 1 and "LM head" not in tight.reason


def test_plan_rows_add_up_to_the_activation_peak():
    for budget in (100, 0.8):
        p = P.plan(REF_CFG, 4096, budget, optimizer="none")
        text = str(p)
        assert "rest at the peak" in text
        rest = p.breakdown.activations - sum(r.bytes_after for r in p.rows)
        assert f"{abs(rest) / P.MiB:.1f} MiB" in text or f"{abs(rest) / P.GiB:.2f} GiB" in text


def test_dense_arch_has_no_moe_layers_and_predicts_as_before():
    """A dense model's Arch keeps the MoE fields at their defaults (every layer a dense MLP of
    ``intermediate``), and spelling those out changes no prediction, in any mode or program."""
    from dataclasses import replace

    gpt2_cfg = {"n_embd": 256, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "model_type": "gpt2"}
    for cfg in (REF_CFG, gpt2_cfg):
        arch = P.arch_of(cfg)
        assert (arch.moe_layers, arch.shared_intermediate, arch.shared_gate) == (None, 0, False)
        assert (arch.routed_layers, arch.dense_layers) == (0, arch.layers)
        spelled = replace(arch, moe_layers=0, shared_intermediate=0, shared_gate=False)
        assert spelled.n_params == arch.n_params
        for mode in cm.MODES:
            for program in cm.PROGRAMS:
                kw = dict(mode=mode, optimizer="adamw", program=program)
                assert P.predict_peak(spelled, 4096, **kw) == P.predict_peak(arch, 4096, **kw), (mode, program)
                kinds = [r.kind for r in cm.regions(arch, cm.Precision(), mode, program=program)]
                assert {"shared expert", "moe input", "routed_experts"}.isdisjoint(kinds)


def test_simulate_optimizer_setups_are_planned_with_their_bytes():
    n = P.arch_of(REF_CFG).n_params
    master = P.plan(REF_CFG, 1024, 100, optimizer="adamw-master")
    assert master.breakdown.optimizer == 12 * n and master.breakdown.params == 2 * n
    assert P.plan(REF_CFG, 1024, 100, optimizer="adamw-bf16").breakdown.optimizer == 4 * n
    assert P.plan(REF_CFG, 1024, 100, optimizer="offload").breakdown.optimizer == 0
    with pytest.raises(ValueError, match="simulate"):
        P.plan(REF_CFG, 1024, 100, optimizer="paper")
    with pytest.raises(ValueError, match="mixed_precision"):
        P.plan(REF_CFG, 1024, 100, optimizer="adamw-master", mixed_precision="fp32")


# --- transform: lengths beyond seq_len, no seq_len ------------------------------------------------------


def test_an_input_beyond_seq_len_is_planned_at_its_own_length_when_its_bucket_does_not_fit():
    model = tiny_llama()
    opts = dict(optimizer="none", margin=0)
    # a budget that fits S = 515 (at most chunks) but not its bucket's top, 1024
    lo, hi = (min(P.predict_peak(model, s, mode=m, optimizer="none", mini_sequences=P.MAX_CHUNKS).peak for m in ("mst", "mst+checkpointing"))
              for s in (515, 1024))  # the smallest peaks any plan reaches (margin 0)
    assert lo < hi
    budget = (lo + hi) / 2 / P.GiB  # the most-chunked plan fits S = 515 and not S = 1024
    transform(model, budget_gb=budget, seq_len=256, compiler="eager", **opts)
    state = model._mstfx_transform
    p = state.plan_for(515)
    assert 515 <= p.seq_len < 1024 and p.planned_peak <= budget * P.GiB
    with pytest.raises(P.InfeasibleBudgetError, match="S = 1024"):
        state.plan_for(1024)  # the error names the real input's length


@pytest.mark.parametrize("budget", [2, 1])
def test_transform_without_seq_len_fits_the_reference_model_at_4096(budget, caplog):
    """The one-liner: no plan for max_position_embeddings (131072 here), each length planned as it comes."""
    from transformers import LlamaForCausalLM

    from mstfx.tools.bench import reference_config

    model = LlamaForCausalLM(reference_config(131072))  # max_position_embeddings as Llama-3.1's
    with caplog.at_level("INFO", logger="mstfx"):
        transform(model, budget_gb=budget)
    state = model._mstfx_transform
    assert state.plan is None and state.longest_seq_len >= 4096
    assert f"up to S = {state.longest_seq_len}" in caplog.text
    p = state.plan_for(4096)
    assert p.seq_len == 4096 and p.planned_peak <= budget * P.GiB, p
    with pytest.raises(P.InfeasibleBudgetError, match=f"S = {state.longest_seq_len + 1}"):
        state.plan_for(state.longest_seq_len + 1)
    untransform(model)


def test_transform_without_seq_len_trains_like_eager():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    transform(model, budget_gb=1, optimizer="none", compiler="eager")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    _step_matches_eager(model, ref, ids)
    assert set(model._mstfx_transform.buckets) == {(1, 512)}


def test_transform_without_seq_len_refuses_a_budget_nothing_fits():
    model = tiny_llama()
    with pytest.raises(P.InfeasibleBudgetError, match="no sequence fits"):
        transform(model, budget_gb=1e-4)
    assert getattr(model, "_mstfx_transform", None) is None and "forward" not in model.__dict__


def test_transform_takes_simulate_setups_too():
    model = tiny_llama()
    transform(model, budget_gb=1, optimizer="adamw-bf16", compiler="eager")
    state = model._mstfx_transform
    assert state.longest_seq_len > 0 and state.plan_for(300).mixed_precision == "bf16"
    untransform(model)


def test_longest_fitting_refuses_unknown_keywords_and_takes_plans():
    opts = dict(optimizer="none", host_budget_gb=64.0, pcie_gbps=20.0)
    assert P.longest_fitting(REF_CFG, 1.5, **opts) == P.longest_fitting(REF_CFG, 1.5, optimizer="none") > 0
    with pytest.raises(TypeError, match="max_chunk"):
        P.longest_fitting(REF_CFG, 1.5, max_chunk=8)  # a misspelt max_chunks is not ignored


def test_plans_and_predictions_carry_typed_modes_with_their_spellings():
    from mstfx.vocabulary import Mode

    p = P.plan(REF_CFG, 4096, 1.5, optimizer="none")
    assert isinstance(p.mode, Mode) and isinstance(p.breakdown.mode, Mode)
    assert P.predict_peak(REF_CFG, 4096, mode="mst+ckpt").peak == P.predict_peak(REF_CFG, 4096, mode=Mode.MST_CHECKPOINTING).peak
    with pytest.raises(ValueError, match="mode must be one of standard, checkpointing"):
        P.predict_peak(REF_CFG, 4096, mode="mst+chekpointing")
    with pytest.raises(ValueError, match="program must be one of compiled, eager"):
        P.predict_peak(REF_CFG, 4096, program="compiled-per-block")
