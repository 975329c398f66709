"""Pure cost-model tests: sympy expressions checked with ``subs``, no FX, no compile."""

from __future__ import annotations

import math

import pytest
import sympy as sp

from mstfx.planning import cost_model as cm

REF = cm.Arch(hidden=512, intermediate=1792, layers=2, heads=8, kv_heads=8, head_dim=64, vocab=32000)


def test_module_has_no_fx_or_torch_import():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cm))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("torch" in (m or "") for m in names | mods)


def test_param_count_of_reference_config():
    # 162 MB of fp32 parameters
    assert REF.n_params * 4 == pytest.approx(162e6, rel=0.01)


def test_phases_are_expressions_of_s_b_and_m():
    cost = cm.step_cost(REF, "mst")
    syms = set().union(*(e.free_symbols for e in cost.phases.values()))
    assert {cm.S, cm.B, cm.M_MLP, cm.M_HEAD} <= syms
    std = cm.step_cost(REF, "standard", m_mlp=1, m_head=1)
    assert set().union(*(e.free_symbols for e in std.phases.values())) == {cm.S, cm.B}


def test_standard_logits_grow_with_vocab_times_tokens():
    std = cm.step_cost(REF, "standard", m_mlp=1, m_head=1)
    a = cm.evaluate(std.peak, 2048)
    b = cm.evaluate(std.peak, 4096)
    assert b - a >= 2048 * 32000 * 4  # at least the extra fp32 logits


@pytest.mark.parametrize("mode", ["checkpointing", "mst", "mst+checkpointing"])
def test_every_saving_mode_is_below_standard(mode):
    std = cm.step_cost(REF, "standard", m_mlp=1, m_head=1)
    other = cm.step_cost(REF, mode, m_mlp=8, m_head=8)
    assert cm.evaluate(other.peak, 8192) < cm.evaluate(std.peak, 8192)


def test_more_chunks_never_cost_more_memory():
    cost = cm.step_cost(REF, "mst")
    peaks = [cm.evaluate(cost.peak, 8192, m_mlp=m, m_head=m) for m in (2, 4, 8, 16)]
    assert peaks == sorted(peaks, reverse=True)


def test_optimizer_and_mixed_precision_static_bytes():
    n = REF.n_params
    assert cm.optimizer_bytes(n, "none", cm.Precision()) == 0
    assert cm.optimizer_bytes(n, "sgd", cm.Precision()) == 4 * n
    assert cm.optimizer_bytes(n, "adamw", cm.Precision()) == 8 * n
    amp = cm.Precision.of("amp")
    assert (amp.param_bytes, amp.act_bytes, amp.master_weights) == (2, 2, True)
    assert cm.optimizer_bytes(n, "adamw", amp) == 8 * n + 4 * n  # fp32 states + fp32 master copy
    assert cm.optimizer_bytes(n, "adamw", cm.Precision.of("bf16")) == 4 * n
    with pytest.raises(ValueError):
        cm.optimizer_bytes(n, "adam", cm.Precision())
    with pytest.raises(ValueError):
        cm.Precision.of("int4")
    with pytest.raises(ValueError):
        cm.step_cost(REF, "turbo")


def test_longest_s_solves_the_peak_equation():
    cost = cm.step_cost(REF, "standard", m_mlp=1, m_head=1)
    budget = 2e9
    s = cm.longest_s(cost, budget)
    assert cm.evaluate(cost.peak, s) <= budget < cm.evaluate(cost.peak, s + 1)


def test_longest_s_with_quadratic_eager_attention():
    arch = cm.Arch(**{**REF.__dict__, "eager_attention": True})
    cost = cm.step_cost(arch, "standard", m_mlp=1, m_head=1)
    s = cm.longest_s(cost, 3e9)
    assert cm.evaluate(cost.peak, s) <= 3e9 < cm.evaluate(cost.peak, s + 1)


def test_longest_s_needs_m_substituted_and_handles_static_overflow():
    with pytest.raises(ValueError, match="substitute"):
        cm.longest_s(cm.step_cost(REF, "mst"), 1e9)
    assert cm.longest_s(cm.step_cost(REF, "standard", m_mlp=1, m_head=1), 1e6) == 0


