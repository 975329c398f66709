"""The offload mode in ``mstfx simulate`` (tiny configs): the GPU loses exactly the checkpoints, the host
gains them, in both programs; the table, JSON and plot carry host memory."""

from __future__ import annotations

import json

import pytest

from mstfx.tools import simulate as sim
from mstfx.tools.simulate.measure import cached_fake_model

# hidden 256: the backend's M (tokens / hidden) stays small, so each run takes seconds; 3 layers: the
# compiled program is captured whole (no extrapolation from 2 and 3 layers)
TINY = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1 << 20)
OFF = "mst+ckpt+offload"


@pytest.fixture(scope="module")
def tiny_cfg_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tiny_cfg(tiny_cfg_path):
    return sim.load_config(config_path=str(tiny_cfg_path))


def test_eager_offload_moves_every_checkpoint_to_the_host(tiny_cfg):
    s = 8192
    ck = sim.simulate_all(tiny_cfg, s, "mst+ckpt")
    off = sim.simulate_all(tiny_cfg, s, OFF)
    checkpoints = TINY["num_hidden_layers"] * s * TINY["hidden_size"] * 2  # bf16, batch 1
    assert off["paper"].host == checkpoints
    assert off["offload"].host == checkpoints + 12 * cached_fake_model(tiny_cfg).n_params
    assert ck["paper"].host == 0
    # at most the checkpoint in use stays on the GPU: the others are gone from the peak
    saved = ck["paper"].activations - off["paper"].activations
    one = checkpoints / TINY["num_hidden_layers"]
    assert (TINY["num_hidden_layers"] - 2) * one <= saved <= checkpoints
    # MLP chunks by the backend's rule; the LM head in chunks of at most `hidden` tokens past S = vocab
    assert off["paper"].chunks == {"mlp": ck["paper"].chunks["mlp"], "lm_head": s // TINY["hidden_size"]}
    assert ck["paper"].chunks["lm_head"] == TINY["vocab_size"] // TINY["hidden_size"]


def test_fsdp_shards_state_not_the_host_checkpoints(tiny_cfg):
    one = sim.simulate_peak(tiny_cfg, 2048, OFF, optimizer="paper", gpus=1)
    eight = sim.simulate_peak(tiny_cfg, 2048, OFF, optimizer="paper", gpus=8)
    assert eight.host == one.host == TINY["num_hidden_layers"] * 2048 * TINY["hidden_size"] * 2
    assert eight.optimizer_state == pytest.approx(one.optimizer_state / 8)


def test_zero_offload_setup_frees_gradients_and_keeps_state_on_the_host(tiny_cfg):
    bd = sim.simulate_all(tiny_cfg, 1024, OFF)
    fm = cached_fake_model(tiny_cfg)
    assert bd["zero-offload"].optimizer_state == 0
    assert bd["zero-offload"].grads == fm.largest_param_bytes
    assert bd["zero-offload"].host - bd["paper"].host == 16 * fm.n_params


def test_compiled_program_offload_counts_host_apart(tiny_cfg):
    s = 2048
    ck = sim.simulate_peak(tiny_cfg, s, "mst+ckpt", optimizer="offload", program="compiled")
    off = sim.simulate_peak(tiny_cfg, s, OFF, optimizer="offload", program="compiled")
    checkpoints = TINY["num_hidden_layers"] * s * TINY["hidden_size"] * 2
    assert off.host - 12 * cached_fake_model(tiny_cfg).n_params == checkpoints
    assert off.total <= ck.total


def test_cli_table_json_and_plot_show_host_memory(tiny_cfg_path, tmp_path, capsys):
    png = tmp_path / "p.png"
    rc = sim.cli_main(["--config", str(tiny_cfg_path), "--gpu-gb", "0.07", "--json", str(tmp_path / "o.json"),
                       "--plot", str(png), "--no-progress", "--modes", OFF, "--optimizer", "paper",
                       "--start", "2048", "--quantum", "2048"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "host GiB" in table and "offload" in table
    off = json.loads((tmp_path / "o.json").read_text())["modes"][OFF]
    assert off["max_seq_len"] > 0
    s = off["max_seq_len"]
    assert off["peak_gib"]["host"] == pytest.approx(TINY["num_hidden_layers"] * s * TINY["hidden_size"] * 2 / sim.GiB, abs=1e-3)
    assert len(off["host_runs"]) == len(off["runs"]) and all(h > 0 for _, h in off["host_runs"])
    assert png.stat().st_size > 1000
