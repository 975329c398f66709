"""Architecture breadth: every causal LM of ``mstfx.tools.architectures`` through the mst backend.

For each tiny model (built from its Hugging Face config, no download): the loss and *every* gradient
equal eager on the same weights, the expected regions were chunked (counts by kind), and the regions
left alone are reported with their reason.  Most cases compile with ``aot_eager`` (fast, and it still
runs AOT autograd's partitioner with the recompute tags); a few representative ones use Inductor.
"""

from __future__ import annotations

import collections

import pytest
import torch

import mstfx
from conftest import assert_same
from mstfx.tools.architectures import ARCHITECTURES, BY_NAME, loss_and_grads, run_arch, sample_batch, summarize


def _check(arch, compiler):
    ref, got, be = run_arch(arch, compiler)
    assert_same(ref, got)
    assert got[0].dtype == ref[0].dtype
    chunked, skipped = summarize(be)
    report = mstfx.explain(be)
    assert all(r.error is None for r in be.reports), report
    assert dict(chunked) == arch.expect, report
    # the loss region is never silently dropped: no LM head was skipped
    assert not [d for d in skipped if d.kind == "lm_head"], report
    for d in skipped:
        assert d.reason, report
    return be, skipped, report


@pytest.mark.parametrize("name", [a.name for a in ARCHITECTURES])
def test_architecture_matches_eager_aot_eager(name):
    arch = BY_NAME[name]
    be, skipped, report = _check(arch, "aot_eager")
    if name in ("mixtral", "qwen2-moe", "deepseek-v3"):
        # every MoE layer's routed experts chunked (DeepSeek's first layer is dense), none left behind
        assert not [d for d in skipped if "routed experts" in d.reason], report
    if name == "gemma2":
        assert "tanh" in report and "scale 30" in report, report  # soft-capping kept inside the chunked loss
    if name in ("cohere", "granite"):
        assert "scale 0.25" in report, report
    if name in ("llama-tied", "gemma", "gemma2", "gpt2", "cohere"):
        assert "tied weight" in report, report


@pytest.mark.parametrize(
    "name",
    [
        "gemma2",  # GeGLU + soft-capped tied head: the most transforms in one model
        pytest.param("phi3", marks=pytest.mark.slow),  # fused gate_up
        pytest.param("qwen2-moe", marks=pytest.mark.slow),  # shared expert and routed experts chunked
    ],
)
def test_architecture_matches_eager_inductor(name):
    _check(BY_NAME[name], "inductor")


def test_gpt2_without_loss_type_reports_the_graph_break():
    """HF GPT-2 with ``loss_type=None`` logs a warning inside forward.  Under plain ``torch.compile`` Dynamo
    breaks there, between the LM head and the loss: the MLPs still chunk, the loss graph is left unchanged
    and says why, and the break is a warning.  Compiled as ``mstfx.compile`` does (``loss_and_grads``), the
    logger call is dropped from the graph and the LM head + loss is chunked too."""
    model = BY_NAME["gpt2"].build()
    model.loss_type = None
    ids, labels = sample_batch()
    ref = loss_and_grads(model, ids, labels)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=5)
    assert_same(ref, loss_and_grads(model, ids, labels, be))
    chunked, _ = summarize(be)
    assert chunked["mlp"] == 2 and chunked["lm_head"] == 1, mstfx.explain(be)

    torch._dynamo.reset()
    plain = mstfx.backend(compiler="aot_eager", mini_sequences=5)
    model.zero_grad(set_to_none=True)
    with pytest.warns(mstfx.MstGraphBreakWarning, match="graph break"):
        torch.compile(lambda i, l: model(input_ids=i, labels=l).loss, backend=plain)(ids, labels).backward()
    chunked, skipped = summarize(plain)
    assert chunked["mlp"] == 2 and chunked["lm_head"] == 0, mstfx.explain(plain)
    assert any(d.kind == "lm_head" and "graph break" in d.reason for d in skipped), mstfx.explain(plain)


class _TokenMixingMlp(torch.nn.Module):
    """Looks like an MLP (up → act → down) but mixes tokens with a cumsum: must not be chunked."""

    def __init__(self, d=32, inter=96):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, inter), torch.nn.Linear(inter, d)

    def forward(self, x):
        return self.down(torch.cumsum(torch.nn.functional.gelu(self.up(x)), dim=1)).pow(2).mean()


def test_token_mixing_lookalike_is_left_unchanged_with_reason():
    torch.manual_seed(0)
    mod, x = _TokenMixingMlp(), torch.randn(2, 40, 32)
    ref = torch.autograd.grad(mod(x), list(mod.parameters()))
    be = mstfx.backend(compiler="aot_eager", mini_sequences=4)
    got = torch.autograd.grad(torch.compile(mod, backend=be)(x), list(mod.parameters()))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)
    chunked, skipped = summarize(be)
    assert not chunked, mstfx.explain(be)
    assert any("cumsum" in d.reason for d in skipped), mstfx.explain(be)


@pytest.mark.slow
def test_table_generator_rows():
    from mstfx.tools import architectures

    text = architectures.table([BY_NAME["llama"]])
    assert "| llama |" in text and "2 of 2 found" in text and "Generated by" in text