def test_m_of_one_means_not_chunked():
    # M = 1 chunks nothing; what stays is the attention pass, which removes HF's S×S mask
    no_mask = cm.Arch(**{**REF.__dict__, "causal_mask": False})
    one = cm.regions(REF, cm.Precision(), "mst", 1, 1)
    std = cm.regions(no_mask, cm.Precision(), "standard", 1, 1)
    for a, b in zip(one, std):
        assert sp.simplify(a.saved - b.saved) == 0
    assert math.isclose(cm.evaluate(cm.step_cost(REF, "mst", m_mlp=1, m_head=1).peak, 4096),
                        cm.evaluate(cm.step_cost(no_mask, "standard", m_mlp=1, m_head=1).peak, 4096))


def test_mst_modes_drop_the_mask_only_where_attention_is_plain_causal():
    windowed = cm.Arch(**{**REF.__dict__, "plain_causal": False})
    for mode in cm.MODES:
        chunked = mode.startswith("mst")
        assert cm.mask_kept(REF, mode) is not chunked
        assert cm.mask_kept(windowed, mode) is True


def test_mlps_inside_checkpointed_layers_are_chunked():
    # the pass rewrites the checkpoint bodies, so mst+checkpointing has an M_mlp and it pays off
    cost = cm.step_cost(REF, "mst+checkpointing")
    assert cm.M_MLP in set().union(*(e.free_symbols for e in cost.phases.values()))
    whole = cm.evaluate(cm.step_cost(REF, "mst+checkpointing", m_mlp=1, m_head=16).peak, 8192)
    chunked = cm.evaluate(cm.step_cost(REF, "mst+checkpointing", m_mlp=16, m_head=16).peak, 8192)
    assert chunked < whole


def test_causal_mask_is_quadratic_and_optional():
    no_mask = cm.Arch(**{**REF.__dict__, "causal_mask": False})
    for s in (2048, 4096):
        with_m = cm.evaluate(cm.step_cost(REF, "standard", m_mlp=1, m_head=1).peak, s)
        without = cm.evaluate(cm.step_cost(no_mask, "standard", m_mlp=1, m_head=1).peak, s)
        assert with_m - without == pytest.approx(s * s * 4)


LLAMA3_8B = cm.Arch(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)


def test_program_and_norm_are_checked():
    with pytest.raises(ValueError, match="program"):
        cm.step_cost(REF, "standard", program="jit")
    with pytest.raises(ValueError, match="norm"):
        cm.step_cost(cm.Arch(**{**REF.__dict__, "norm": "batch"}), "standard", program="eager")


def test_eager_standard_counts_every_saved_mlp_and_norm_tensor():
    # eager SwiGLU keeps gate, act(gate), up and their product (4 × I), and each RMSNorm an fp32 copy of
    # its input: at 8B the saved layers alone exceed the gate/up outputs the compiled estimate is built on
    prec = cm.Precision.of("bf16")
    eager = cm.step_cost(LLAMA3_8B, "standard", prec=prec, m_mlp=1, m_head=1, program="eager")
    s = 4096
    four_i = LLAMA3_8B.layers * s * 4 * LLAMA3_8B.intermediate * 2
    assert cm.evaluate(eager.phases["forward end"], s) > four_i + LLAMA3_8B.layers * s * 2 * 4 * LLAMA3_8B.hidden
    # no S × S term without eager attention: doubling S at most doubles the S-dependent part
    grow = cm.evaluate(eager.phases["forward end"], 2 * s) / cm.evaluate(eager.phases["forward end"], s)
    assert grow <= 2.0 + 1e-9


def test_bottom_layer_phase_bounds_deep_checkpointed_backward():
    # with checkpointing, the first layer's backward holds nearly every gradient plus one recomputed
    # layer: on a deep model it is above the top layer's, and the peak of every layer's backward (the
    # compiled bf16 step's end, with the embedding backward's fp32 V×h accumulator beside all
    # gradients, is above it: see the next test)
    prec = cm.Precision.of("bf16")
    for program in cm.PROGRAMS:
        cost = cm.step_cost(LLAMA3_8B, "mst+checkpointing", prec=prec, m_mlp=32, m_head=32, program=program)
        vals = {k: cm.evaluate(v, 32768) for k, v in cost.phases.items()}
        layer_phases = {k: v for k, v in vals.items() if k != "end"}
        assert max(layer_phases, key=layer_phases.get).startswith("bottom layer backward"), (program, vals)
        assert vals["bottom layer backward (attention)"] > vals["top layer backward (attention)"]
        assert (max(vals, key=vals.get) == "end") is (program == "compiled"), (program, vals)


