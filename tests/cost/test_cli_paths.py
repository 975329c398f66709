"""Output paths the command-line tools cannot write fail at once, before the (long) run, with exit
code 2 and a message naming the option; a write that fails after the run is an error message too, not
a traceback."""

from __future__ import annotations

import pytest

from mstfx.tools import simulate as sim
from mstfx.tools.simulate import cli as sim_cli

BASE = ["--model", "llama3-8b", "--gpu-gb", "80", "--no-progress"]


@pytest.fixture
def no_run(monkeypatch):
    """The search and the cost-model comparison must not start."""
    def refuse(*a, **k):
        raise AssertionError("the run started before the output paths were checked")

    monkeypatch.setattr(sim_cli, "run_cli", refuse)
    monkeypatch.setattr(sim_cli, "compare_with_cost_model", refuse)


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_simulate_refuses_an_output_in_a_missing_directory_before_the_run(tmp_path, capsys, no_run, option):
    path = tmp_path / "missing" / "out.file"
    assert sim.cli_main(BASE + [option, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {option} {path}" in err and "does not exist" in err and "Traceback" not in err


def test_simulate_refuses_a_directory_as_output_and_checks_the_comparison_json(tmp_path, capsys, no_run):
    assert sim.cli_main(BASE + ["--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    bad = str(tmp_path / "missing" / "rows.json")
    assert sim.cli_main(BASE + ["--compare-cost-model", "1024", "--json", bad]) == 2
    assert f"cannot write --json {bad}" in capsys.readouterr().err


def test_simulate_json_to_stdout_and_no_plot_need_no_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sim_cli, "run_cli", lambda args: _fake_out())
    assert sim.cli_main(BASE + ["--json", "-", "--plot", "none"]) == 0
    assert '"max_seq_len": 4096' in capsys.readouterr().out


def test_simulate_write_failing_after_the_run_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def run_then_lose_the_directory(args):
        out_dir.rmdir()  # gone while the run went on
        return _fake_out()

    monkeypatch.setattr(sim_cli, "run_cli", run_then_lose_the_directory)
    assert sim.cli_main(BASE + ["--json", str(out_dir / "r.json"), "--plot", "none"]) == 2
    assert "cannot write --json" in capsys.readouterr().err


def test_bench_sweep_refuses_unwritable_plot_and_data_before_measuring(tmp_path, capsys, monkeypatch):
    from mstfx.tools import bench_cli, sweep

    monkeypatch.setattr(sweep, "run", lambda *a, **k: pytest.fail("the sweep started"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    for option in ("--plot", "--data"):
        bad = str(a_file / "sub" / "x")  # under a file: no directory can be made there
        assert bench_cli.cli_main(["--sweep", "512", option, bad]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {option} {bad}" in err and "not a directory" in err


def _fake_out() -> dict:
    peak = dict(params=1.0, grads=1.0, optimizer_state=1.0, activations=1.0, total=4.0, host=0.0)
    return {
        "model": "m", "params_billion": 0.1, "gpu_gib": 80.0, "gpus": 1, "strategy": None, "batch": 1,
        "optimizer": "adamw", "program": "eager", "seconds": 0.1, "by_optimizer": {},
        "modes": {"mst": {"max_seq_len": 4096, "note": "", "peak_gib": peak, "chunks": {}, "runs": [[4096, 4.0]],
                          "host_runs": [], "vs_standard": None}},
    }
