"""Ulysses sequence parallelism in the cost model, the planner and the simulator (planning only).

Cost-model tests are pure arithmetic; one tiny eager simulation checks that the simulated rank (its
S/N tokens, the all-to-alls around attention) agrees with the cost model."""

from __future__ import annotations

import json

import pytest

from mstfx import cli
from mstfx.planning import cost_model as cm
from mstfx.planning import planner

#: GQA: 8 query heads, 2 KV heads (so N = 4 and 8 replicate each KV head on N/2 ranks)
GQA = cm.Arch(hidden=512, intermediate=1792, layers=4, heads=8, kv_heads=2, head_dim=64, vocab=32000)
BF16 = cm.Precision.of("bf16")
S = 65536


def _regions(n: int, mode: str = "mst+checkpointing", program: str = "eager", arch: cm.Arch = GQA) -> dict:
    cost = cm.step_cost(arch, mode, "none", BF16, 8, 8, program, sequence_parallel=n, gpus=max(n, 1))
    return {r.kind: r for r in cost.regions}


@pytest.mark.parametrize("program", cm.PROGRAMS)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_token_wise_terms_scale_with_one_over_n(n, program):
    one, par = _regions(1, program=program), _regions(n, program=program)
    terms = [(k, t) for k in ("mlp", "lm_head") for t in ("saved", "bwd_transient")] + [("checkpointed layer", "saved")]
    for kind, term in terms:  # (a checkpointed layer's recompute holds its attention, which is not token-wise)
        a, b = getattr(one[kind], term), getattr(par[kind], term)
        # a rank's S/N tokens: the whole sequence on N ranks is one rank's at S/N
        assert cm.evaluate(b, S) == pytest.approx(cm.evaluate(a, S // n)), (kind, term)
    # M counts a rank's tokens too (the chunk rule sees the graph the rank runs)
    assert cm.evaluate(par["mlp"].recompute_flops, S) == pytest.approx(cm.evaluate(one["mlp"].recompute_flops, S) / n)


def test_attention_runs_on_the_whole_sequence_with_h_over_n_heads():
    n, a, hd = 4, 2, GQA.head_dim
    attn = _regions(n)["attention"]
    heads, kv_heads = GQA.heads // n, 1  # 2 query heads; 2 KV heads over 4 ranks: one each, replicated
    whole = S * hd * a * (heads + 2 * kv_heads + heads) + S * heads * 4  # q, k, v, output, fp32 log-sum-exp
    local = S // n * (cm.norm_saved(GQA, a) + a * GQA.hidden + a * GQA.heads * hd)  # norm, its output, out-proj input
    assert cm.evaluate(attn.saved, S) == pytest.approx(whole + local)
    assert attn.shape.startswith("2×64 heads per rank (of 8)")
    # FlashAttention-style: linear in S, nothing S×S
    assert cm.evaluate(attn.saved, 2 * S) == pytest.approx(2 * cm.evaluate(attn.saved, S))


def test_all_to_all_buffers_are_counted():
    n, a, hd = 2, 2, GQA.head_dim
    attn = _regions(n)["attention"]
    t = S // n
    q, kv_r = GQA.heads * hd, GQA.kv_heads * hd  # 2 KV heads over 2 ranks: no copy
    # forward: send and receive buffers of q, k and v for the rank's tokens
    assert cm.evaluate(attn.fwd_transient, S) == pytest.approx(2 * t * a * (q + 2 * kv_r))
    # backward: the kernel's moment, with the output gradient on both sides of its all-to-all
    gqa = 2 * a * q
    kernel = t * (a * GQA.hidden + 2 * a * q + a * (q + 2 * kv_r) + 4 * q + 4 * GQA.heads + gqa)
    assert cm.evaluate(attn.bwd_transient, S) == pytest.approx(kernel)


def test_kv_heads_fewer_than_ranks_are_replicated_and_counted():
    assert cm.kv_heads_per_rank(GQA, 2) == 1 and cm.kv_replication(GQA, 2) == 1
    assert cm.kv_heads_per_rank(GQA, 8) == 1 and cm.kv_replication(GQA, 8) == 4
    mha = cm.Arch(**{**GQA.__dict__, "kv_heads": 8})
    # at N = 8 every rank holds one KV head either way: 2 KV heads replicated 4× cost what 8 split cost
    assert cm.evaluate(_regions(8)["attention"].saved, S) == pytest.approx(cm.evaluate(_regions(8, arch=mha)["attention"].saved, S))
    # and more than an unreplicated share: per rank token, K/V at N·hd instead of Hkv·hd
    kv_bytes = lambda n: cm.evaluate(_regions(n)["attention"].saved, S) * n  # noqa: E731  (per whole sequence)
    a, hd = 2, GQA.head_dim
    assert kv_bytes(8) - kv_bytes(2) == pytest.approx(S * a * 2 * (8 - 2) * hd)


def test_planner_accepts_the_kv_heads_the_runtime_accepts():
    """One rule for planner and runtime: 12 query / 3 KV heads on 2 or 4 ranks (N and Hkv divide neither
    way) is planned, with K/V repeated to the query heads as the runtime repeats them; 32 / 8 on 16
    ranks repeats K/V only to 16 heads (one per rank)."""
    from mstfx.sequence_parallel import check_heads

    odd_kv = cm.Arch(**{**GQA.__dict__, "kv_heads": 3, "heads": 12})
    for n in (2, 4):
        check_heads(12, 3, n)
        assert cm.check_sequence_parallel(odd_kv, n, n) == n
        assert cm.kv_heads_split(12, 3, n) == 12 and cm.kv_heads_per_rank(odd_kv, n) == 12 // n
    assert cm.kv_heads_split(32, 8, 16) == 16 and cm.kv_heads_split(32, 8, 4) == 8 and cm.kv_heads_split(8, 2, 8) == 8
    llama = cm.Arch(**{**GQA.__dict__, "kv_heads": 8, "heads": 32})
    assert cm.kv_heads_per_rank(llama, 16) == 1 and cm.kv_replication(llama, 16) == 2


@pytest.mark.parametrize("n, gpus, message", [(3, 3, "query heads"), (3, 6, "query heads"), (4, 6, "divide gpus"),
                                              (0, 1, "positive integer")])
def test_bad_degree_is_a_clear_error(n, gpus, message):
    with pytest.raises(ValueError, match=message):
        cm.step_cost(GQA, "mst", sequence_parallel=n, gpus=gpus)
    not_grouped = cm.Arch(**{**GQA.__dict__, "kv_heads": 3, "heads": 8})
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"):
        cm.check_sequence_parallel(not_grouped, 4, 4)
    with pytest.raises(ValueError, match="multiple of sequence_parallel"):
        planner.predict_peak(GQA, 1001, sequence_parallel=2, gpus=2)


def test_fsdp_shards_state_over_every_gpu():
    one = cm.step_cost(GQA, "mst", "adamw", BF16, 4, 4)
    fsdp = cm.step_cost(GQA, "mst", "adamw", BF16, 4, 4, gpus=8, sequence_parallel=2)
    largest = max(GQA.layer_params, GQA.vocab * GQA.hidden) * 2
    assert float(fsdp.params) == pytest.approx(float(one.params) / 8 + 2 * largest)
    assert float(fsdp.grads) == pytest.approx(float(one.grads) / 8 + largest)
    assert float(fsdp.optimizer) == pytest.approx(float(one.optimizer) / 8)


def test_plan_host_memory_per_node_and_longest_sequence():
    n = 16
    arch = cm.Arch(**{**GQA.__dict__, "heads": 16})
    seq = 44 * 16384  # fits 1 GiB per GPU only with the checkpoints in host memory
    p = planner.plan(arch, seq, 1.0, optimizer="offload", gpus=32, sequence_parallel=n, margin=0.0)
    assert p.mode == "mst+checkpointing+offload" and p.gpus == 32 and p.sequence_parallel == n
    pinned = arch.layers * seq // n * arch.hidden * 2  # every layer's checkpoint of a rank's tokens
    assert p.pinned_bytes == pytest.approx(pinned)
    assert p.host_bytes == pytest.approx(pinned + 12 * arch.n_params / 32)
    assert p.host_node_bytes == pytest.approx(8 * p.host_bytes)  # 8 GPUs share a host
    assert p.longest_seq_len % n == 0 and p.longest_seq_len >= seq
    assert "host memory per node (8 GPUs)" in p.table().columns[0]._cells
    one = planner.longest_seq_len(arch, 1.0, mode="mst+checkpointing+offload", optimizer="offload", gpus=32)
    assert p.longest_seq_len > 8 * one  # the whole sequence grows with N


def test_cli_flags_are_validated(capsys):
    argv = ["plan", "--model", "llama3-8b", "--seq-len", "8192", "--budget-gb", "80", "--gpus", "8"]
    assert cli.main(argv + ["--sequence-parallel", "3"]) == 2
    assert "--sequence-parallel 3 must divide --gpus 8" in capsys.readouterr().err
    assert cli.main(argv[:-1] + ["12", "--sequence-parallel", "12"]) == 2  # 32 heads
    assert "must divide the 32 query heads" in capsys.readouterr().err
    sim = ["simulate", "--model", "llama3-8b", "--gpu-gb", "80", "--gpus", "4", "--plot", "none", "--no-progress"]
    assert cli.main(sim + ["--sequence-parallel", "8"]) == 2
    assert "--sequence-parallel 8 must divide --gpus 4" in capsys.readouterr().err
    assert cli.main(sim + ["--sequence-parallel", "0"]) == 2


TINY = dict(model_type="llama", hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1 << 20)


def test_simulated_rank_agrees_with_the_cost_model(tmp_path):
    from mstfx.tools import simulate as sim

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    config = sim.load_config(config_path=str(path))
    # 4 ranks, 2 KV heads: one KV head per rank, replicated
    bd = sim.simulate_peak(config, 16384, "mst+ckpt+offload", optimizer="zero-offload", gpus=8, sequence_parallel=4)
    assert bd.sequence_parallel == 4 and bd.host_node == pytest.approx(8 * bd.host)
    arch = cm.Arch(hidden=64, intermediate=224, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=2048)
    pred = planner.predict_peak(arch, 16384, mode="mst+checkpointing+offload", optimizer="none", mixed_precision="bf16",
                                program="eager", mini_sequences=dict(bd.chunks), gpus=8, sequence_parallel=4)
    assert pred.activations == pytest.approx(bd.activations, rel=0.15)
