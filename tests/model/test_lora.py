"""Low-rank adapters (LoRA) inside the MLP: the whole MLP, adapters included, is one chunked region.

A projection with adapters is ``base(x) + Σ scale·B(A(x))``; PEFT writes it with ``nn.Linear`` factors,
a hand-written adapter with ``x @ A.T``.  Both are found by structure, chunked, and recomputed in
backward: the loss and every trainable gradient equal eager, and a frozen base weight gets none.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mstfx
from mstfx.regions.mlp.graph import find_mlp_regions
from mstfx.tools.architectures import loss_and_grads, sample_batch, tiny_llama
from mstfx.tools.measure import fresh_code

from conftest import assert_same

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install peft; it is in the test extra)")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_llama(layers=2, targets="all-linear", dropout=0.0, train_base=False):
    model = peft.get_peft_model(tiny_llama(layers=layers), peft.LoraConfig(target_modules=targets, r=4, lora_dropout=dropout))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the adapters would add nothing
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif train_base:
            p.requires_grad_(True)
    model.train()
    return model


def _decisions(be, kind):
    return [d for r in be.reports for d in r.decisions if d.kind == kind]


def _check_peft(model, layers, **options):
    ids, labels = sample_batch()
    ref = loss_and_grads(model, ids, labels)
    be = mstfx.backend(mini_sequences=5, **options)
    got = loss_and_grads(model, ids, labels, compile_backend=be)
    report = "\n".join(map(str, be.reports))
    assert all(r.error is None for r in be.reports), report
    mlps = _decisions(be, "mlp")
    assert [d.action for d in mlps] == ["chunked"] * layers, report  # no adapter factor reported as a candidate
    assert all("low-rank adapter" in d.detail and d.chunks == 5 for d in mlps), report
    assert [d.action for d in _decisions(be, "lm_head")] == ["chunked"], report
    assert_same(ref, got)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got[1]) == trainable
    return got


@pytest.mark.parametrize(
    "targets, chunk_form", [("all-linear", "loop"), (TARGETS, "unrolled")], ids=["all-linear-loop", "list-unrolled"]
)
def test_peft_lora_llama_every_mlp_chunked_and_exact(targets, chunk_form):
    model = _peft_llama(targets=targets)
    _, grads = _check_peft(model, 2, compiler="aot_eager", chunk_form=chunk_form)
    assert not any("base_layer" in n for n in grads)  # frozen base weights get no gradient
    assert sum("mlp" in n for n in grads) == 2 * 3 * 2  # A and B of gate, up and down in both layers


def test_peft_lora_with_trainable_base_weights():
    model = _peft_llama(layers=1, train_base=True)
    _, grads = _check_peft(model, 1, compiler="aot_eager")
    assert any("mlp.down_proj.base_layer" in n for n in grads)


def test_peft_lora_llama_inductor():
    _check_peft(_peft_llama(layers=1), 1, compiler="inductor")


def test_peft_lora_dropout_in_training_is_reported():
    """A real dropout inside an adapter would need RNG replay in the recompute: that MLP is left
    unchanged, with the reason."""
    model = _peft_llama(layers=1, dropout=0.1)
    ids, labels = sample_batch()
    be = mstfx.backend(compiler="aot_eager", mini_sequences=5)
    loss_and_grads(model, ids, labels, compile_backend=be)
    mlps = _decisions(be, "mlp")
    assert mlps and all(d.action == "skipped" for d in mlps)
    assert any("dropout with p > 0" in d.reason for d in mlps), mlps


# --------------------------------------------------------------------------------------------------
# Hand-written adapters
# --------------------------------------------------------------------------------------------------
class Adapted(nn.Module):
    """A frozen (or trainable) base linear and a rank-r adapter written as matmuls."""

    def __init__(self, n_in, n_out, r=4, scale=0.5, train_base=False, bias=False):
        super().__init__()
        self.base = nn.Linear(n_in, n_out, bias=bias)
        self.base.requires_grad_(train_base)
        self.A = nn.Parameter(torch.randn(r, n_in) * 0.2)
        self.B = nn.Parameter(torch.randn(n_out, r) * 0.2)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T * self.scale


class AdaptedMLP(nn.Module):
    def __init__(self, hidden=32, inter=96, **kw):
        super().__init__()
        self.gate, self.up, self.down = Adapted(hidden, inter, **kw), Adapted(hidden, inter, **kw), Adapted(inter, hidden, **kw)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _mlp_step(mlp, x, backend=None):
    mlp.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    fn = lambda x: (mlp(x) + x).pow(2).mean()  # noqa: E731
    if backend is not None:
        fn = torch.compile(fresh_code(fn), backend=backend)
    loss = fn(x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return loss.detach(), grads


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trainable-base"])
def test_hand_written_adapter_mlp_chunked_and_exact(train_base):
    torch.manual_seed(0)
    mlp = AdaptedMLP(train_base=train_base, bias=train_base)
    x = torch.randn(2, 40, 32)
    ref = _mlp_step(mlp, x)
    be = mstfx.backend(compiler="aot_eager", mini_sequences=3)
    got = _mlp_step(mlp, x, be)
    mlps = _decisions(be, "mlp")
    assert [d.action for d in mlps] == ["chunked"], mlps
    assert "3 low-rank adapter(s)" in mlps[0].detail and "silu" in mlps[0].detail
    assert_same(ref, got)
    assert any(n.startswith("gate.base") for n in got[1]) == train_base


# --------------------------------------------------------------------------------------------------
# Detection on captured graphs: spellings that are adapters, and look-alikes that are not
# --------------------------------------------------------------------------------------------------
D, I, R = 16, 48, 4


def _params(*shapes):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*s, generator=g) * 0.2) for s in shapes]


WG, WU, WD, AG, BG, AU, BU, AD, BD, AG2, BG2, FULL, B1, B2 = _params(
    (I, D), (I, D), (D, I), (R, D), (I, R), (R, D), (I, R), (R, I), (D, R), (R, D), (I, R), (D, D), (I,), (D,)
)


def _capture_regions(fn, x):
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(x)
    gm, inputs = seen["gm"], seen["inputs"]
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {n for n, v in zip(phs, inputs) if isinstance(v, nn.Parameter)}
    return find_mlp_regions(gm.graph, params)


def _swiglu(gate, up, down):
    return lambda x: down(F.silu(gate(x)) * up(x))


ADAPTED = {
    # F.linear factors, scale after B (PEFT's spelling)
    "linear_factors": _swiglu(
        lambda x: F.linear(x, WG) + F.linear(F.linear(x, AG), BG) * 2.0,
        lambda x: F.linear(x, WU) + F.linear(F.linear(x, AU), BU) * 2.0,
        lambda x: F.linear(x, WD) + F.linear(F.linear(x, AD), BD) * 2.0,
    ),
    # scale between the factors, torch.matmul, adapter term first in the sum
    "matmul_scale_between": _swiglu(
        lambda x: torch.matmul(torch.matmul(x, AG.t()) * 0.5, BG.t()) + F.linear(x, WG),
        lambda x: F.linear(x, WU),
        lambda x: F.linear(x, WD) + (x @ AD.T) @ BD.T,
    ),
    # two adapters on one projection, identity dropout and a cast on the adapter input
    "two_adapters_dropout_cast": _swiglu(
        lambda x: F.linear(x, WG) + F.linear(F.linear(F.dropout(x, 0.0), AG), BG) + F.linear(F.linear(x.float(), AG2), BG2) / 4,
        lambda x: F.linear(x, WU) + F.linear(F.linear(x, AU), BU),
        lambda x: F.linear(x, WD),
    ),
    # GPT-2's Conv1D base (tokens flattened around an addmm), adapters on the 3-D input
    "conv1d_base": lambda x: (
        lambda h: torch.addmm(B2, h.view(-1, I), WD.t()).view(2, 10, D) + F.linear(F.linear(h, AD), BD) * 2.0
    )(F.gelu(torch.addmm(B1, x.view(-1, D), WG.t()).view(2, 10, I) + F.linear(F.linear(x, AG), BG) * 2.0)),
}
#: (up-projections, adapters, activation) of each spelling
EXPECTED = {
    "linear_factors": (2, 3, "silu·mul"),
    "matmul_scale_between": (2, 2, "silu·mul"),
    "two_adapters_dropout_cast": (2, 3, "silu·mul"),
    "conv1d_base": (1, 2, "gelu"),
}


@pytest.mark.parametrize("name", sorted(ADAPTED))
def test_adapter_spellings_are_one_region(name):
    fn = ADAPTED[name]
    x = torch.randn(2, 10, D)
    regions, skipped = _capture_regions(fn, x)
    assert len(regions) == 1 and not skipped, skipped
    region = regions[0]
    ups, adapters, activation = EXPECTED[name]
    assert len(region.up_projections) == ups and region.intermediate == I and region.hidden == D
    assert region.activation == activation and region.extra["adapters"] == adapters
    assert region.input.op == "placeholder"  # the 3-D token input, not a view the base reads


def test_full_rank_side_path_is_not_an_adapter():
    """``base(x) + W2(W1(x))`` with W1 square is not low-rank: W2 reads an intermediate, so the MLP
    has a projection that does not read its input and is refused."""
    fn = _swiglu(lambda x: F.linear(x, WG) + F.linear(F.linear(x, FULL), WU), lambda x: F.linear(x, WU), lambda x: F.linear(x, WD))
    regions, skipped = _capture_regions(fn, torch.randn(2, 10, D))
    assert not regions
    assert any("does not read its input" in why for _, why in skipped), skipped


def test_adapter_reading_another_tensor_is_refused():
    """An "adapter" on a different token tensor than its base is not part of the projection (a scalar
    scale of the base's input would be: ``B(A(2·x))`` is an adapter of ``x``)."""
    def fn(x):
        y = torch.tanh(x)
        gate = F.linear(x, WG) + F.linear(F.linear(y, AG), BG)
        return F.linear(F.silu(gate) * F.linear(x, WU), WD)

    regions, skipped = _capture_regions(fn, torch.randn(2, 10, D))
    assert not regions and skipped
