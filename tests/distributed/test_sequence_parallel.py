"""Ulysses sequence parallelism in the mst backend: 2 gloo processes on CPU, compiler="aot_eager".

Each worker builds the same tiny model (one seed) and the same full batch, runs the full sequence
eagerly in one process as the reference, then its own half of the sequence through
``mstfx.compile(model, sequence_parallel=group)``: the loss summed over the group and every parameter
gradient summed over the group must equal the reference.  The workers also send back the report
(MLPs and LM head chunked, attention split) and the errors of the refused cases.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist

from mstfx.config import MstConfig
from mstfx.sequence_parallel import SequenceParallelError, check_heads

WORLD = 2
BATCH, SEQ = 2, 64  # 32 tokens per rank
RUN_TIMEOUT_S = float(os.environ.get("MSTFX_DIST_TIMEOUT", "600"))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def run_workers(worker_name: str, tmp_path, world: int = WORLD, **kwargs) -> list[dict]:
    """``worker_name`` of this module in ``world`` gloo processes (``tests/gloo_workers.py``)."""
    from gloo_workers import run_workers as run

    return run("test_sequence_parallel", worker_name, tmp_path, world, RUN_TIMEOUT_S, **kwargs)


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------
def _build(arch: str):
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: conftest
    from conftest import tiny_gpt2, tiny_llama

    return tiny_llama() if arch == "llama" else tiny_gpt2()


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, ::5] = -100
    labels[1, SEQ // 2] = -100  # the label a shard boundary shifts in
    return ids, labels


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return "no error"


def _sp_worker(rank: int, arch: str, checkpointing: bool) -> dict:
    import mstfx
    from mstfx.compile_model import backend_of
    from mstfx.sequence_parallel import global_loss, reduce_gradients, shard_batch

    torch._dynamo.reset()
    model = _build(arch)
    ids, labels = _batch()
    reference = copy.deepcopy(model)
    ref_loss = reference(input_ids=ids, labels=labels).loss
    ref_loss.backward()

    group = dist.new_group(list(range(dist.get_world_size())))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mstfx.compile(model, sequence_parallel=group, compiler="aot_eager", mini_sequences=2)
    batch = shard_batch(ids, labels, group)
    loss = model(**batch).loss
    loss.backward()
    reduce_gradients(model.parameters(), group)
    out = {
        "ref_loss": ref_loss.detach(), "ref_grads": _grads(reference), "loss": global_loss(loss, group),
        "grads": _grads(model),
        "decisions": [(d.kind, d.where, d.action, d.chunks, d.detail or d.reason)
                      for r in backend_of(model).reports for d in r.decisions],
        "errors": [r.error for r in backend_of(model).reports],
    }
    if arch == "llama" and dist.get_world_size() == WORLD:
        out["gqa_repeat"] = _gqa_repeat_check(rank, group)
    elif arch == "gpt2":
        out["refused"] = {
            "padding": _error(lambda: shard_batch(ids, labels, group, attention_mask=_left_padded(ids))),
            "odd_length": _error(lambda: shard_batch(ids[:, :-1], labels[:, :-1], group)),
            "heads": _error(lambda: _small_gpt2(group, heads=3)),
            "eager_attention": _error(lambda: _small_gpt2(group, heads=2, attention="eager")),
            "padding_at_run_time": _error(lambda: model(**batch, attention_mask=_left_padded(batch["input_ids"]))),
        }
    return out


def _left_padded(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return mask


def _gqa_repeat_check(rank: int, group) -> float:
    """One K/V head for 4 query heads on 2 ranks (fewer K/V heads than ranks): repeated, exact."""
    from mstfx.sequence_parallel import ulysses_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 16, 8, generator=g, requires_grad=True) for h in (4, 1, 1))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.sum().backward()
    part = slice(rank * 8, rank * 8 + 8)
    mine = [t.detach()[:, :, part].clone().requires_grad_() for t in (q, k, v)]
    out = ulysses_attention(*mine, group_name=group.group_name, world=WORLD, is_causal=True, enable_gqa=True)
    out.sum().backward()
    diff = (out - ref[:, :, part]).abs().max()
    for full, local in zip((q, k, v), mine):
        diff = torch.maximum(diff, (full.grad[:, :, part] - local.grad).abs().max())
    return float(diff.detach())


def _small_gpt2(group, heads: int, attention: str = "sdpa") -> None:
    """One call of a 1-layer GPT-2 compiled with sequence parallelism (refused cases: compile raises)."""
    import mstfx
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=24, n_layer=1, n_head=heads, n_positions=64, use_cache=False,
                     attn_implementation=attention)
    model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    mstfx.compile(model, sequence_parallel=group, compiler="aot_eager")
    model(input_ids=torch.zeros(1, 8, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------
def _check(results: list[dict], split_as: str = "Ulysses all-to-all, 2 of 4 heads per rank over 32×2 tokens") -> None:
    for res in results:
        torch.testing.assert_close(res["loss"], res["ref_loss"], rtol=1e-5, atol=1e-6)
        assert res["grads"].keys() == res["ref_grads"].keys()
        for name, ref in res["ref_grads"].items():
            torch.testing.assert_close(res["grads"][name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert not any(res["errors"]), res["errors"]
        kinds = {(kind, action) for kind, _, action, _, _ in res["decisions"]}
        assert ("mlp", "chunked") in kinds and ("lm_head", "chunked") in kinds, res["decisions"]
        split = [d for d in res["decisions"] if d[0] == "attention" and d[2] == "rewritten"]
        assert len(split) == 2 and all(split_as in d[4]
                                       for d in split), res["decisions"]


def test_llama_gqa_checkpointed_matches_single_process(tmp_path):
    results = run_workers("_sp_worker", tmp_path, arch="llama", checkpointing=True)
    _check(results)
    for res in results:  # the checkpointed layers traced whole (one graph): MLPs and attention in their bodies
        assert len(res["errors"]) == 1, res["decisions"]
    assert all(r["gqa_repeat"] < 1e-5 for r in results), [r["gqa_repeat"] for r in results]


def test_four_ranks_repeat_kv_heads(tmp_path):
    """4 ranks, 2 K/V heads: each K/V head is repeated for its query heads, then split (1 head per rank)."""
    results = run_workers("_sp_worker", tmp_path, world=4, arch="llama", checkpointing=False)
    _check(results, "Ulysses all-to-all, 1 of 4 heads per rank over 16×4 tokens (is_causal=True; 2 K/V heads repeated to 4")


def test_gpt2_tied_matches_single_process_and_refusals(tmp_path):
    results = run_workers("_sp_worker", tmp_path, arch="gpt2", checkpointing=False)
    _check(results)
    refused = results[0]["refused"]
    assert "SequenceParallelError" in refused["padding"] and "attention_mask has zeros" in refused["padding"]
    assert "SequenceParallelError" in refused["odd_length"] and "63" in refused["odd_length"]
    assert "3 query heads are not divisible" in refused["heads"] and "size 2" in refused["heads"]
    assert "splits scaled_dot_product_attention calls only" in refused["eager_attention"], refused["eager_attention"]
    assert "SequenceParallelError" in refused["padding_at_run_time"] and "all-ones" in refused["padding_at_run_time"]


def test_config_refuses_a_non_group():
    with pytest.raises(ValueError, match="sequence_parallel must be a torch.distributed ProcessGroup"):
        MstConfig(sequence_parallel=2)


def test_heads_not_divisible_are_refused():
    with pytest.raises(SequenceParallelError, match="6 query heads are not divisible by the sequence-parallel group size 4"):
        check_heads(6, 2, 4)
    check_heads(8, 2, 4)  # fewer K/V heads per rank than one: repeated at run time, accepted


def test_module_reachable_from_the_package():
    import mstfx

    assert mstfx.sequence_parallel.shard_batch is __import__("mstfx.sequence_parallel").sequence_parallel.shard_batch


@pytest.mark.parametrize("heads, kv_heads, world", [(8, 2, 4), (8, 2, 8), (8, 4, 2), (12, 3, 4), (12, 3, 2), (32, 8, 16)])
def test_kv_heads_repeated_as_few_times_as_each_rank_needs(heads, kv_heads, world):
    """What each rank of the all-to-all holds after ``ulysses_attention`` repeats K/V by
    ``kv_heads_split`` (head group j of the repeated K/V goes to rank j) pairs every query head of the
    rank with its own K/V head: attention per rank equals the whole attention on those query heads."""
    import torch.nn.functional as F

    from mstfx.planning.cost_model import kv_heads_split

    torch.manual_seed(0)
    q, k, v = torch.randn(1, heads, 6, 4), torch.randn(1, kv_heads, 6, 4), torch.randn(1, kv_heads, 6, 4)
    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    split = kv_heads_split(heads, kv_heads, world)
    assert split % world == 0 and split <= heads
    rk, rv = k.repeat_interleave(split // kv_heads, dim=1), v.repeat_interleave(split // kv_heads, dim=1)
    qh, kh = heads // world, split // world
    for rank in range(world):
        mine = slice(rank * qh, (rank + 1) * qh)
        theirs = slice(rank * kh, (rank + 1) * kh)
        out = F.scaled_dot_product_attention(q[:, mine], rk[:, theirs], rv[:, theirs], is_causal=True,
                                             enable_gqa=kh != qh)
        torch.testing.assert_close(out, whole[:, mine])
