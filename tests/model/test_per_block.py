"""Per-block compilation (``mstfx.compile(model, per_block=True)``): each repeated block its own graph.

Loss and every gradient equal eager (Llama, GPT-2 with tied embeddings, a Mixtral MoE; with and
without HF checkpointing; Inductor with checkpoint offload); N identical blocks share one compiled
graph in which the MLP is chunked, and the LM head + loss stays chunked in the model's own graph.
With an optimizer step in ``register_post_accumulate_grad_hook`` the gradients of each block are
consumed and freed when that block's backward ends, where a whole-model compile holds them all.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import mstfx
from conftest import assert_same, tiny_gpt2, tiny_llama
from mstfx.compile_model import backend_of
from mstfx.hf_checkpointing import enable_checkpointing
from mstfx.per_block import (NoRepeatedBlocksError, blocks_of, find_blocks, install_compiled_call, is_per_block_break,
                             remove_compiled_call)
from mstfx.tools.architectures import BY_NAME, loss_and_grads, sample_batch

LAYERS = 3
M = 3


def _build(name: str, checkpointing: bool = False):
    model = {"llama": lambda: tiny_llama(layers=LAYERS), "gpt2": lambda: tiny_gpt2(layers=LAYERS),
             "mixtral": BY_NAME["mixtral"].build}[name]()
    if checkpointing:
        enable_checkpointing(model)
    return model.train()


def _kinds(report) -> list[str]:
    return sorted(d.kind for d in report.chunked)


def _assert_program(be, layers: int, block_kind: str = "mlp") -> None:
    """One block graph (reused by every block) with its MLP chunked, the LM head chunked in another
    graph, nothing left unchanged by a fallback, and no graph break but the blocks' own."""
    text = mstfx.explain(be)
    block_graphs = [r for r in be.reports if block_kind in _kinds(r)]
    assert len(block_graphs) == 1, text
    assert _kinds(block_graphs[0]).count(block_kind) == 1, text
    assert sum(_kinds(r).count("lm_head") for r in be.reports) == 1, text
    assert all(r.error is None for r in be.reports), text
    assert all(d.chunks == M for r in be.reports for d in r.chunked), text
    breaks = [b for r in be.reports for b in r.graph_breaks]
    assert breaks and all(is_per_block_break(b) for b in breaks), text
    assert "block boundary (per_block" in text
    # the decoder body runs eagerly: Hugging Face builds no S×S causal mask for the block graphs
    assert "mask is a graph input" not in text, text


def test_find_blocks_by_structure():
    assert find_blocks(tiny_llama(layers=2))[0] == "model.layers"
    assert find_blocks(tiny_gpt2(layers=2))[0] == "transformer.h"
    # a list of identical blocks inside each block (experts, heads) is not the model's blocks
    inner = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList(
        [torch.nn.Linear(4, 4) for _ in range(5)])) for _ in range(2)])
    assert find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), inner))[0] == "1"
    # children of different shapes are not repeated blocks
    with pytest.raises(NoRepeatedBlocksError):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)))
    with pytest.raises(NoRepeatedBlocksError):
        mstfx.compile(torch.nn.Linear(4, 4), per_block=True)
    with pytest.raises(ValueError, match="per_block"):  # a step in backward frees nothing early in one graph
        mstfx.transform(tiny_llama(layers=2), budget_gb=1, optimizer_in_backward=True, per_block=False)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_per_block_is_exact_and_every_region_chunked(name, checkpointing):
    model = _build(name, checkpointing)
    ids, labels = sample_batch()
    ref = loss_and_grads(model, ids, labels)
    mstfx.compile(model, per_block=True, compiler="aot_eager", mini_sequences=M)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mstfx.MstGraphBreakWarning)
        warnings.simplefilter("error", mstfx.MstFallbackWarning)
        for _ in range(2):  # the second step reuses every graph
            got = loss_and_grads(model, ids, labels)
    assert_same(ref, got)
    be = backend_of(model)
    path, blocks = blocks_of(model)
    assert len(blocks) == LAYERS
    n_graphs = len(be.reports)
    _assert_program(be, LAYERS)
    loss_and_grads(model, ids, labels)
    assert len(be.reports) == n_graphs  # nothing recompiled


