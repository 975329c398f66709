"""The opt-in compiled-once MLP chunks: one body called M times (``invoke_subgraph``).

Checked: the rewritten graph calls one shared body per distinct chunk shape (the same body for every
layer) and AOT autograd makes one backward body; losses and gradients equal eager; the peak of a
small MLP stack is not above the unrolled rewrite's; it is not the default, and the unrolled form is used
inside checkpointed layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import mstfx
from mstfx.config import MstConfig
from mstfx.passes import run_passes
from mstfx.tools.measure import peak_bytes, training_step

from conftest import assert_same, loss_and_grads, tiny_llama

INVOKE = torch.ops.higher_order.invoke_subgraph


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class _Stack(nn.Module):
    """Residual MLP layers: every layer has the same MLP structure, different weights."""

    def __init__(self, layers: int = 3, hidden: int = 32, inter: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlps = nn.ModuleList(_Mlp(hidden, inter) for _ in range(layers))

    def forward(self, x):
        for mlp in self.mlps:
            x = x + mlp(torch.nn.functional.layer_norm(x, x.shape[-1:]))
        return x.square().mean()


def _rewritten(model, x, config: MstConfig):
    """The graph the passes make from Dynamo's capture, and AOT autograd's backward of it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    got = {}

    def keep_backward(gm, example_inputs):
        got["backward"] = gm
        return make_boxed_func(gm)

    def backend(gm, example_inputs):
        got["gm"], got["report"] = run_passes(gm, example_inputs, config, 0)
        fw = lambda g, _: make_boxed_func(g)  # noqa: E731
        return aot_autograd(fw_compiler=fw, bw_compiler=keep_backward)(got["gm"], example_inputs)

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x).backward()
    return got["gm"], got["report"], got["backward"]


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is INVOKE]


def _once(**kw) -> MstConfig:
    config = MstConfig(**kw)
    config.chunk_form = "compiled-once"
    return config


def test_one_body_serves_every_layer_and_chunk():
    model, x = _Stack(layers=3), torch.randn(2, 64, 32, requires_grad=True)
    gm, report, backward = _rewritten(model, x, _once(mini_sequences=8))
    calls = _calls(gm)
    assert len(calls) == 3 * 8
    assert len({c.args[0].target for c in calls}) == 1, "one body attribute for all layers and chunks"
    assert len({c.args[1] for c in calls}) == 1, "one identifier: AOT traces and Inductor compiles it once"
    # and one backward body: every chunk's gradient has the same layout
    bw_calls = _calls(backward)
    assert len(bw_calls) == 3 * 8
    assert len({c.args[0].target for c in bw_calls}) == 1
    assert all("compiled once" in d.detail for d in report.chunked)
    # the body's forward saves nothing but its inputs: every op in it is tagged for recompute
    body = getattr(gm, calls[0].args[0].target)
    ops = [n for n in body.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops and all(n.meta.get("recompute") is not None for n in ops)


def test_unequal_chunks_get_one_body_per_size():
    model, x = _Stack(layers=2), torch.randn(1, 100, 32, requires_grad=True)  # 100 tokens in 8: 12s and 13s
    gm, _, _ = _rewritten(model, x, _once(mini_sequences=8))
    calls = _calls(gm)
    assert len(calls) == 2 * 8
    assert len({c.args[1] for c in calls}) == 2


def test_compiled_once_is_not_the_default():
    model, x = _Stack(layers=2), torch.randn(1, 64, 32, requires_grad=True)
    gm, report, _ = _rewritten(model, x, MstConfig(mini_sequences=4))
    assert not _calls(gm)
    assert report.chunked and not any("compiled once" in d.detail for d in report.chunked)


def test_frozen_and_trainable_layers_do_not_share_a_body():
    model, x = _Stack(layers=2), torch.randn(1, 64, 32, requires_grad=True)
    for p in model.mlps[0].parameters():
        p.requires_grad_(False)
    gm, _, _ = _rewritten(model, x, _once(mini_sequences=4))
    assert len({c.args[1] for c in _calls(gm)}) == 2
    ref = copy.deepcopy(model)
    ref(x).backward()
    got = copy.deepcopy(model)
    torch._dynamo.reset()
    torch.compile(got, backend=mstfx.backend(_once(mini_sequences=4, compiler="aot_eager")))(x).backward()
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert q.grad is None


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_llama_equals_eager(compiler):
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(1))
    ref = loss_and_grads(copy.deepcopy(model), ids, ids)
    torch._dynamo.reset()
    backend = mstfx.backend(_once(mini_sequences=4, compiler=compiler))
    got = loss_and_grads(model, ids, ids, backend)
    assert_same(ref, got)
    mlps = [d for d in backend.reports[-1].chunked if d.kind == "mlp"]
    assert len(mlps) == 2 and all("compiled once" in d.detail for d in mlps)


def test_checkpointed_layers_fall_back_to_unrolled_and_equal_eager():
    model = tiny_llama(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(2))
    ref = loss_and_grads(copy.deepcopy(model), ids, ids)
    torch._dynamo.reset()
    backend = mstfx.backend(_once(mini_sequences=4, compiler="aot_eager"))
    got = loss_and_grads(model, ids, ids, backend)
    assert_same(ref, got)
    mlps = [d for d in backend.reports[-1].chunked if d.kind == "mlp"]
    assert mlps and all("inside a checkpointed layer" in d.detail for d in mlps)


def _peak(model, x, config):
    model = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mstfx.backend(config))
    step = training_step(model, lambda: compiled(x))
    step()  # compile
    return peak_bytes(step)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_peak_not_above_unrolled(compiler):
    """Each chunk recomputed right before its gradient, only the region input saved: the peak of the
    compiled-once body is that of the unrolled copies (and far below no chunking)."""
    model, x = _Stack(layers=2, hidden=32, inter=512), torch.randn(1, 1024, 32)
    once, loss_once = _peak(model, x, _once(mini_sequences=8, compiler=compiler))
    unrolled, loss_unrolled = _peak(model, x, MstConfig(mini_sequences=8, compiler=compiler))
    plain, _ = _peak(model, x, MstConfig(chunk_mlp=False, compiler=compiler))
    assert loss_once == pytest.approx(loss_unrolled, rel=1e-6)
    assert once <= unrolled * 1.05 + 64 * 1024, (once, unrolled)
    assert once < 0.6 * plain, (once, plain)


def test_compile_time_table_and_flag_validation(capsys):
    from mstfx.tools import bench_cli as bench
    from mstfx.tools.compile_time import CompileTimeRow, markdown, summarise

    rows = [
        CompileTimeRow("inductor", 8, 512, 100.0, 7.6, {"compile_file": 50.0}),
        CompileTimeRow("mst", 8, 512, 120.0, 7.6, {"compile_file": 60.0}),
        CompileTimeRow("mst", 8, 512, 140.0, 7.6, {"compile_file": 70.0}),
        CompileTimeRow("mst", 8, 512, 130.0, 7.6, {"compile_file": 65.0}),
    ]
    summary = {(s["variant"], s["M"]): s for s in summarise(rows)}
    assert summary[("mst", 8)]["first_step_s"] == 130.0 and summary[("mst", 8)]["runs"] == [120.0, 130.0, 140.0]
    table = markdown(rows)
    assert "| mst | 8 | 512 | 130.0 (120, 130, 140) | 1.30 |" in table
    assert bench.cli_main(["--compile-time", "--compile-ms", "0"]) == 2
    assert bench.cli_main(["--compile-time", "--variants", "nope"]) == 2
    assert "--compile-ms" in capsys.readouterr().err
