"""Hugging Face gradient checkpointing under mst on the transformers users install today.

Since transformers 5.25 a checkpointed layer sets a context variable in its attention forward, which
Dynamo refuses inside ``torch.utils.checkpoint`` and answers with a graph break in every layer.
``mstfx.compile`` (and ``transform``) trace such layers whole under Dynamo settings applied only to
their own calls (``mstfx.compat.tracing_settings``); plain ``torch.compile(model, backend="mst")``
cannot apply them and must say so, never lose the saving silently.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mstfx
from conftest import assert_same, tiny_llama
from mstfx.compat import is_checkpoint_break, tracing_settings
from mstfx.hf_checkpointing import enable_checkpointing
from mstfx.tools.architectures import loss_and_grads


def _checkpointed(layers=2):
    model = tiny_llama(layers=layers)
    enable_checkpointing(model)
    model.train()
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mstfx_compile_traces_checkpointed_layers_whole_and_is_exact(clone):
    model = _checkpointed()
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(0))
    ref = _step(clone(model), ids)
    mstfx.compile(model, mini_sequences=4, compiler="aot_eager")
    for _ in range(2):  # the second step reuses the compiled graph
        got = _step(model, ids)
    assert_same(ref, got)
    backend = mstfx.compile_model.backend_of(model)
    assert len(backend.reports) == 1, mstfx.explain(model)  # one graph: no break in any layer
    kinds = sorted(d.kind for r in backend.reports for d in r.chunked)
    assert kinds == ["lm_head", "mlp", "mlp"], mstfx.explain(model)
    assert all(not r.graph_breaks for r in backend.reports)
    assert len([d for r in backend.reports for d in r.rewritten]) == 2, mstfx.explain(model)


def test_tracing_settings_leave_dynamo_config_as_it_was():
    cfg = torch._dynamo.config
    before = (cfg.skip_fwd_side_effects_in_bwd_under_checkpoint, set(cfg.ignore_logging_functions))
    model = _checkpointed(layers=1)
    ids = torch.randint(0, 256, (1, 32))
    mstfx.compile(model, compiler="aot_eager")
    _step(model, ids)
    assert (cfg.skip_fwd_side_effects_in_bwd_under_checkpoint, set(cfg.ignore_logging_functions)) == before
    with tracing_settings():
        assert cfg.skip_fwd_side_effects_in_bwd_under_checkpoint is True
    assert cfg.skip_fwd_side_effects_in_bwd_under_checkpoint == before[0]


def test_plain_torch_compile_never_loses_checkpointed_layers_silently():
    """Either Dynamo traces the step whole (older transformers) and every MLP is chunked, or a graph break
    splits it and the user gets a warning naming the cause and mstfx.compile."""
    model = _checkpointed()
    ids = torch.randint(0, 256, (1, 64))
    backend = mstfx.backend(compiler="aot_eager", mini_sequences=2)
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(input_ids=ids, labels=ids).loss.backward()
    mlps = [d for r in backend.reports for d in r.chunked if d.kind == "mlp"]
    breaks = [w for w in caught if issubclass(w.category, mstfx.MstGraphBreakWarning)]
    if len(mlps) < 2:
        assert breaks, "layers were left unchunked without a warning:\n" + mstfx.explain(backend)
        assert any("mstfx.compile" in str(w.message) for w in breaks)
        assert any(is_checkpoint_break(r) for rep in backend.reports for r in rep.graph_breaks)
        assert "graph break" in mstfx.explain(backend)


def test_loss_and_grads_helper_runs_checkpointed_models_whole():
    model = _checkpointed()
    ids = torch.randint(0, 256, (1, 96))
    ref = loss_and_grads(model, ids, ids)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=3)
    assert_same(ref, loss_and_grads(model, ids, ids, be))
    assert sorted(d.kind for r in be.reports for d in r.chunked) == ["lm_head", "mlp", "mlp"], mstfx.explain(be)


def test_torch_compile_options_are_mstconfig_fields_and_mode_is_inductors():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 64))
    ref = loss_and_grads(model, ids, ids)
    fn = lambda i: model(input_ids=i, labels=i).loss  # noqa: E731
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(fn, backend="mst", options={"mini_sequences": 2, "compiler": "aot_eager"})
    loss = compiled(ids)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[0])
    report = mstfx.explain(last=1)
    assert "mlp" in report and " 2 " in report
    torch._dynamo.reset()
    with pytest.raises(Exception, match="MstConfig fields"):
        torch.compile(fn, backend="mst", options={"mini_sequence": 2})(ids)
    torch._dynamo.reset()
    be = mstfx.backend(compiler="aot_eager")
    torch.compile(fn, backend=be, mode="max-autotune-no-cudagraphs")(ids).backward()
    assert be.reports and be.reports[-1].chunked
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mode"):
        torch.compile(fn, backend="mst", mode="no-such-mode")(ids)
