"""A graph whose regions were found but which falls back (verification or compile failure) warns the
user and is counted; the result is still equal to eager (the original graph is compiled)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import mstfx
import mstfx.passes
from conftest import assert_same, loss_and_grads, tiny_llama


def _run(monkeypatch_target, monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 32))
    ref = loss_and_grads(model, ids, ids)
    counters.clear()
    be = mstfx.backend(compiler="aot_eager", mini_sequences=4)
    with pytest.warns(mstfx.MstFallbackWarning, match="WITHOUT chunking"):
        got = loss_and_grads(model, ids, ids, be)
    assert_same(ref, got)
    assert counters["mstfx"]["fallbacks"] >= 1
    assert not [d for r in be.reports for d in r.chunked], mstfx.explain(be)
    return be


def test_verification_failure_warns_and_counts(monkeypatch):
    def broken(gm):
        raise RuntimeError("injected verification failure")

    from mstfx.passes import driver

    monkeypatch.setattr(driver, "_verify", broken)
    be = _run("verify", monkeypatch)
    assert any("injected verification failure" in (r.error or "") for r in be.reports)


def test_compile_failure_warns_and_counts(monkeypatch):
    from torch._dynamo.backends.registry import lookup_backend

    real = lookup_backend("aot_eager")

    def compiler(gm, example_inputs):
        if gm.meta.get("mst_rewritten"):
            raise RuntimeError("injected compile failure")
        return real(gm, example_inputs)

    monkeypatch.setattr(mstfx.MstBackend, "_compiler", lambda self, example_inputs=(): compiler)
    be = _run("compile", monkeypatch)
    assert any("injected compile failure" in (r.error or "") for r in be.reports)


def test_counters_record_chunked_regions():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 32))
    counters.clear()
    loss_and_grads(model, ids, ids, mstfx.backend(compiler="aot_eager", mini_sequences=4))
    assert counters["mstfx"]["regions_chunked"] == 3 and counters["mstfx"]["fallbacks"] == 0


def test_analysis_failure_warns_once_per_graph(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected analysis failure")

    monkeypatch.setattr(mstfx.passes, "run_passes", broken)
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 32))
    ref = loss_and_grads(model, ids, ids)
    counters.clear()
    be = mstfx.backend(compiler="aot_eager", mini_sequences=4)
    with pytest.warns(mstfx.MstFallbackWarning) as caught:
        got = loss_and_grads(model, ids, ids, be)
    assert_same(ref, got)
    fallbacks = [w for w in caught if issubclass(w.category, mstfx.MstFallbackWarning)]
    assert len(fallbacks) == len(be.reports) == counters["mstfx"]["fallbacks"]