def test_compiled_16_bit_end_holds_the_embedding_backwards_fp32_buffers():
    # PyTorch's decomposition of the embedding backward (run by Inductor) computes in fp32: an fp32
    # copy of the tokens×h gradient scattered into fp32 V×h zeros, then cast to the weights' dtype.
    # Measured (reference Llama in bf16, S = 4096, mst + checkpointing at M = 4 / 32, profiler): the
    # step peaks at the end of backward, 159.5 MiB above the parameters.
    def end(prec, program="compiled", per_block=False):
        cost = cm.step_cost(REF, "mst+checkpointing", prec=cm.Precision.of(prec), m_mlp=4, m_head=32,
                            program=program, per_block=per_block)
        return cm.evaluate(cost.phases["end"], 4096)

    fp32_buffers = 4 * (4096 * REF.hidden + REF.vocab * REF.hidden)
    assert end("bf16") - end("bf16", "eager") >= fp32_buffers
    assert end("bf16") / 2**20 == pytest.approx(159.5, rel=0.02)
    assert end("bf16", per_block=True) < end("bf16") - fp32_buffers + 2**20  # the eager body's own backward
    # fp32 weights: the decomposition computes in their own dtype, no extra buffer
    assert end("fp32") - end("fp32", "eager") < fp32_buffers / 2


def test_compiled_gqa_with_a_mask_saves_repeated_keys_and_values():
    # HF's SDPA path repeats K/V to every query head when it passes a mask (repeat_kv): the compiled
    # step saves the repeated tensors, so GQA saves as much as MHA there; without a mask it saves less
    gqa = cm.Arch(**{**REF.__dict__, "kv_heads": 2})
    for mask, same in ((True, True), (False, False)):
        a = cm.Arch(**{**gqa.__dict__, "causal_mask": mask})
        r = cm.Arch(**{**REF.__dict__, "causal_mask": mask})
        saved = [cm.evaluate(cm.regions(x, cm.Precision(), "standard", 1, 1)[0].saved, 4096) for x in (a, r)]
        assert (saved[0] == saved[1]) is same, saved


def test_compiled_mlp_saves_each_up_projection_and_the_down_input():
    # SwiGLU: gate, up, silu(gate)·up (3 × I per token); GELU: pre-activation and GELU (2 × I)
    for gated, n_i in ((True, 3), (False, 2)):
        arch = cm.Arch(**{**REF.__dict__, "gated": gated})
        mlp = cm.regions(arch, cm.Precision(), "standard", 1, 1)[1]
        per_token = cm.evaluate(mlp.saved, 1000) / 1000 / 4
        assert per_token == pytest.approx(cm.COEF["mlp_saved_h"] * arch.hidden + n_i * arch.intermediate)


TIED = cm.Arch(hidden=512, intermediate=2048, layers=2, heads=8, kv_heads=8, head_dim=64, vocab=32000, tied=True)


def test_loop_form_has_no_chunk_pool_and_no_separate_head_weight_gradient():
    """The default loop operator runs its chunks op by op in one extern call: no chunk buffers in
    Inductor's pool, the LM head's fp32 weight gradient is the operator's own output, and a tied
    weight's two gradients are summed into it in place (fp32)."""
    loop = cm.step_cost(TIED, "mst", m_mlp=4, m_head=8)
    unrolled = cm.step_cost(TIED, "mst", m_mlp=4, m_head=8, chunk_form="unrolled")
    assert "forward end (head weight gradient)" in unrolled.phases
    assert "forward end (head weight gradient)" not in loop.phases
    at = lambda cost, phase: cm.evaluate(cost.phases[phase], 4096)  # noqa: E731
    # one chunk's I-wide backward buffers (fp32, 4096 / 4 tokens), pooled by Inductor in the unrolled form
    pooled = 4096 / 4 * 4 * (cm.mlp_saved_i(TIED) + cm.COEF["bwd_transient_i"] * TIED.ups) * TIED.intermediate
    assert at(unrolled, "top layer backward (attention)") - at(loop, "top layer backward (attention)") == pytest.approx(pooled)
    assert at(unrolled, "end") - at(loop, "end") == pytest.approx(TIED.vocab * TIED.hidden * 4)
    assert cm.evaluate(loop.peak, 4096) < cm.evaluate(unrolled.peak, 4096)
    with pytest.raises(ValueError, match="chunk_form"):
        cm.step_cost(TIED, "mst", chunk_form="rolled")
