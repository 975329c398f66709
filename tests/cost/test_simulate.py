"""`mstfx simulate`: FakeTensor simulation of the four modes, the S search, the CLI and its errors (tiny configs)."""

from __future__ import annotations

import json

import pytest

from mstfx.tools import simulate as sim
from mstfx.tools.simulate.measure import cached_fake_model

TINY = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=1 << 20,
)


@pytest.fixture(scope="module")
def tiny_cfg_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tiny_cfg(tiny_cfg_path):
    return sim.load_config(config_path=str(tiny_cfg_path))


def test_modes_order_and_mst_rewrite_applied(tiny_cfg):
    peaks = {m: sim.simulate_peak(tiny_cfg, 2048, m, optimizer="adamw") for m in sim.MODES}
    # the mst backend's rule chose M from the real region sizes: MLP ⌈2048/64⌉, LM head min(⌈2048/64⌉, 2048/256)
    assert peaks["mst"].chunks == {"mlp": 32, "lm_head": 8}
    acts = {m: b.activations for m, b in peaks.items()}
    assert acts["mst"] < acts["standard"]
    assert acts["ckpt"] < acts["standard"]
    assert acts["mst+ckpt"] < acts["ckpt"]
    # the state that does not depend on S is the same in every mode
    assert len({b.params for b in peaks.values()}) == 1
    assert len({b.optimizer_state for b in peaks.values()}) == 1
    n = sum(p.numel() for p in cached_fake_model(tiny_cfg).model.parameters())
    assert peaks["standard"].params == pytest.approx(2 * n, rel=1e-6)  # bf16 weights
    assert peaks["standard"].optimizer_state == pytest.approx(8 * n)  # fp32 AdamW states


def test_peak_grows_with_seq_len_and_optimizer_setups(tiny_cfg):
    short = sim.simulate_all(tiny_cfg, 512, "standard")
    long = sim.simulate_all(tiny_cfg, 2048, "standard")
    assert long["adamw"].total > short["adamw"].total
    n = cached_fake_model(tiny_cfg).n_params
    assert long["adamw-master"].optimizer_state - long["adamw"].optimizer_state == pytest.approx(4 * n)
    assert long["offload"].optimizer_state == 0
    # grads freed as made: only the largest single gradient is counted, the rest is the same
    fm = cached_fake_model(tiny_cfg)
    assert long["paper"].grads == fm.largest_param_bytes
    assert long["paper"].total <= long["adamw-bf16"].total + fm.largest_param_bytes


def test_fsdp_shards_state_not_activations(tiny_cfg):
    one = sim.simulate_peak(tiny_cfg, 1024, "ckpt", gpus=1)
    eight = sim.simulate_peak(tiny_cfg, 1024, "ckpt", gpus=8)
    assert eight.optimizer_state == pytest.approx(one.optimizer_state / 8)
    assert eight.params < one.params
    assert eight.activations == pytest.approx(one.activations, rel=0.05)


def test_no_phantom_attention_matrix(tiny_cfg):
    """FlashAttention-like attention and no packed-sequence mask: activations grow linearly, not as S²."""
    one = sim.simulate_peak(tiny_cfg, 8192, "ckpt", optimizer="offload").activations
    two = sim.simulate_peak(tiny_cfg, 16384, "ckpt", optimizer="offload").activations
    assert two < 2.2 * one  # an S×S mask would make this ≈ 4×


@pytest.mark.parametrize(
    "budget,expect",
    [(10_000 + 3 * 5000, 5000), (10_000 + 3 * 123_457, 123_456), (9_000, 0), (10_000 + 3 * 300, 256)],
)
def test_longest_seq_len_piecewise_linear(budget, expect):
    def peak_convex(s):  # a plateau, then two lines of growing slope
        return 10_000 + 3 * s if s < 50_000 else 10_000 + 3 * 50_000 + 5 * (s - 50_000)

    got, runs = sim.search_longest(peak_convex, budget, start=4096, quantum=128)
    if expect == 0:
        assert got == 0
        return
    truth = max(s for s in range(128, 400_000, 128) if peak_convex(s) <= budget)
    assert got <= truth and got >= truth - max(128, 0.005 * truth)
    assert dict(runs)[got] <= budget  # the answer was run and fits
    assert len(runs) <= 12


