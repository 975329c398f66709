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
