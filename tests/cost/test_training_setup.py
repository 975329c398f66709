"""TrainingSetup: the training step the planner's functions describe, checked once; the functions take
it or its fields as keywords, with the same answers either way."""

from __future__ import annotations

import dataclasses

import pytest

import mstfx
from mstfx.model_configs.source import PRESETS
from mstfx.planning import cost_model as cm
from mstfx.planning import planner as P
from mstfx.planning.setup import TrainingSetup
from mstfx.vocabulary import Program

REF_CFG = dict(PRESETS["reference"])


@pytest.mark.parametrize("fields, message", [
    (dict(batch=0), "batch must be a positive integer, got 0"),
    (dict(batch=1.5), "batch must be a positive integer"),
    (dict(batch=True), "batch must be a positive integer"),
    (dict(gpus=0), "gpus must be a positive integer"),
    (dict(gpus=4, sequence_parallel=3), "sequence_parallel=3 must divide gpus=4"),
    (dict(optimizer="adam"), r"optimizer must be one of \['adamw', 'sgd', 'none', 'adamw-master', 'adamw-bf16', "),
    (dict(optimizer=7), "optimizer must be a name"),
    (dict(optimizer="paper"), "simulate --optimizer paper"),
    (dict(mixed_precision="fp8"), "mixed_precision must be None, 'fp32', 'bf16', 'fp16' or 'amp'"),
    (dict(optimizer="adamw-master", mixed_precision="bf16"), "implies mixed_precision='amp'"),
    (dict(program="jit"), "program must be one of eager, compiled, compiled-per-block"),
    (dict(program="compiled-per-block"), "program must be one of compiled, eager for the cost model"),
    (dict(per_block=None), "per_block must be True or False, got None"),
    (dict(optimizer_in_backward=True), "optimizer_in_backward needs per_block=True"),
])
def test_a_bad_field_is_a_value_error_that_names_the_valid_values(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingSetup(**fields)


def test_an_unknown_field_is_a_type_error():
    with pytest.raises(TypeError, match="max_chunks"):
        TrainingSetup(max_chunks=8)  # a search knob: the functions' own, not the setup's


def test_spellings_are_parsed_once_into_the_cost_models_words():
    s = TrainingSetup(optimizer="adamw-bf16", program="eager")
    assert s.program is Program.EAGER and s.optimizer == "adamw-bf16"  # the spelling given is kept
    assert (s.cost_optimizer, s.cost_precision) == ("adamw", "bf16")
    assert s.element_bytes == cm.Precision(2, 2, False)
    amp = TrainingSetup(optimizer="adamw", mixed_precision="amp")
    assert amp.element_bytes == cm.Precision(2, 2, True) and amp.cost_precision == "amp"
    paper = TrainingSetup(optimizer="paper", per_block=True)
    assert paper.steps_in_backward and (paper.cost_optimizer, paper.cost_precision) == ("adamw", "bf16")
    assert not TrainingSetup(per_block=True).steps_in_backward
    assert TrainingSetup(per_block=True, optimizer_in_backward=True).steps_in_backward
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch = 2
    with pytest.raises(ValueError, match="batch"):
        dataclasses.replace(s, batch=0)  # a changed copy is checked as well
    assert dataclasses.replace(s, batch=4).batch == 4 and TrainingSetup(batch=4) == TrainingSetup(batch=4)


SETUPS = [
    dict(optimizer="none"),
    dict(batch=2, optimizer="adamw-bf16"),
    dict(optimizer="offload", gpus=4, sequence_parallel=2),
    dict(optimizer="paper", per_block=True),
    dict(optimizer="adamw", mixed_precision="amp", per_block=True, optimizer_in_backward=True),
]


@pytest.mark.parametrize("fields", SETUPS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_a_setup_object_and_its_fields_as_keywords_give_the_same_answers(fields):
    setup = TrainingSetup(**fields)
    std = P.predict_peak(REF_CFG, 4096, setup, mode="standard")
    static = std.params + std.optimizer
    budget = (static + 0.6 * (std.peak - static)) / P.GiB  # below the plain step: a plan must chunk
    by_object = P.plan(REF_CFG, 4096, budget, setup, margin=0)
    assert by_object == P.plan(REF_CFG, 4096, budget, margin=0, **fields)
    assert by_object.mode != "standard" and by_object.batch == setup.batch
    assert P.longest_fitting(REF_CFG, budget, setup) == P.longest_fitting(REF_CFG, budget, **fields) > 0
    for mode in ("standard", "mst+checkpointing"):
        assert P.predict_peak(REF_CFG, 4096, setup, mode=mode) == P.predict_peak(REF_CFG, 4096, mode=mode, **fields)
    assert P.longest_seq_len(REF_CFG, budget, setup, mode="mst") == P.longest_seq_len(REF_CFG, budget, mode="mst",
                                                                                      **fields)


def test_the_setup_changes_the_answers_it_should():
    """The object reaches the cost model: each field it carries moves the prediction as its keyword does."""
    base = P.predict_peak(REF_CFG, 4096, TrainingSetup(optimizer="none"), mode="mst")
    assert P.predict_peak(REF_CFG, 4096, TrainingSetup(optimizer="adamw"), mode="mst").optimizer > base.optimizer == 0
    assert P.predict_peak(REF_CFG, 4096, TrainingSetup(optimizer="none", batch=2), mode="mst").peak > base.peak
    fsdp = P.predict_peak(REF_CFG, 4096, TrainingSetup(optimizer="none", gpus=4), mode="mst")
    assert fsdp.grads < base.grads  # sharded gradients
    ulysses = P.predict_peak(REF_CFG, 4096, TrainingSetup(optimizer="none", gpus=4, sequence_parallel=2), mode="mst")
    assert ulysses.peak < fsdp.peak  # a rank holds half the tokens
    eager = P.predict_peak(REF_CFG, 4096, TrainingSetup(optimizer="none", program="eager"), mode="mst")
    assert eager.peak != base.peak


def test_the_keywords_keep_each_functions_optimizer_default():
    """Predictions default to no optimizer state, plans to AdamW (TrainingSetup's own default)."""
    assert P.predict_peak(REF_CFG, 4096) == P.predict_peak(REF_CFG, 4096, TrainingSetup(optimizer="none"))
    assert P.longest_seq_len(REF_CFG, 1.5) == P.longest_seq_len(REF_CFG, 1.5, TrainingSetup(optimizer="none"))
    assert P.plan(REF_CFG, 1024, 10) == P.plan(REF_CFG, 1024, 10, TrainingSetup())
    assert P.plan(REF_CFG, 1024, 10).breakdown.optimizer > 0


@pytest.mark.parametrize("call", [
    lambda s: P.plan(REF_CFG, 1024, 10, s, batch=2),
    lambda s: P.longest_fitting(REF_CFG, 1.5, s, optimizer="none"),
    lambda s: P.predict_peak(REF_CFG, 1024, s, gpus=2),
    lambda s: P.longest_seq_len(REF_CFG, 1.5, s, mixed_precision="bf16"),
], ids=["plan", "longest_fitting", "predict_peak", "longest_seq_len"])
def test_a_setup_and_setup_fields_together_are_a_type_error(call):
    with pytest.raises(TypeError, match=r"got both setup= and the setup fields \['(batch|optimizer|gpus|mixed_precision)'\]"):
        call(TrainingSetup())


def test_a_batch_by_position_or_a_misspelt_keyword_is_a_type_error_that_says_so():
    with pytest.raises(TypeError, match="setup must be a TrainingSetup or None, got 2; the setup's fields"):
        P.plan(REF_CFG, 1024, 10, 2)
    with pytest.raises(TypeError, match="setup must be a TrainingSetup"):
        P.predict_peak(REF_CFG, 1024, 1)
    with pytest.raises(TypeError, match=r"plan\(\) got unexpected keyword arguments \['max_chunk'\]"):
        P.plan(REF_CFG, 1024, 10, max_chunk=8)
    with pytest.raises(TypeError, match="mode"):
        P.plan(REF_CFG, 1024, 10, mode="mst")  # the plan chooses the mode


def test_plans_are_of_the_compiled_program():
    for call in (P.plan, P.longest_fitting):
        args = (REF_CFG, 1024, 10) if call is P.plan else (REF_CFG, 10)
        with pytest.raises(ValueError, match="plans the compiled program"):
            call(*args, TrainingSetup(program="eager"))


def test_a_setup_is_checked_against_the_model_where_one_is_planned():
    setup = TrainingSetup(optimizer="none", gpus=16, sequence_parallel=16)  # 8 query heads
    with pytest.raises(ValueError, match="must divide the 8 query heads"):
        P.predict_peak(REF_CFG, 4096, setup)
    with pytest.raises(ValueError, match="seq_len=4097 must be a multiple of sequence_parallel=2"):
        P.plan(REF_CFG, 4097, 10, TrainingSetup(gpus=2, sequence_parallel=2))


def test_training_setup_is_exported():
    assert mstfx.TrainingSetup is TrainingSetup is P.TrainingSetup
    assert "TrainingSetup" in mstfx.__all__ and "TrainingSetup" in P.__all__
    from mstfx.planning import TrainingSetup as from_package

    assert from_package is TrainingSetup
