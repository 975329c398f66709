"""The command line: dispatch, help, bad input; `mstfx bench` end to end on a short sequence."""

from __future__ import annotations

import json

import pytest

from mstfx import cli
from mstfx.tools import bench


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("bench", "plan", "simulate"):
        assert name in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bench_rejects_bad_input(capsys):
    assert cli.main(["bench", "--variants", "eager,tvm"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert cli.main(["bench", "--seq-len", "0"]) == 2


def test_bench_json_short_sequence(capsys, monkeypatch):
    """Two variants at S=64 on a 1-layer model: same loss, mst peak below eager's."""
    monkeypatch.setattr(
        bench,
        "reference_config",
        lambda seq_len=64: __import__("transformers").LlamaConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=4096, use_cache=False, attn_implementation="sdpa",
        ),
    )
    assert cli.main(["bench", "--seq-len", "512", "--repeats", "1", "--variants", "inductor(model),mst", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["mst"]["loss"] == pytest.approx(rows["inductor(model)"]["loss"], rel=1e-5)
    assert rows["mst"]["peak_mib"] < rows["inductor(model)"]["peak_mib"]
    assert "lm_head+loss" in rows["mst"]["report"]


# --- plan and simulate: the same config reader, the same errors and exit codes --------------------------


BAD_CONFIGS = [
    ("array.json", "[1, 2, 3]", "not an object"),
    ("zero.json", '{"model_type": "llama", "hidden_size": 0, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}', "'hidden_size' must be a positive integer"),
    ("negative.json", '{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": -2, "num_attention_heads": 4, "vocab_size": 100}', "'num_hidden_layers' must be a positive integer"),
    ("abc.json", '{"model_type": "llama", "hidden_size": "abc", "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}', "'hidden_size' must be a positive integer, got 'abc'"),
    ("broken.json", '{"hidden_size": 64,', "not valid JSON"),
    ("empty.json", "", "is empty"),
]


@pytest.mark.parametrize("command", ["plan", "simulate"])
@pytest.mark.parametrize("name,text,message", BAD_CONFIGS)
def test_bad_config_is_exit_2_naming_file_and_field(command, name, text, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    extra = ["--seq-len", "1024", "--budget-gb", "10"] if command == "plan" else ["--gpu-gb", "10", "--plot", "none"]
    assert cli.main([command, "--config", str(path), *extra]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err and message in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_dev_null_and_unknown_names_get_a_hint(command, capsys):
    extra = ["--seq-len", "1024", "--budget-gb", "10"] if command == "plan" else ["--gpu-gb", "10", "--plot", "none"]
    assert cli.main([command, "--config", "/dev/null", *extra]) == 2
    assert "/dev/null is empty" in capsys.readouterr().err
    assert cli.main([command, "--model", "llama-9000", *extra]) == 2
    err = capsys.readouterr().err
    assert "llama-9000" in err and "llama3-8b" in err and "reference" in err  # the names it knows


def test_plan_and_simulate_accept_the_same_names_and_aliases(capsys):
    from mstfx.model_configs import source
    from mstfx.tools import simulate

    for name in source.names():
        cfg = simulate.load_config(config_path=name)  # simulate --config NAME (was: paths only)
        assert cfg.hidden_size >= 1
    assert cli.main(["plan", "--model", "llama2-7b", "--seq-len", "4096", "--budget-gb", "80", "--optimizer", "adamw-bf16"]) == 0
    assert "GiB" in capsys.readouterr().out


def _options(parser):
    return {opt: action for action in parser._actions for opt in action.option_strings}


def test_plan_and_simulate_flags_are_consistent():
    from mstfx.planning import cli as plan_cli
    from mstfx.tools import simulate
    from mstfx.tools.simulate import cli as sim_cli

    plan_opts, sim_opts = _options(plan_cli.parser()), _options(sim_cli.parser())
    shared = {"--config", "--model", "--batch", "--optimizer"}
    assert shared <= set(plan_opts) and shared <= set(sim_opts)
    assert plan_opts["--model"] is plan_opts["--config"]  # an alias
    for opts in (plan_opts, sim_opts):
        for flag, action in opts.items():
            assert flag in ("-h", "--help") or (action.help and action.help.strip()), f"{flag} has no help text"
    # every simulate optimizer setup is known to plan (planned, or refused with the reason)
    assert set(simulate.OPTIMIZERS) <= set(plan_opts["--optimizer"].choices)
    # one unit: GiB in every memory flag's help
    assert "GiB" in plan_opts["--budget-gb"].help and "GiB" in sim_opts["--gpu-gb"].help
    # exit codes documented in both helps
    for parser in (plan_cli.parser(), sim_cli.parser()):
        assert "2 bad input" in parser.format_help() and "1 " in parser.epilog


def test_plan_bad_flags_are_exit_2_on_stderr(capsys):
    for flag, value in (("--seq-len", "0"), ("--seq-len", "abc"), ("--budget-gb", "-1"), ("--batch", "0"),
                        ("--max-chunks", "0"), ("--mixed-precision", "int8"), ("--margin", "1.5")):
        opts = {"--seq-len": "1024", "--budget-gb": "10", flag: value}
        argv = ["plan", "--config", "reference"] + [x for kv in opts.items() for x in kv]
        assert cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert "error" in captured.err and flag.lstrip("-").split("-")[0] in captured.err, (argv, captured.err)


def test_top_level_help_does_not_import_torch(tmp_path):
    import os
    import subprocess
    import sys

    import mstfx

    root = os.path.dirname(os.path.dirname(mstfx.__file__))  # the mstfx this test imports, not another
    code = "import sys; from mstfx import cli; cli.main(['--help']); print(sorted({'torch', 'sympy', 'transformers'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=env).stdout
    assert out.strip().endswith("[]"), out


def test_compile_time_table_and_flag_validation(capsys):
    from mstfx.tools import bench_cli as bench
    from mstfx.tools.compile_time import CompileTimeRow, markdown, summarise

    rows = [
        CompileTimeRow("inductor", 8, 512, 100.0, 7.6, {"compile_file": 50.0}),
        CompileTimeRow("mst", 8, 512, 120.0, 7.6, {"compile_file": 60.0}),
        CompileTimeRow("mst", 8, 512, 140.0, 7.6, {"compile_file": 70.0}),
        CompileTimeRow("mst", 8, 512, 130.0, 7.6, {"compile_file": 65.0}),
    ]
    summary = {(s["variant"], s["M"]): s for s in summarise(rows)}
    assert summary[("mst", 8)]["first_step_s"] == 130.0 and summary[("mst", 8)]["runs"] == [120.0, 130.0, 140.0]
    table = markdown(rows)
    assert "| mst | 8 | 512 | 130.0 (120, 130, 140) | 1.30 |" in table
    per_block = markdown(rows + [CompileTimeRow("mst-per-block", 8, 512, 65.0, 7.6, {}, "", 8, 17)])
    assert "mst-per-block / mst (whole model), 8 layers, M = 8: 0.50" in per_block
    assert next(line for line in per_block.splitlines() if line.startswith("| mst-per-block")).endswith("| 17 |")
    assert bench.cli_main(["--compile-time", "--compile-ms", "0"]) == 2
    assert bench.cli_main(["--compile-time", "--variants", "nope"]) == 2
    assert "--compile-ms" in capsys.readouterr().err
