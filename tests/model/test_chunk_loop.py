"""The loop form (the default): each chunked region is one opaque loop operator.

Checked: the compiled graphs have one loop call per region whatever M is (the same number of nodes
at M = 2 and M = 16, so compile work does not grow with M); every layer's MLP shares one registered
body; losses and gradients equal eager PyTorch on the same weights (Llama, GPT-2 with biases and a
tied head, with and without checkpointing, frozen weights); the operator's op-by-op loss math equals
the fused one (soft-capping, ignored targets, all ignored); an unknown body gives a clear error; the
simulation's working set of a loop call shrinks with more chunks.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mstfx
from mstfx import chunk_loop, chunked_ops
from mstfx.config import MstConfig

from conftest import assert_same, loss_and_grads, tiny_gpt2, tiny_llama

LOOP = torch.ops.mstfx.chunk_loop.default
LOOP_BW = torch.ops.mstfx.chunk_loop_backward.default
HEAD_LOOP = torch.ops.mstfx.linear_cross_entropy_loop.default


def _program(model, seq_len: int, config: MstConfig):
    from mstfx.tools.compiled_program import capture_program

    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    return capture_program(model.train(), ids, config)


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def _meta_llama(layers=3, ckpt=False):
    with torch.device("meta"):
        model = tiny_llama(layers=layers)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("ckpt", [False, True])
def test_graph_size_does_not_grow_with_m(ckpt):
    sizes = {}
    for m in (2, 16):
        prog = _program(_meta_llama(ckpt=ckpt), 512, MstConfig(mini_sequences=m))
        assert _count(prog.forward, LOOP) == 3 and _count(prog.forward, HEAD_LOOP) == 1
        assert _count(prog.backward, LOOP_BW) == 3
        # a checkpointed layer's recompute does not run the MLP's forward loop again: only the
        # backward operator rebuilds the chunks, one at a time
        assert _count(prog.backward, LOOP) == 0
        sizes[m] = (len(prog.forward.graph.nodes), len(prog.backward.graph.nodes))
    assert sizes[2] == sizes[16], f"graph sizes at M=2 and M=16 differ: {sizes}"


def test_unrolled_form_grows_with_m():
    """The contrast that makes the loop form the default."""
    sizes = [len(_program(_meta_llama(layers=2), 512, MstConfig(mini_sequences=m, chunk_form="unrolled")).backward.graph.nodes)
             for m in (2, 8)]
    assert sizes[1] > sizes[0] + 2 * 6 * 4


def test_every_layer_shares_one_body():
    before = set(chunk_loop._BODIES)
    prog = _program(_meta_llama(layers=3), 256, MstConfig(mini_sequences=4))
    bodies = {n.args[0] for n in prog.forward.graph.nodes if n.target is LOOP}
    assert len(bodies) == 1
    assert bodies <= set(chunk_loop._BODIES)
    assert len(set(chunk_loop._BODIES) - before) <= 1


def test_unregistered_body_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not registered in this process"):
        chunk_loop.body_of("mst_body_0000")


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_equals_eager(arch, ckpt):
    model = tiny_llama(layers=2) if arch == "llama" else tiny_gpt2()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(3))
    ref = loss_and_grads(copy.deepcopy(model), ids, ids)
    torch._dynamo.reset()
    got = loss_and_grads(copy.deepcopy(model), ids, ids, mstfx.backend(MstConfig(mini_sequences=5, compiler="aot_eager")))
    report = mstfx.explain(last=1)
    assert "one loop operator" in report
    assert_same(ref, got)


def test_frozen_weights_get_no_gradient():
    model = tiny_llama(layers=2)
    for p in model.model.layers[0].mlp.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(4))
    ref = loss_and_grads(copy.deepcopy(model), ids, ids)
    torch._dynamo.reset()
    got = loss_and_grads(copy.deepcopy(model), ids, ids, mstfx.backend(MstConfig(mini_sequences=4, compiler="aot_eager")))
    assert set(got[1]) == set(ref[1])
    assert_same(ref, got)


@pytest.mark.parametrize("transforms", [
    (("cast", torch.float64),),
    (("cast", torch.float64), ("scale", 0.3), ("tanh",), ("scale", 30.0)),
])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
def test_op_by_op_loss_equals_fused(transforms, ignored):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.float64, generator=g)
    w = torch.randn(700, 16, dtype=torch.float64, generator=g)
    b = torch.randn(700, dtype=torch.float64, generator=g)
    t = torch.randint(0, 700, (300,), generator=g)
    if ignored == "some":
        t[::5] = -100
    elif ignored == "all":
        t[:] = -100
    args = (h, w, b, t, -100, "mean", transforms, 7, True, True, True)
    ref = chunked_ops._fused_loss_and_grads(*args)
    got = chunked_ops._fused_loss_and_grads(*args, in_place=True)
    for r, q in zip(ref, got):
        torch.testing.assert_close(q, r, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("transforms", [
    (("cast", torch.float32),),
    (("cast", torch.float32), ("scale", 0.3), ("tanh",), ("scale", 30.0)),
])
def test_bf16_op_by_op_reuses_the_dead_buffer_for_the_upcast_and_equals_fused(transforms):
    """bf16 logits: the loop writes dL/dW's fp32 upcast of the rounded logits gradient into the dead
    pre-rounding buffer: the same values as a fresh upcast, bit for bit, and with the plain fp32 cast a
    chunk holds its fp32 logits and their bf16 gradient only (6 B per tokens×vocab entry, not 10)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 32, generator=g).to(torch.bfloat16)
    w = (torch.randn(2000, 32, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(2000, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 2000, (256,), generator=g)
    args = (h, w, b, t, -100, "mean", transforms, 4, True, True, True)
    ref = chunked_ops._fused_loss_and_grads(*args)
    got = chunked_ops._fused_loss_and_grads(*args, in_place=True)
    for r, q in zip(ref, got):  # (the in-place softmax rounds differently in its last bits)
        torch.testing.assert_close(q, r, rtol=1e-2 if q.dtype == torch.bfloat16 else 1e-4, atol=1e-6)
    # one chunk's accumulation: through the dead buffer and through a fresh upcast, bit for bit
    g_z = torch.randn(64, 2000, generator=g)
    g_logits = g_z.to(torch.bfloat16)
    plain = chunked_ops._HeadGradients(w, b, torch.float32, True, True, True)
    plain.add(g_logits, h[:64])
    reused = chunked_ops._HeadGradients(w, b, torch.float32, True, True, True)
    reused.add(g_logits, h[:64], scratch=g_z)
    assert torch.equal(plain.w, reused.w) and torch.equal(plain.b, reused.b) and torch.equal(plain.h(), reused.h())
    if len(transforms) > 1:  # soft-capping's backward holds its tanh and products besides: sized elsewhere
        return
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = [torch.empty(x.shape, dtype=x.dtype) for x in (h, w, b, t)]
        tracker = MemTracker()
        tracker.track_external(*fake)
        with tracker:
            chunked_ops._fused_loss_and_grads(*fake, *args[4:], in_place=True)
        peak = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    inputs = sum(x.untyped_storage().nbytes() for x in fake)
    accumulators = 2000 * 32 * 4 + 2000 * 4
    chunk_entries = 256 // 4 * 2000
    assert peak - inputs - accumulators <= chunk_entries * (4 + 2) + 256 * 32 * 2 * 2 + 64 * 1024, peak


def test_transforms_round_trip():
    tf = (("cast", torch.float32), ("scale", 0.0883883461356163), ("tanh",), ("scale", 30.0))
    assert chunked_ops.decode_transforms(chunked_ops.encode_transforms(tf)) == tf


def test_simulated_working_set_shrinks_with_chunks():
    from mstfx.tools.compiled_program import _loop_workspace

    work = {}
    for m in (2, 8):
        prog = _program(_meta_llama(layers=1), 1024, MstConfig(mini_sequences=m))
        head = next(n for n in prog.forward.graph.nodes if n.target is HEAD_LOOP)
        mlp_bw = next(n for n in prog.backward.graph.nodes if n.target is LOOP_BW)
        work[m] = (_loop_workspace(head), _loop_workspace(mlp_bw))
    assert work[8][0] < work[2][0] and work[8][1] < work[2][1] / 2, work


def test_autocast_graphs_keep_the_unrolled_form():
    """A loop operator's backward would recompute outside the forward's autocast state: such graphs keep
    the unrolled form, and the result matches eager autocast."""
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(5))

    def loss_fn(m):
        def fn(i):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(input_ids=i, labels=i).loss
        return fn

    ref_model, got_model = copy.deepcopy(model), copy.deepcopy(model)
    ref = loss_fn(ref_model)(ids)
    ref.backward()
    torch._dynamo.reset()
    got = torch.compile(loss_fn(got_model), backend=mstfx.backend(MstConfig(mini_sequences=4, compiler="aot_eager")))(ids)
    got.backward()
    report = mstfx.explain(last=1)
    assert "autocast in the graph" in report and "one loop operator" not in report
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for (name, p), q in zip(ref_model.named_parameters(), got_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=5e-3, msg=name)


class _RotaryBesideMlp(torch.nn.Module):
    """A rotary-like block under ``torch.autocast(enabled=False)`` (as transformers 4.57's rotary
    embedding) beside a SwiGLU MLP; ``mlp_autocast``: the MLP itself runs under an enabled autocast."""

    def __init__(self, mlp_autocast: bool = False, hidden: int = 32, inter: int = 96):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, inter, bias=False)
        self.up = torch.nn.Linear(hidden, inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, hidden))
        self.mlp_autocast = mlp_autocast

    def _mlp(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            x = x + (x.float() * self.freq).cos()
        if self.mlp_autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self._mlp(x)
        else:
            y = self._mlp(x)
        return y.float().square().mean()


def _mlp_details(model, x, ambient_autocast=False):
    """Loss, grads and the MLP decisions' details of ``model`` compiled by the mst backend (aot_eager),
    and the same of eager on a copy."""
    import contextlib

    ref_model, got_model = copy.deepcopy(model), copy.deepcopy(model)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if ambient_autocast else contextlib.nullcontext
    with amp():
        ref = ref_model(x)
    ref.backward()
    torch._dynamo.reset()
    backend = mstfx.backend(MstConfig(mini_sequences=4, compiler="aot_eager"))
    with amp():
        got = torch.compile(got_model, backend=backend)(x)
    got.backward()
    details = [d.detail for r in backend.reports for d in r.decisions if d.kind == "mlp"]
    grads = [(p.grad, q.grad) for p, q in zip(ref_model.parameters(), got_model.parameters())]
    return ref, got, grads, details


def test_autocast_beside_the_region_keeps_the_loop_form():
    """An autocast context that does not enclose the MLP (a rotary embedding's) leaves it the loop form."""
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))
    ref, got, grads, details = _mlp_details(_RotaryBesideMlp(), x)
    assert len(details) == 1 and "one loop operator" in details[0], details
    torch.testing.assert_close(got, ref)
    for a, b in grads:
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("ambient_autocast", [False, True])
def test_region_under_a_changed_autocast_state_is_unrolled_and_exact(ambient_autocast):
    """An MLP inside an enabled autocast, or inside ``enabled=False`` while the caller runs under
    autocast, keeps the unrolled form (its recompute must see the forward's casts) and matches eager."""
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))
    model = _RotaryBesideMlp(mlp_autocast=not ambient_autocast)
    if ambient_autocast:  # the whole model under enabled=False, called under an enabled autocast
        inner = model

        class Disabled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                with torch.autocast("cpu", enabled=False):
                    return self.inner(x)

        model = Disabled()
    ref, got, grads, details = _mlp_details(model, x, ambient_autocast)
    assert len(details) == 1 and "autocast in the graph" in details[0], details
    tol = dict(rtol=2e-2, atol=5e-3) if not ambient_autocast else dict(rtol=1e-3, atol=1e-4)  # bf16 / fp32 chunk sums
    torch.testing.assert_close(got, ref, **tol)
    for a, b in grads:
        torch.testing.assert_close(b, a, **tol)


def test_disabled_autocast_without_ambient_autocast_keeps_the_loop_form():
    """``enabled=False`` around the MLP changes nothing when autocast is off around the graph."""
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))

    class Disabled(_RotaryBesideMlp):
        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x)

    ref, got, grads, details = _mlp_details(Disabled(), x)
    assert len(details) == 1 and "one loop operator" in details[0], details
    torch.testing.assert_close(got, ref)
    for a, b in grads:
        torch.testing.assert_close(b, a)
