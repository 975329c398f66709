"""The GPU check's plumbing on CPU: rows, ratios, OOM rows, and the skip without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mstfx.tools import gpu_check

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)


def test_measure_rows_and_ratios_with_injected_peak():
    ran = []

    def peak(step, device):
        assert device == "cpu"
        s = len(ran)
        step()  # the real compiled step runs (a crash here is a plumbing bug)
        ran.append(s)
        if len(ran) == 6:  # the last row: S = 64, mst+ckpt
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return 1000 * len(ran)

    def predict(config, seq_len, mode, batch):
        assert config == TINY and batch == 1 and mode in gpu_check.MODES
        return 500 * seq_len // 32

    rows = gpu_check.measure(TINY, (32, 64), device="cpu", dtype=torch.float32, compiler="aot_eager",
                             peak_fn=peak, predict_fn=predict, progress=False)
    assert [(r.seq_len, r.mode, r.status) for r in rows] == [
        (32, "inductor", "ok"), (32, "mst", "ok"), (32, "mst+ckpt", "ok"),
        (64, "inductor", "ok"), (64, "mst", "ok"), (64, "mst+ckpt", "OOM")]
    assert [r.measured for r in rows] == [1000, 2000, 3000, 4000, 5000, None]
    assert [r.predicted for r in rows] == [500, 500, 500, 1000, 1000, 1000]
    assert [r.measured_over_predicted for r in rows] == [2.0, 4.0, 6.0, 4.0, 5.0, None]
    assert [r.over_inductor for r in rows] == [1.0, 2.0, 3.0, 1.0, 1.25, None]
    rendered = gpu_check.table(rows)
    assert rendered.row_count == 6
    assert list(rendered.columns[2].cells)[-1] == "OOM"


def test_a_crash_that_is_not_oom_is_not_hidden():
    def peak(step, device):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        gpu_check.measure_one(TINY, 32, "inductor", device="cpu", dtype=torch.float32, compiler="eager", peak_fn=peak)


def test_without_cuda_it_says_skipped_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device: skipped" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs the whole check")
def test_the_command_exits_0_without_cuda():
    root = str(Path(__file__).resolve().parents[1])  # this checkout's mstfx, not another installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mstfx.tools.gpu_check"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device: skipped" in done.stdout