def test_per_block_mixture_of_experts():
    model = _build("mixtral")
    assert find_blocks(model)[0] == "model.layers"
    ids, labels = sample_batch()
    ref = loss_and_grads(model, ids, labels)
    mstfx.compile(model, per_block=True, compiler="aot_eager", mini_sequences=M)
    assert_same(ref, loss_and_grads(model, ids, labels))
    _assert_program(backend_of(model), 2, block_kind="routed_experts")


def test_per_block_inductor_with_checkpoint_offload():
    model = _build("llama", checkpointing=True)
    ids, labels = sample_batch()
    ref = loss_and_grads(model, ids, labels)
    with torch._inductor.config.patch(fx_graph_cache=False):
        mstfx.compile(model, per_block=True, mini_sequences=M, offload_checkpoints=True)
        got = loss_and_grads(model, ids, labels)
    assert_same(ref, got)
    _assert_program(backend_of(model), LAYERS)


# --------------------------------------------------------------------------------------------------
# Gradients leave per block: optimizer step in backward
# --------------------------------------------------------------------------------------------------
class _GradientStorages(TorchDispatchMode):
    """Every storage an op creates (while the mode is on) in a parameter's shape: the gradients the
    backward makes, whether they sit in ``.grad`` or still in a compiled backward's outputs."""

    def __init__(self, shapes: set, params: list):
        super().__init__()
        self.shapes = shapes
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.made: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes:
                s = t.untyped_storage()
                if s.data_ptr() not in self.param_ptrs:
                    self.made.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.made.values() if not ref.expired())


def _optimizer_in_backward(model, lr=0.1):
    """SGD in ``register_post_accumulate_grad_hook`` (step, then ``p.grad = None``); the hook also
    records the live gradient bytes (``record[0]`` is the recorder while one is on)."""
    record: list = [None, []]

    def hook(p):
        if record[0] is not None:
            record[1].append(record[0].live_bytes())
        with torch.no_grad():
            p.add_(p.grad, alpha=-lr)
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return record


def _live_gradients_per_hook(model, ids, labels) -> list[int]:
    record = _optimizer_in_backward(model)
    model(input_ids=ids, labels=labels).loss.backward()  # compile (and warm up) outside the recorder
    params = list(model.parameters())
    record[0] = _GradientStorages({tuple(p.shape) for p in params}, params)
    loss = model(input_ids=ids, labels=labels).loss
    with record[0]:
        loss.backward()
    assert all(p.grad is None for p in params)
    return record[1]


def _nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_gradients_leave_per_block_with_an_optimizer_step_in_backward(clone):
    base = tiny_llama(layers=4).train()
    ids, labels = sample_batch()
    eager = clone(base)
    _optimizer_in_backward(eager)
    for _ in range(2):
        eager(input_ids=ids, labels=labels).loss.backward()

    per_block = mstfx.compile(clone(base), per_block=True, compiler="aot_eager", mini_sequences=M)
    live = _live_gradients_per_hook(per_block, ids, labels)
    whole = mstfx.compile(clone(base), compiler="aot_eager", mini_sequences=M)
    live_whole = _live_gradients_per_hook(whole, ids, labels)

    total = _nbytes(base)
    one_block = _nbytes(base.model.layers[0])
    rest = _nbytes(base.lm_head) + _nbytes(base.model.embed_tokens) + _nbytes(base.model.norm)
    assert len(live) == len(live_whole) == len(list(base.parameters()))
    # per block: at any hook, at most one block's gradients (and the head's and embedding's) are alive
    assert max(live) <= one_block + rest, (max(live), one_block, rest)
    # whole model: the one backward graph returns (nearly) every gradient at once (measured 87-95% of them
    # alive at the first hook, depending on which the graph's outputs already share), several blocks' worth
    assert max(live_whole) >= 0.8 * total > one_block + rest, (max(live_whole), total)
    assert max(live_whole) > 2 * max(live), (max(live_whole), max(live))
    # and the optimizer in backward did the same steps as eager
    for (name, p), q, r in zip(eager.named_parameters(), per_block.parameters(), whole.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"per-block {name}: {m}")
        torch.testing.assert_close(r, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"whole {name}: {m}")


