"""Checkpoints in host memory: exact (same loss and gradients as eager without offload), and really
offloaded: every checkpointed layer's input is packed to the host (eager) or copied to the CPU by the
compiled forward and back by the compiled backward (checked on the graphs Inductor receives)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mstfx
from mstfx.hf_checkpointing import enable_checkpointing
from mstfx.offload import enable_checkpoint_offload, offloaded_checkpoint
from mstfx.post_grad.offload_checkpoints import OFFLOAD_PREFIX, RELOAD_PREFIX

from conftest import assert_same, loss_and_grads, tiny_llama

LAYERS, SEQ, HIDDEN = 3, 64, 64


def _ids(batch=2, seq=SEQ, vocab=256):
    torch.manual_seed(1)
    return torch.randint(0, vocab, (batch, seq))


class _CountingHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that copy to the host (as ``save_on_cpu`` does on CPU) and record each shape."""

    def __init__(self, packed: list):
        def pack(t):
            packed.append(tuple(t.shape))
            return t.detach().to("cpu", copy=True)

        super().__init__(pack, lambda t: t)


def test_eager_offload_matches_eager_without_checkpointing(clone):
    model = tiny_llama(layers=LAYERS)
    ids = _ids()
    ref = loss_and_grads(model, ids, ids)
    off = clone(model)
    enable_checkpoint_offload(off)
    assert_same(ref, loss_and_grads(off, ids, ids), rtol=1e-5, atol=1e-6)


def test_eager_offload_packs_every_layer_input_and_nothing_else(clone):
    model = tiny_llama(layers=LAYERS)
    ids = _ids()
    packed: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable_checkpoint_offload(model, hooks=lambda: _CountingHooks(packed))
    loss_and_grads(model, ids, ids)
    assert packed == [(2, SEQ, HIDDEN)] * LAYERS


def test_offloaded_checkpoint_on_a_plain_function_is_exact():
    torch.manual_seed(0)
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)
    f = lambda x, scale: torch.tanh(x @ w) * scale  # noqa: E731
    ref = f(x, scale=2.0).sum()
    gx, gw = torch.autograd.grad(ref, (x, w))
    packed: list = []
    got = offloaded_checkpoint(f, x, scale=2.0, hooks=lambda: _CountingHooks(packed)).sum()
    hx, hw = torch.autograd.grad(got, (x, w))
    assert torch.equal(ref, got) and torch.equal(gx, hx) and torch.equal(gw, hw)
    assert packed == [(4, 16)]  # the input only: what the function saves inside is recomputed


def test_enable_checkpoint_offload_refuses_a_module_without_hf_checkpointing():
    with pytest.raises(TypeError, match="offloaded_checkpoint"):
        enable_checkpoint_offload(torch.nn.Linear(2, 2))


def test_offload_needs_inductor():
    with pytest.raises(ValueError, match="enable_checkpoint_offload"):
        mstfx.MstConfig(offload_checkpoints=True, compiler="aot_eager")


class _Recorder:
    """Inductor's post-grad pre-pass slot: keeps a copy of every graph it is handed (forward, backward)."""

    def __init__(self):
        self.graphs: list = []

    def __call__(self, graph):
        self.graphs.append([(n.name, n.target, tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None,
                             n.meta["val"].device.type if isinstance(n.meta.get("val"), torch.Tensor) else None)
                            for n in graph.nodes])


def test_compiled_offload_matches_eager_and_copies_every_checkpoint(clone):
    model = tiny_llama(layers=LAYERS)
    ids = _ids()
    ref = loss_and_grads(model, ids, ids)
    off = clone(model)
    enable_checkpointing(off)
    rec = _Recorder()
    with torch._inductor.config.patch(post_grad_custom_pre_pass=rec, fx_graph_cache=False):
        got = loss_and_grads(off, ids, ids, mstfx.backend(mini_sequences=4, offload_checkpoints=True))
    assert_same(ref, got, rtol=1e-4, atol=1e-5)
    assert len(rec.graphs) == 2, "one forward and one backward graph"
    fw, bw = rec.graphs
    offloads = [n for n in fw if n[0].startswith(OFFLOAD_PREFIX)]
    reloads = [n for n in bw if n[0].startswith(RELOAD_PREFIX)]
    # every checkpointed layer's input (the embedding's output, then each layer's output but the last)
    assert [(shape, dev) for _, target, shape, dev in offloads] == [((2, SEQ, HIDDEN), "cpu")] * LAYERS
    assert all(target is torch.ops.prims.device_put.default for _, target, _, _ in offloads + reloads)
    assert sorted(n[0].removeprefix(RELOAD_PREFIX) for n in reloads) == sorted(n[0].removeprefix(OFFLOAD_PREFIX) for n in offloads)


def test_program_without_offload_copies_nothing_and_offload_moves_the_checkpoints_to_the_host():
    """The same joint pass and partition on the meta device (what ``mstfx simulate --program compiled``
    analyses): without offload no copy; with it the checkpoints' bytes leave the device for the host."""
    from mstfx.post_grad.offload_checkpoints import offloaded_nodes, reloaded_nodes
    from mstfx.tools.compiled_program import capture_program, program_peak

    model = tiny_llama(layers=LAYERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to("meta")
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    plain = capture_program(model, ids, mstfx.MstConfig(mini_sequences=4))
    off = capture_program(model, ids, mstfx.MstConfig(mini_sequences=4), offload=True)
    assert not offloaded_nodes(plain.forward) and not reloaded_nodes(plain.backward)
    assert len(offloaded_nodes(off.forward)) == len(reloaded_nodes(off.backward)) == LAYERS
    checkpoint = 512 * HIDDEN * 4
    p, q = program_peak(plain), program_peak(off)
    assert (p.host, q.host) == (0, LAYERS * checkpoint)
    # the forward no longer holds the checkpoints (all but the last, read by the LM head; a few small
    # buffers may move the forward's peak to another op)
    assert q.forward <= p.forward - 0.95 * (LAYERS - 1) * checkpoint
