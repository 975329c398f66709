"""What the tools write and print: file names and places, progress when redirected, quiet profiling, the sweep's
arguments and one tiny sweep point (seconds: no compilation)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import pytest

from mstfx.tools import simulate as sim
from mstfx.tools import sweep
from mstfx.tools.progress import Progress, quiet_profiler

ROOT = Path(__file__).resolve().parents[2]
TINY_SIM = dict(model_type="llama", hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1 << 20)


# ------------------------------------------------------------------------------------------ simulate
def _sim_out(**kw):
    out = {"model": "llama3-8b", "gpus": 1, "gpu_gib": 80.0, "optimizer": "paper", "program": "eager"}
    return {**out, **kw}


def test_simulate_plot_name_says_gpu_optimizer_and_program():
    assert sim.default_plot_name(_sim_out()) == "simulate-llama3-8b-80gib-paper.png"
    assert sim.default_plot_name(_sim_out(gpu_gib=24.0, optimizer="adamw")) == "simulate-llama3-8b-24gib-adamw.png"
    assert sim.default_plot_name(_sim_out(program="compiled")) == "simulate-llama3-8b-80gib-paper-compiled.png"
    assert sim.default_plot_name(_sim_out(gpus=8, optimizer="adamw-master")) == "simulate-llama3-8b-8x80gib-adamw-master.png"


def test_simulate_writes_no_plot_when_nothing_fits(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_SIM))
    monkeypatch.chdir(tmp_path)
    sim.cli_main(["--config", str(cfg), "--gpu-gb", "0.0001", "--no-progress", "--modes", "standard",
                  "--optimizer", "adamw-master"])
    assert "no plot: no mode fits" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------------------------------ trainer example
def _trainer_example():
    spec = importlib.util.spec_from_file_location("trainer_finetune", ROOT / "examples" / "trainer_finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trainer_example_leaves_the_committed_figure_alone_by_default(tmp_path, monkeypatch):
    mod = _trainer_example()
    written = []
    monkeypatch.setattr(mod, "trainer_losses", lambda *a, **k: [1.0, 0.5])
    monkeypatch.setattr(mod, "loop_losses", lambda *a, **k: [1.0, 0.5])
    monkeypatch.setattr(mod, "plot", lambda curves, path: written.append(Path(path).resolve()))
    monkeypatch.chdir(tmp_path)
    assert mod.main(["--steps", "2"]) == 0
    assert written == [tmp_path / "trainer_loss.png"]
    assert mod.main(["--steps", "2", "--out", str(tmp_path / "x" / "l.png")]) == 0
    assert written[-1] == tmp_path / "x" / "l.png"
    assert mod.main(["--steps", "2", "--update-docs"]) == 0
    assert written[-1] == ROOT / "docs" / "trainer_loss.png"


# ------------------------------------------------------------------------------------------ progress and noise
def test_progress_prints_flushed_lines_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(2, stream=stream) as bar:
        bar.step("compiling inductor")
        bar.step("timing round 1/1")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2") and lines[0].endswith("compiling inductor")
    quiet = io.StringIO()
    with Progress(1, enabled=False, stream=quiet) as bar:
        bar.step("x")
    assert quiet.getvalue() == ""


def test_quiet_profiler_drops_native_noise_and_keeps_the_rest(capfd):
    with quiet_profiler():
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"[W CPUAllocator.cpp:249] Memory block of unknown size was allocated before the profiling\n")
        os.write(2, b"a real error\n")
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "CPUAllocator" not in err
    assert "a real error" in err
    os.write(2, b"after\n")  # fd 2 is restored
    assert "after" in capfd.readouterr().err


def test_peak_bytes_prints_no_profiler_lines(capfd):
    import torch

    from mstfx.tools.measure import peak_bytes

    x = torch.randn(64, 64)
    peak, _ = peak_bytes(lambda: x @ x)
    assert peak >= 64 * 64 * 4
    err = capfd.readouterr().err
    assert "USDT" not in err and "CPUAllocator" not in err


# ------------------------------------------------------------------------------------------ sweep
def test_sweep_lengths_expand_and_reject_bad_input():
    assert sweep.parse_lengths("512,1024,...,16384") == [512, 1024, 2048, 4096, 8192, 16384]
    assert sweep.parse_lengths("4096, 512") == [512, 4096]
    for bad, says in [("", "give sequence lengths"), ("512,abc", "not a whole number"), ("1", "at least 2"),
                      ("...,512", "needs a length before"), ("512,...,1000", "power of two"), ("512,...", "after it")]:
        with pytest.raises(ValueError, match=says):
            sweep.parse_lengths(bad)
    with pytest.raises(ValueError, match="unknown"):
        sweep.parse_variants("eager,fast")
    assert sweep.parse_variants(None) == sweep.SWEEP_VARIANTS


@pytest.mark.parametrize("argv,says", [
    (["--sweep", "512,x"], "not a whole number"),
    (["--sweep", "512", "--variants", "inductor(model)"], "unknown"),
    (["--sweep", "512", "--budget-gib", "0"], "--budget-gib must be a positive"),
    (["--sweep", "512", "--mem-budget", "1.5"], "--mem-budget is a fraction"),
    (["--sweep", "512", "--plot-only"], "--plot-only needs --data"),
])
def test_sweep_cli_errors_name_the_flag(argv, says, capsys):
    from mstfx.tools import bench_cli as bench

    assert bench.cli_main(argv) == 2
    assert says in capsys.readouterr().err


def _tiny_llama_config(seq_len):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=max(seq_len, 64), use_cache=False,
                       attn_implementation="sdpa")


def test_sweep_tiny_point_table_plot_and_resume(tmp_path):
    """Eager at one tiny S, and a planned model whose budget is below the parameters: "infeasible", before any
    compile.  The JSON is reused: a second run measures nothing; a point without its step time is measured again."""
    data, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    budget = 1e-6  # GiB: a kibibyte, less than the tiny model's parameters
    pts = sweep.run(_tiny_llama_config, [16], ["eager", "mst(planned)"], 1, budget_gib=budget, data_path=str(data),
                    progress=False)
    eager, planned = pts
    assert eager.step_mib > 0 and eager.step_s > 0 and eager.loss > 0
    assert planned.step_mib is None and planned.note.startswith("infeasible")
    table = sweep.markdown(pts, budget)
    assert "| eager | " in table and "infeasible" in table and "✗" in table
    sweep.plot(pts, budget, str(png), "tiny")
    assert png.stat().st_size > 1000
    again = sweep.run(lambda s: pytest.fail("measured again"), [16], ["eager", "mst(planned)"], 1, budget_gib=budget,
                      data_path=str(data), progress=False)
    assert again == pts
    stopped = json.loads(data.read_text())  # a run stopped after eager's peak, before its timing
    stopped["points"][0]["step_s"] = None
    data.write_text(json.dumps(stopped))
    resumed = sweep.run(_tiny_llama_config, [16], ["eager", "mst(planned)"], 1, budget_gib=budget, data_path=str(data),
                        progress=False)
    assert resumed[0].step_s is not None and resumed[1] == planned
    with pytest.raises(ValueError, match="measured with"):
        sweep.run(_tiny_llama_config, [16], ["eager"], 1, budget_gib=2.0, data_path=str(data), progress=False)


def test_planned_model_plans_no_chunking_where_the_budget_does_not_need_it():
    """The reference config at S = 512 under a generous budget: transform plans a plain step (no chunked
    region, no checkpointing), so the planned model pays nothing for chunking there."""
    import torch
    from transformers import LlamaForCausalLM

    import mstfx
    from mstfx.planning import planner
    from mstfx.tools.bench import reference_config

    with torch.device("meta"):
        model = LlamaForCausalLM(reference_config(512))
    mstfx.transform(model, budget_gb=4 * 2**30 / planner.GB, seq_len=512, optimizer="none")
    plan = model._mstfx_transform.plan
    cfg = plan.config()
    assert plan.mode == "standard" and not plan.checkpointing
    assert not cfg.chunk_mlp and not cfg.chunk_lm_head
