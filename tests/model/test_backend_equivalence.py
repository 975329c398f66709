"""Whole models through the mst backend: loss and every gradient equal eager on the same weights."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import mstfx
from conftest import assert_same, loss_and_grads, tiny_gpt2, tiny_llama


def _labels(ids, pattern):
    labels = ids.clone()
    if pattern == "some":
        labels[:, ::4] = -100
    elif pattern == "prefix":  # prompt masked: whole chunks without a target
        labels[:, : labels.shape[1] // 2] = -100
    return labels


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager", "eager"])
def test_llama_matches_eager(compiler):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 50))
    labels = _labels(ids, "some")
    ref = loss_and_grads(model, ids, labels)
    be = mstfx.backend(compiler=compiler)
    got = loss_and_grads(model, ids, labels, be)
    assert_same(ref, got)
    report = be.reports[-1]
    kinds = sorted(d.kind for d in report.chunked)
    assert kinds == ["lm_head", "mlp", "mlp"], str(report)


def test_gpt2_gelu_with_bias_conv1d_matches_eager():
    model = tiny_gpt2()
    ids = torch.randint(0, 256, (2, 40))
    ref = loss_and_grads(model, ids, ids)
    be = mstfx.backend()
    got = loss_and_grads(model, ids, ids, be)
    assert_same(ref, got)
    report = be.reports[-1]
    assert sum(d.kind == "mlp" for d in report.chunked) == 2, str(report)
    assert any(d.kind == "lm_head" and "tied" in d.detail for d in report.chunked), str(report)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seq=st.integers(1, 40),
    batch=st.integers(1, 3),
    chunks=st.integers(2, 9),
    pattern=st.sampled_from(["none", "some", "prefix"]),
    tie=st.booleans(),
)
def test_llama_property(seq, batch, chunks, pattern, tie):
    """S not divisible by M, S < M, masked chunks, batch > 1, tied or untied head (aot_eager: fast)."""
    torch._dynamo.reset()
    model = tiny_llama(layers=1, tie=tie)
    ids = torch.randint(0, 256, (batch, seq))
    labels = _labels(ids, pattern)
    if (labels[:, 1:] == -100).all():
        labels[0, -1] = 3  # keep at least one target so the mean is finite
    ref = loss_and_grads(model, ids, labels)
    be = mstfx.backend(mini_sequences=chunks, compiler="aot_eager")
    got = loss_and_grads(model, ids, labels, be)
    assert_same(ref, got)
    assert be.reports[-1].chunked


def test_bf16_llama_matches_eager_within_bf16_tolerance():
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 64))
    ref = loss_and_grads(model, ids, ids)
    got = loss_and_grads(model, ids, ids, mstfx.backend(mini_sequences=4))
    assert got[0].dtype == ref[0].dtype == torch.float32
    assert_same(ref, got, rtol=2e-2, atol=2e-2)


def test_no_recompile_when_only_data_changes():
    model = tiny_llama(layers=1)
    be = mstfx.backend()
    fn = torch.compile(lambda i, l: model(input_ids=i, labels=l).loss, backend=be)
    for seed in range(3):
        ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(seed))
        fn(ids, ids).backward()
    assert len(be.reports) == 1


def test_logits_escape_is_reported_and_drop_logits_removes_it():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 32))
    be = mstfx.backend()
    out = torch.compile(model, backend=be)(input_ids=ids, labels=ids)
    assert out.logits is not None
    assert be.reports[-1].logits_escape
    assert "logits escape" in mstfx.explain(be)

    torch._dynamo.reset()
    ref = loss_and_grads(model, ids, ids)
    mstfx.drop_logits(model)
    be2 = mstfx.backend()
    compiled = torch.compile(model, backend=be2)
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, labels=ids)
    assert out.logits is None
    out.loss.backward()
    assert not be2.reports[-1].logits_escape
    torch.testing.assert_close(out.loss.detach(), ref[0])
    assert model(input_ids=ids).logits is not None  # without labels the logits stay
    mstfx.wrappers.keep_logits(model)


def test_gradient_checkpointing_combination():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 256, (1, 150))
    ref = loss_and_grads(model, ids, ids)
    be = mstfx.backend()
    got = loss_and_grads(model, ids, ids, be)
    assert_same(ref, got)
    # the MLPs live inside the checkpointed layer bodies and are chunked there too; the step is one graph
    # (every graph's report is read: a graph break would split it and leave the layers unchunked)
    assert len(be.reports) == 1, mstfx.explain(be)
    assert sorted(d.kind for r in be.reports for d in r.chunked) == ["lm_head", "mlp", "mlp"], mstfx.explain(be)


def test_string_backend_registered_by_entry_point():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 16))
    ref = loss_and_grads(model, ids, ids)
    got = loss_and_grads(model, ids, ids, "mst")
    assert_same(ref, got)


def test_dynamic_lengths_recompile_once_per_power_of_two_bucket():
    """M follows S under dynamic shapes; each graph is guarded to its bucket, results stay exact."""
    model = tiny_llama(layers=1)
    be = mstfx.backend(compiler="aot_eager")
    fn = torch.compile(lambda i, l: model(input_ids=i, labels=l).loss, backend=be)
    for seq in (32, 48, 64, 40, 100):
        ids = torch.randint(0, 256, (1, seq))
        model.zero_grad(set_to_none=True)
        loss = fn(ids, ids)
        loss.backward()
        got = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        assert_same(loss_and_grads(model, ids, ids), got)
    # 32 static; 48 and 40 share [32, 64); 64 and 100 share [64, 128)
    assert len(be.reports) == 3
    chunks = [d.chunks for r in be.reports for d in r.decisions if d.kind == "mlp"]
    assert chunks == [1, 1, 2]  # 32 tokens / hidden 64; bucket max 63 → 1; bucket max 127 → 2


def test_dynamic_true_keeps_the_rewrite_through_dynamo_restarts():
    """Dynamo may restart its analysis from inside the backend (TensorifyScalarRestartAnalysis under
    dynamic=True); the backend must let that through, not fall back to the unchunked graph."""
    model = tiny_llama(layers=1, vocab=1024)
    ids = torch.randint(0, 1024, (1, 96))
    ref = loss_and_grads(model, ids, ids)
    be = mstfx.backend(mini_sequences={"lm_head": 2})
    model.zero_grad(set_to_none=True)
    fn = torch.compile(lambda i, l: model(input_ids=i, labels=l).loss, backend=be, dynamic=True)
    loss = fn(ids, ids)
    loss.backward()
    assert_same(ref, (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    final = be.reports[-1]
    assert final.error is None and sorted(d.kind for d in final.chunked) == ["lm_head", "mlp"], str(final)


def test_autocast_bf16_matches_eager_autocast():
    """Mixed precision the usual way (torch.autocast): chunks run in the autocast dtype like eager."""
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (2, 40))

    def run(backend):
        model.zero_grad(set_to_none=True)
        fn = lambda i: model(input_ids=i, labels=i).loss  # noqa: E731
        if backend is not None:
            torch._dynamo.reset()
            fn = torch.compile(fn, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = run(None)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=3)
    assert_same(ref, run(be), rtol=3e-2, atol=3e-2)
    assert sorted(d.kind for d in be.reports[-1].chunked) == ["lm_head", "mlp"]


def test_inductor_keeps_the_partitioners_recompute_order_in_forward_and_backward():
    """Inductor's ``reorder_for_peak_memory`` moves every chunk's recompute to the start of the backward
    (measured +11% peak at S = 1024 on the reference config): the backend compiles both graphs without it,
    the backward too although AOT compiles it lazily, after the forward's compile has returned."""
    import torch._inductor.config as inductor_config

    seen = []

    def spy(graph):  # runs inside each Inductor compile (forward and backward)
        seen.append(inductor_config.reorder_for_peak_memory)

    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 64))
    assert inductor_config.reorder_for_peak_memory  # the default this backend overrides
    with inductor_config.patch(post_grad_custom_post_pass=spy, fx_graph_cache=False):
        ref = loss_and_grads(model, ids, ids)
        got = loss_and_grads(model, ids, ids, mstfx.backend(mini_sequences=4))
    assert_same(ref, got)
    assert len(seen) >= 2 and not any(seen), seen
    assert inductor_config.reorder_for_peak_memory  # restored for the user's other compiles