def test_per_block_with_drop_logits_builds_no_logits():
    """The model's trace is broken at the module that runs the blocks; with nested graph breaks the
    ``drop_logits`` wrapper stays in the LM-head graph, so the logits are not a graph output."""
    model = tiny_llama(layers=2)
    ids, labels = sample_batch()
    ref = loss_and_grads(model, ids, labels)
    mstfx.drop_logits(model)
    mstfx.compile(model, per_block=True, compiler="aot_eager", mini_sequences=4)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    assert_same(ref, (out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    reports = backend_of(model).reports
    assert not any(r.logits_escape for r in reports), mstfx.explain(model)
    assert any(d.kind == "lm_head" and d.action == "chunked" for r in reports for d in r.decisions), mstfx.explain(model)


def test_a_compiled_call_is_hung_once_and_removed_without_the_modules_own_hooks():
    """The seam both per-block programs use: ``module(x)`` runs the installed call (which may run the
    module's own ``_call_impl``, hooks and all), installing twice adds one keep-alive hook, and removing
    it leaves the module's own hooks and its plain call."""
    lin = torch.nn.Linear(3, 3)
    seen, calls = [], []
    lin.register_forward_pre_hook(lambda module, args: seen.append("own"))

    def call(*args, **kwargs):
        calls.append("installed")
        return lin._call_impl(*args, **kwargs)

    install_compiled_call(lin, call)
    install_compiled_call(lin, call)
    assert len(lin._forward_pre_hooks) == 2  # the module's own and one no-op that keeps Dynamo on __call__
    x = torch.randn(2, 3)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert calls == ["installed"] and seen == ["own"]
    remove_compiled_call(lin)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert calls == ["installed"] and seen == ["own", "own"]
    assert lin._compiled_call_impl is None and len(lin._forward_pre_hooks) == 1


# --------------------------------------------------------------------------------------------------
# transform(per_block=True): a plan, and a compile of the blocks, per bucket
# --------------------------------------------------------------------------------------------------
#: 6 MiB at batch 2: the tiny Llama needs mst with M = 4 at S = 256, mst + checkpointing with M = 8 at 512
TRANSFORM_BUDGET_GB = 0.006
LENGTHS = (256, 512)


def test_transform_per_block_is_exact_with_each_buckets_plan_in_its_blocks(clone):
    from mstfx.planning import planner as P

    base = tiny_llama(layers=LAYERS).train()
    data = {s: sample_batch(batch=2, seq=s) for s in LENGTHS}
    refs = {s: loss_and_grads(base, *data[s]) for s in LENGTHS}
    model = mstfx.transform(clone(base), budget_gb=TRANSFORM_BUDGET_GB, batch=2, per_block=True, compiler="aot_eager")
    state = model._mstfx_transform
    with warnings.catch_warnings():
        warnings.simplefilter("error", mstfx.MstGraphBreakWarning)
        warnings.simplefilter("error", mstfx.MstFallbackWarning)
        # the longer first: its plan turns checkpointing on, which the shorter bucket then compiles with
        for s in sorted(LENGTHS, reverse=True):
            assert_same(refs[s], loss_and_grads(model, *data[s]))
        compiled = state.compiles
        for s in LENGTHS:
            assert_same(refs[s], loss_and_grads(model, *data[s]))
    assert state.compiles == compiled  # each bucket's graphs reused
    assert set(state.buckets) == {(2, s) for s in LENGTHS}
    planned = {s: state.buckets[(2, s)][0] for s in LENGTHS}
    # the premise: the two buckets chunk differently, and the longer one needs checkpointing
    assert planned[256].mini_sequences["mlp"] != planned[512].mini_sequences["mlp"]
    assert planned[512].checkpointing and not planned[256].checkpointing
    for s, p in planned.items():
        assert p == P.plan(model, s, TRANSFORM_BUDGET_GB, batch=2, per_block=True)  # the per-block program's plan
        be = state.buckets[(2, s)][2]
        text = mstfx.explain(be)
        block_graphs = [r for r in be.reports if "mlp" in _kinds(r)]
        # the bucket's blocks: one graph for all three, its MLP with the bucket's M (not another bucket's)
        assert len(block_graphs) == 1 and _kinds(block_graphs[0]) == ["mlp"], text
        assert [d.chunks for d in block_graphs[0].chunked] == [p.mini_sequences["mlp"]], text
        assert [d.chunks for r in be.reports for d in r.chunked if d.kind == "lm_head"] == [p.mini_sequences["lm_head"]], text
        assert all(is_per_block_break(b) for r in be.reports for b in r.graph_breaks), text
        assert "mask is a graph input" not in text, text
    mstfx.untransform(model)
    assert all(b._compiled_call_impl is None and not b._forward_pre_hooks for b in model.model.layers)
    assert blocks_of(model) is None


def test_transform_per_block_refuses_a_budget_below_any_plan_and_leaves_the_model_as_it_was():
    model = tiny_llama(layers=LAYERS)
    with pytest.raises(mstfx.InfeasibleBudgetError, match="GiB") as info:
        mstfx.transform(model, budget_gb=0.001, per_block=True, seq_len=512)
    assert info.value.seq_len == 512
    assert "forward" not in model.__dict__ and blocks_of(model) is None
    assert all(b._compiled_call_impl is None and not b._forward_pre_hooks for b in model.model.layers)
    # without seq_len: no length at all fits (the parameters and optimizer state alone are past it)
    with pytest.raises(mstfx.InfeasibleBudgetError, match="no sequence fits"):
        mstfx.transform(model, budget_gb=0.001, per_block=True)
    with pytest.raises(NoRepeatedBlocksError):  # nothing to compile per block: refused before any change
        mstfx.transform(torch.nn.Linear(4, 4), budget_gb=1, per_block=True,
                        config=dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                    num_key_value_heads=1, vocab_size=4))


def test_per_block_plan_counts_one_blocks_gradients_with_the_optimizer_in_backward():
    """The planner's per-block program with an optimizer step in backward holds one layer's gradients
    where the whole-model program holds all made so far: at 8B that is ~14 GiB, a longer S in 80 GiB."""
    from mstfx.planning import planner as P

    kept = P.longest_fitting("llama3-8b", 80, optimizer="adamw-bf16", per_block=True)
    freed = P.longest_fitting("llama3-8b", 80, optimizer="adamw-bf16", per_block=True, optimizer_in_backward=True)
    assert freed > 1.1 * kept, (freed, kept)
    assert P.longest_fitting("llama3-8b", 80, optimizer="paper", per_block=True) == freed  # paper = AdamW bf16 in backward
    with pytest.raises(ValueError, match="paper"):  # not modelled for the whole-model program
        P.longest_fitting("llama3-8b", 80, optimizer="paper")
    whole = P.plan("llama3-8b", 8192, 80, optimizer="adamw-bf16")
    p = P.plan("llama3-8b", 8192, 80, optimizer="adamw-bf16", per_block=True, optimizer_in_backward=True)
    # gradients alive at the peak: one module's (the embedding's or a layer's), not all 15 GiB
    assert p.breakdown.grads < P.GiB < 10 * P.GiB < whole.breakdown.grads, (p.breakdown.grads, whole.breakdown.grads)


def test_transform_compiles_per_block_by_default_only_when_the_optimizer_steps_in_backward():
    """transform's default program: per block with an optimizer in backward (``optimizer_in_backward`` or
    the ``paper`` setup), where the blocks' gradients leave with their backward; the whole model
    otherwise; an explicit ``per_block`` wins."""
    from mstfx.transform import default_per_block

    assert default_per_block("adamw", False) is False and default_per_block("paper", False) is True
    assert default_per_block("adamw-bf16", True) is True
    for kwargs, blocks in ((dict(), False), (dict(optimizer="paper"), True), (dict(optimizer_in_backward=True), True),
                           (dict(optimizer="paper", per_block=False), None)):
        model = tiny_llama(layers=LAYERS)
        if blocks is None:  # the paper setup frees nothing early in a whole-model program: refused, as planned
            with pytest.raises(ValueError, match="paper"):
                mstfx.transform(model, budget_gb=1, **kwargs)
            continue
        mstfx.transform(model, budget_gb=1, **kwargs)
        assert (model._mstfx_transform.blocks is not None) is blocks, kwargs
        assert all((b._compiled_call_impl is not None) is blocks for b in model.model.layers), kwargs
        mstfx.untransform(model)
