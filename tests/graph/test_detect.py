"""Detector tests on small hand-written functions captured by Dynamo: what is found, what is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mstfx
from mstfx.passes import run_passes
from mstfx.regions.lm_head.graph import find_lm_head_regions
from mstfx.regions.mlp.graph import find_mlp_regions
from mstfx.passes.common import CantChunk

D, I, V = 16, 48, 40


def _capture(fn, *args):
    """The torch-level FX graph Dynamo hands a backend, with its example inputs."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen["gm"], seen["inputs"]


def _params(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.2) for s in shapes]


def _regions(fn, *args):
    gm, inputs = _capture(fn, *args)
    params = {n for n, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs) if isinstance(x, torch.nn.Parameter)}
    return find_mlp_regions(gm.graph, params)


X = torch.randn(2, 10, D)
WG, WU, WD, B1, B2, WGU = _params((I, D), (I, D), (D, I), (I,), (D,), (2 * I, D))

POSITIVE = {
    "swiglu": lambda x: F.linear(F.silu(F.linear(x, WG)) * F.linear(x, WU), WD),
    "geglu_tanh": lambda x: F.linear(F.gelu(F.linear(x, WG), approximate="tanh") * F.linear(x, WU), WD),
    "gelu_bias": lambda x: F.linear(F.gelu(F.linear(x, WG, B1)), WD, B2),
    "relu_squared": lambda x: F.linear(torch.relu(F.linear(x, WG)) ** 2, WD),
    "gelu_new_composite": lambda x: F.linear(
        (lambda h: 0.5 * h * (1.0 + torch.tanh(0.79788456 * (h + 0.044715 * torch.pow(h, 3.0)))))(F.linear(x, WG)), WD
    ),
    "fused_gate_up": lambda x: (lambda gu: F.linear(gu[0] * F.silu(gu[1]), WD))(F.linear(x, WGU).chunk(2, dim=-1)),
    "conv1d_addmm": lambda x: torch.addmm(B2, F.gelu(torch.addmm(B1, x.view(-1, D), WG.t())), WD.t()).view(2, 10, D),
}


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_mlp_found_and_exact(name):
    fn = POSITIVE[name]
    regions, skipped = _regions(fn, X)
    assert len(regions) == 1, skipped
    # the rewritten graph computes the same values and gradients
    gm, inputs = _capture(fn, X)
    new_gm, report = run_passes(gm, inputs, mstfx.MstConfig(mini_sequences=3, compiler="eager"))
    assert [d.kind for d in report.chunked] == ["mlp"], str(report)
    x = X.clone().requires_grad_()
    ref = fn(x)
    ref.sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() if p.grad is not None else None for p in (WG, WU, WD, B1, B2, WGU)]
    for t in (x, WG, WU, WD, B1, B2, WGU):
        t.grad = None
    torch._dynamo.reset()
    out = torch.compile(fn, backend=mstfx.backend(mini_sequences=3, compiler="aot_eager"))(x)
    out.sum().backward()
    got_grads = [x.grad.clone()] + [p.grad.clone() if p.grad is not None else None for p in (WG, WU, WD, B1, B2, WGU)]
    torch.testing.assert_close(out, ref)
    for a, b in zip(got_grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    for t in (WG, WU, WD, B1, B2, WGU):
        t.grad = None


NEGATIVE = {
    # the intermediate is also returned: chunking would have to materialise it anyway
    "intermediate_escapes": (lambda x: (lambda h: (F.linear(F.silu(h), WD), h))(F.linear(x, WG)), "outside the MLP|graph output"),
    # mixes tokens (a cumulative sum over the sequence) between up and down projection
    "token_mixing": (lambda x: F.linear(torch.cumsum(F.silu(F.linear(x, WG)), dim=1), WD), "not a token-wise op"),
    # random dropout would need RNG replay to recompute exactly
    "dropout": (lambda x: F.linear(F.dropout(F.silu(F.linear(x, WG)), p=0.3, training=True), WD), "dropout"),
    # a down-projection-free widening (e.g. attention q projection followed by a transpose)
    "transpose": (lambda x: F.linear(x, WG).view(2, 10, 4, 12).transpose(1, 2).sum(), "not a token-wise op"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_mlp_refused_with_reason(name):
    fn, why = NEGATIVE[name]
    regions, skipped = _regions(fn, X)
    assert regions == []
    assert skipped and any(__import__("re").search(why, reason) for _, reason in skipped), skipped


def test_refused_graph_is_left_unchanged():
    fn = NEGATIVE["token_mixing"][0]
    gm, inputs = _capture(fn, X)
    before = gm.code
    new_gm, report = run_passes(gm, inputs, mstfx.MstConfig())
    assert new_gm is gm and gm.code == before
    assert not report.chunked and report.skipped


W_LM = _params((V, D))[0]
T = torch.randint(0, V, (20,))

LM_POSITIVE = {
    "plain": lambda h, t: F.cross_entropy(F.linear(h, W_LM).float().view(-1, V), t),
    "sum": lambda h, t: F.cross_entropy(F.linear(h, W_LM).view(-1, V), t, reduction="sum", ignore_index=3),
    "softcap": lambda h, t: F.cross_entropy((torch.tanh(F.linear(h, W_LM) / 5.0) * 5.0).float().view(-1, V), t),
    "scaled": lambda h, t: F.cross_entropy((F.linear(h, W_LM) * 0.25).view(-1, V), t),
}


@pytest.mark.parametrize("name", sorted(LM_POSITIVE))
def test_lm_head_found_and_exact(name):
    fn = LM_POSITIVE[name]
    gm, _ = _capture(fn, X, T)
    regions, skipped = find_lm_head_regions(gm.graph)
    assert len(regions) == 1 and not skipped
    h = X.clone().requires_grad_()
    ref = fn(h, T)
    ref.backward()
    ref_grads = (h.grad.clone(), W_LM.grad.clone())
    h.grad = W_LM.grad = None
    torch._dynamo.reset()
    be = mstfx.backend(mini_sequences={"lm_head": 3})
    out = torch.compile(fn, backend=be)(h, T)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, ref_grads[0])
    torch.testing.assert_close(W_LM.grad, ref_grads[1])
    W_LM.grad = None
    assert [d.kind for d in be.reports[-1].chunked] == ["lm_head"]


LM_NEGATIVE = {
    "label_smoothing": (lambda h, t: F.cross_entropy(F.linear(h, W_LM).view(-1, V), t, label_smoothing=0.1), "label smoothing"),
    "reduction_none": (lambda h, t: F.cross_entropy(F.linear(h, W_LM).view(-1, V), t, reduction="none").sum(), "reduction"),
    "log_softmax_in_between": (lambda h, t: F.cross_entropy(torch.log_softmax(F.linear(h, W_LM), -1).view(-1, V), t), "not a supported logit transform"),
}


@pytest.mark.parametrize("name", sorted(LM_NEGATIVE))
def test_lm_head_refused_with_reason(name):
    fn, why = LM_NEGATIVE[name]
    gm, _ = _capture(fn, X, T)
    regions, skipped = find_lm_head_regions(gm.graph)
    assert regions == [] and len(skipped) == 1 and why in skipped[0][1], skipped


def test_cant_chunk_is_a_runtime_error():
    assert issubclass(CantChunk, RuntimeError)


def test_config_validation():
    with pytest.raises(ValueError, match="positive integer"):
        mstfx.MstConfig(mini_sequences=0)
    with pytest.raises(ValueError, match="positive integer"):
        mstfx.MstConfig(mini_sequences={"lm_head": 2.5})
    with pytest.raises(ValueError, match="compiler"):
        mstfx.MstConfig(compiler="tvm")
    with pytest.raises(TypeError):
        mstfx.backend(mstfx.MstConfig(), mini_sequences=2)


@pytest.mark.parametrize(
    "options,field",
    [
        ({"chunk_mlp": "no"}, "chunk_mlp"),
        ({"chunk_lm_head": 0}, "chunk_lm_head"),
        ({"region_chunks": [1, 2]}, "region_chunks"),
        ({"region_chunks": {3: 2}}, "region_chunks"),
        ({"mini_sequences": 10**6}, "mini_sequences"),
        ({"mini_sequences": {"mlp": 0}}, "mini_sequences"),
        ({"mini_sequences": {"attention": 4}}, "mini_sequences"),
        ({"skip_kinds": "mlp"}, "skip_kinds"),
        ({"region_chunks": {"model.layers.0.mlp": 1000}}, "region_chunks"),
    ],
)
def test_config_rejects_bad_options_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        mstfx.MstConfig(**options)


def test_backend_rejects_a_non_config_positional_argument():
    with pytest.raises(TypeError, match="MstConfig"):
        mstfx.MstBackend(5)


def test_one_chunk_knob_per_kind():
    """``mini_sequences`` is the one knob: an int for every kind, a dict per kind (the old
    ``lm_head_chunks`` spelling is gone: an unknown keyword)."""
    from types import SimpleNamespace

    head, mlp = SimpleNamespace(name="lm_head"), SimpleNamespace(name="model.layers.0.mlp")
    cfg = mstfx.MstConfig(mini_sequences={"lm_head": 3})
    assert cfg.mini_sequences_for("lm_head", head) == 3 and cfg.mini_sequences_for("mlp", mlp) is None
    cfg = mstfx.MstConfig(mini_sequences=5, region_chunks={"model.layers.0.mlp": 2})
    assert cfg.mini_sequences_for("lm_head", head) == 5 and cfg.mini_sequences_for("mlp", mlp) == 2
    with pytest.raises(TypeError, match="lm_head_chunks"):
        mstfx.MstConfig(mini_sequences=5, lm_head_chunks=4)


def test_process_wide_reports_are_bounded():
    """``mstfx.backend.REPORTS`` keeps the newest reports only (a long run recompiles without end)."""
    from mstfx.backend import MAX_REPORTS, REPORTS

    assert REPORTS.maxlen == MAX_REPORTS


def test_pass_order_is_the_pipeline_that_runs_and_is_documented():
    import mstfx.passes as passes
    from mstfx.passes import PASS_ORDER, pipeline
    from mstfx.regions.registry import REGION_KINDS

    assert PASS_ORDER == tuple(name for name, _ in pipeline())
    assert PASS_ORDER[: len(REGION_KINDS)] == tuple(f"find_{k.name}" for k in REGION_KINDS)
    assert PASS_ORDER[-3:] == ("attention", "sequence_parallel", "verify")
    assert all(f"    {name} " in passes.__doc__ for name in PASS_ORDER)