def test_cli_json_and_plot(tiny_cfg_path, tmp_path, capsys):
    png = tmp_path / "p.png"
    rc = sim.cli_main(
        ["--config", str(tiny_cfg_path), "--gpu-gb", "0.05", "--json", "-", "--plot", str(png), "--no-progress",
         "--modes", "standard,ckpt", "--start", "1024"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["modes"]) == {"standard", "ckpt"}
    std, ck = out["modes"]["standard"]["max_seq_len"], out["modes"]["ckpt"]["max_seq_len"]
    assert 0 < std < ck
    assert out["modes"]["ckpt"]["peak_gib"]["total"] <= 0.05
    assert set(out["by_optimizer"]["standard"]) == set(sim.OPTIMIZERS)
    assert png.stat().st_size > 1000


def test_nothing_fits_is_said(tiny_cfg):
    r, _ = sim.find_max_seq_len(tiny_cfg, 0.001, "standard", optimizer="adamw-master")
    assert r.max_seq_len == 0 and "nothing fits" in r.note


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama9-1t", "--gpu-gb", "80"], "unknown model"),
        (["--config", "nonexistent-dir/config.json", "--gpu-gb", "80"], "cannot read config"),
        (["--model", "llama3-8b", "--gpu-gb", "0"], "--gpu-gb must be a positive"),
        (["--model", "llama3-8b", "--gpu-gb", "-24"], "--gpu-gb must be a positive"),
        (["--model", "llama3-8b", "--gpu-gb", "80", "--optimizer", "sgd"], "unknown --optimizer"),
    ],
)
def test_bad_input_exit_2(argv, message, capsys):
    assert sim.cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_json_config(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert sim.cli_main(["--config", str(bad), "--gpu-gb", "24"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    nomodel = tmp_path / "nomodel.json"
    nomodel.write_text('{"hidden_size": 8}')
    assert sim.cli_main(["--config", str(nomodel), "--gpu-gb", "24"]) == 2
    assert "model_type" in capsys.readouterr().err


def test_cli_dispatch_bad_input():
    from mstfx.cli import main

    assert main(["simulate", "--model", "nope", "--gpu-gb", "80"]) == 2


@pytest.mark.parametrize("name", sim.EMBEDDED_MODELS)
def test_embedded_configs_load(name):
    cfg = sim.load_config(name)
    assert cfg.num_hidden_layers >= 28 and cfg.hidden_size >= 3584


#: scaled-down configs of three structures (GQA Llama, MHA with q/k/v bias, Gemma 2's four fp32 norms,
#: soft-capped and tied logits): a few layers, but activations dominate the peak as at 8B and long S
COST_MODEL_CONFIGS = {
    "llama-gqa": dict(TINY, hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=16000),
    "qwen2-mha": dict(model_type="qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=20000, max_position_embeddings=1 << 20),
    "gemma2": dict(model_type="gemma2", hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=24000,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=128,
                   sliding_window=4096, max_position_embeddings=1 << 20),
}


def test_weights_are_bf16_whatever_the_config_dtype(tmp_path):
    # Gemma 2's published config says float32; transformers builds in config.dtype when it is set
    path = tmp_path / "fp32.json"
    path.write_text(json.dumps(dict(TINY, torch_dtype="float32")))
    cfg = sim.load_config(config_path=str(path))
    fm = cached_fake_model(cfg)
    assert fm.param_bytes == 2 * fm.n_params


@pytest.mark.parametrize("name", sorted(COST_MODEL_CONFIGS))
def test_cost_model_agrees_with_simulation_on_scaled_configs(name, tmp_path):
    """The cost model's eager program (``program="eager"``) against the FakeTensor simulation, every mode."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(COST_MODEL_CONFIGS[name]))
    cfg = sim.load_config(config_path=str(path))
    rows = sim.compare_with_cost_model(cfg, [2048, 8192])
    weights_and_grads = 2 * cached_fake_model(cfg).param_bytes
    for r in rows:  # activations dominate the unchunked step: the check is not carried by the weights
        if r["mode"] == "standard":
            assert r["simulated_gib"] * sim.GiB > 3 * weights_and_grads, r
    bad = [r for r in rows if abs(r["rel"]) > 0.10]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama3-8b", "llama2-7b"])
def test_cost_model_agrees_within_10_percent(model):
    """Simulated peaks agree with ``mstfx.planning.planner.predict_peak`` within 10% at three lengths."""
    cfg = sim.load_config(model)
    rows = sim.compare_with_cost_model(cfg, [4096, 16384, 32768])
    bad = [r for r in rows if abs(r["rel"]) > 0.10]
    assert not bad, bad


def test_longest_seq_len_through_a_flat_stretch():
    """The compiled step peaks at the end of its backward at short S (nothing there grows with S): a
    flat start must not end the search."""
    def peak(s):
        return max(60_000.0, 50_000 + 0.1 * s)

    got, runs = sim.search_longest(peak, 80_000, start=4096, quantum=128)
    truth = max(s for s in range(128, 400_000, 128) if peak(s) <= 80_000)
    assert truth - max(128, 0.005 * truth) <= got <= truth
    assert len(runs) <= 12
