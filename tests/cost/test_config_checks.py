"""MstConfig checks its fields when it is made and whenever one is set later; the model-config checks
that ``mstfx plan`` and ``mstfx simulate`` share."""

from __future__ import annotations

import pytest

import mstfx


@pytest.mark.parametrize("field, bad", [
    ("mini_sequences", 0), ("mini_sequences", {"mlp": 1000}), ("mini_sequences", {"nonsense": 2}),
    ("compiler", "tvm"), ("chunk_form", "spiral"), ("chunk_mlp", "yes"), ("min_lm_head_chunk_tokens", 0),
    ("region_chunks", {"model.layers.0.mlp": -1}), ("skip_kinds", ("nonsense",)),
])
def test_fields_set_after_construction_are_checked_and_left_unchanged(field, bad):
    cfg = mstfx.MstConfig()
    before = getattr(cfg, field)
    with pytest.raises(ValueError):
        setattr(cfg, field, bad)
    assert getattr(cfg, field) == before


def test_fields_set_after_construction_are_normalised_and_cross_checked():
    cfg = mstfx.MstConfig()
    cfg.skip_kinds = ["mlp"]
    assert cfg.skip_kinds == ("mlp",)  # normalised as at construction
    cfg.offload_checkpoints = True
    with pytest.raises(ValueError, match="offload_checkpoints"):
        cfg.compiler = "eager"  # the pair is checked, not only the field
    assert cfg.compiler == "inductor"
    cfg.mini_sequences = {"lm_head": 8}
    assert cfg.mini_sequences_for("lm_head", None) == 8
    cfg.chunk_form = "unrolled"  # a good value is taken
    assert cfg.chunk_form == "unrolled"


# --- model configs: one check for mstfx plan and mstfx simulate ------------------------------------------

SMALL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             vocab_size=300)


def _plan_and_simulate_errors(tmp_path, cfg: dict) -> tuple[str, str]:
    """The errors (stderr) of ``mstfx plan`` and ``mstfx simulate`` on ``cfg``; both must exit 2."""
    import json

    from mstfx.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    errs = []
    for argv in (["plan", "--config", str(path), "--seq-len", "512", "--budget-gb", "10"],
                 ["simulate", "--config", str(path), "--gpu-gb", "10", "--no-progress", "--plot", "none"]):
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            code = main(argv)
        assert code == 2, (argv[0], buf.getvalue())
        errs.append(buf.getvalue())
    return errs[0], errs[1]


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=65), "hidden_size 65 is not a multiple of num_attention_heads 4"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(model_type="llamaz"), "unknown model_type 'llamaz'"),
    (dict(vocab_size=0), "'vocab_size' must be a positive integer"),
])
def test_plan_and_simulate_refuse_the_same_configs(tmp_path, change, message):
    plan_err, sim_err = _plan_and_simulate_errors(tmp_path, {**SMALL, **change})
    assert message in plan_err and message in sim_err, (plan_err, sim_err)


def test_explicit_head_dim_lifts_the_divisibility_check():
    from mstfx.model_configs import source

    source.check({**SMALL, "hidden_size": 65, "head_dim": 16}, "(test)")


def test_unknown_model_type_message_is_short_with_close_matches():
    from mstfx.model_configs import source

    with pytest.raises(source.ConfigError) as info:
        source.check({**SMALL, "model_type": "lama"}, "my.json")
    msg = str(info.value)
    assert len(msg) < 600, msg
    assert "'llama'" in msg and "model types" in msg and "config" in msg
    assert "albert" not in msg  # not the whole list


def test_simulate_still_requires_model_type_and_plan_names_a_config_without_one(tmp_path):
    from mstfx.model_configs import source
    from mstfx.planning import planner as P

    cfg = {k: v for k, v in SMALL.items() if k != "model_type"}
    with pytest.raises(source.ConfigError, match="model_type"):
        source.check(cfg, "x.json", require_model_type=True)
    path = tmp_path / "mymodel" / "config.json"
    path.parent.mkdir()
    path.write_text(__import__("json").dumps(cfg))
    for given in (cfg, str(path)):
        p = P.plan(given, 512, 10, optimizer="none")
        assert p.model.strip(), given  # the plan's title names the model
    assert "mymodel" in P.plan(str(path), 512, 10, optimizer="none").model


@pytest.mark.parametrize("architectures, head", [
    (["LlamaModel"], False), (["LlamaForCausalLM"], True), (["GPT2LMHeadModel"], True),
    (["T5ForConditionalGeneration"], True), (None, True), ([], True),
])
def test_architectures_naming_a_headless_class_gets_no_lm_head(architectures, head):
    from mstfx.planning import planner as P

    cfg = {**SMALL, "architectures": architectures}
    assert P.arch_of(cfg).lm_head is head
    plan = P.plan(cfg, 4096, 10, optimizer="none")
    assert ("lm_head" in [r.region for r in plan.rows]) is head and ("lm_head" in str(plan)) is head
    assert (P.predict_peak(cfg, 4096, mode="mst").mini_sequences["lm_head"] > 1) is head
    # the cost has no vocab-wide logits for a backbone
    with_head = P.predict_peak({**SMALL, "architectures": ["LlamaForCausalLM"]}, 4096).peak
    assert (P.predict_peak(cfg, 4096).peak < with_head) is not head


# --- lengths past the model's position limit ---------------------------------------------------------------


def test_plan_past_max_position_embeddings_warns_with_the_length_and_the_limit():
    from mstfx.planning import planner as P

    cfg = {**SMALL, "max_position_embeddings": 2048}
    with pytest.warns(UserWarning, match=r"S = 4096.*max_position_embeddings = 2048"):
        P.plan(cfg, 4096, 10, optimizer="none")
    gpt2 = dict(model_type="gpt2", n_embd=64, n_layer=1, n_head=4, vocab_size=300, n_positions=1024)
    with pytest.warns(UserWarning, match=r"S = 1025.*n_positions = 1024"):
        P.plan(gpt2, 1025, 10, optimizer="none")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.plan(cfg, 2048, 10, optimizer="none")  # at the limit: no warning
        P.plan(SMALL, 1 << 20, 1000, optimizer="none")  # no limit given: no warning


def test_transform_with_seq_len_past_the_limit_warns_once_from_the_callers_line():
    from conftest import tiny_llama

    model = tiny_llama(layers=1, max_position_embeddings=512)
    with pytest.warns(UserWarning, match=r"S = 1024.*max_position_embeddings = 512") as record:
        mstfx.transform(model, budget_gb=1, seq_len=1024, optimizer="none", compiler="eager")
    mine = [w for w in record if "max_position_embeddings" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__
    mstfx.untransform(model)
