"""The offload mode in the cost model and the planner: chosen only when nothing cheaper fits, host
memory and PCIe time counted, a host budget that is too small refused with the numbers."""

from __future__ import annotations

import pytest

import mstfx
from mstfx.planning import cost_model as cm
from mstfx.planning import offload_cost as offload
from mstfx.planning.planner import GiB, InfeasibleHostBudgetError, arch_of, longest_seq_len, plan, predict_peak

MODEL, GPU_GB, OPT = "llama3-8b", 80, "offload"  # optimizer state on the host, bf16 weights and gradients


@pytest.fixture(scope="module")
def reach():
    """Longest S of MsT + checkpointing, and of the offload mode, on 80 GiB (the cost model's own)."""
    return {m: longest_seq_len(MODEL, GPU_GB, mode=m, optimizer=OPT, margin=0.0)
            for m in ("mst+checkpointing", offload.OFFLOAD_MODE)}


def test_offload_keeps_only_the_checkpoints_in_use_on_the_gpu():
    arch, s = arch_of(MODEL), 65536
    ck = predict_peak(arch, s, mode="mst+checkpointing", optimizer=OPT, mini_sequences={"lm_head": 32, "mlp": 16})
    off = predict_peak(arch, s, mode=offload.OFFLOAD_MODE, optimizer=OPT, mini_sequences={"lm_head": 32, "mlp": 16})
    one_checkpoint = s * arch.hidden * 2
    removed = (arch.layers - offload.RESIDENT_CHECKPOINTS["compiled"]) * one_checkpoint
    for phase in ("forward end", "top layer backward (attention)", "top layer backward (mlp)"):
        assert ck.phases[phase] - off.phases[phase] == pytest.approx(removed), phase
    # the bottom layer's backward holds only its own checkpoint either way
    assert off.phases["bottom layer backward (mlp)"] == pytest.approx(ck.phases["bottom layer backward (mlp)"])
    assert off.peak < ck.peak


def test_planner_picks_offload_only_when_nothing_cheaper_fits(reach):
    short, long_ = reach["mst+checkpointing"], reach[offload.OFFLOAD_MODE]
    assert long_ > 2 * short
    within = plan(MODEL, int(short * 0.9), GPU_GB, optimizer=OPT, margin=0.0)
    assert within.mode == "mst+checkpointing" and not within.offload
    assert within.pinned_bytes == 0 and within.transfer_seconds == 0
    beyond = plan(MODEL, int(short * 1.2), GPU_GB, optimizer=OPT, margin=0.0)
    assert beyond.mode == offload.OFFLOAD_MODE and beyond.checkpointing and beyond.offload
    assert beyond.config().offload_checkpoints and not within.config().offload_checkpoints
    with pytest.raises(mstfx.InfeasibleBudgetError):
        plan(MODEL, int(short * 1.2), GPU_GB, optimizer=OPT, margin=0.0, allow_offload=False)
    with pytest.raises(mstfx.InfeasibleBudgetError):
        plan(MODEL, int(long_ * 1.1), GPU_GB, optimizer=OPT, margin=0.0)


def test_plan_counts_host_bytes_and_transfer_time(reach):
    s = int(reach["mst+checkpointing"] * 1.2)
    p = plan(MODEL, s, GPU_GB, optimizer=OPT, margin=0.0, pcie_gbps=20)
    arch = arch_of(MODEL)
    checkpoints = arch.layers * s * arch.hidden * 2  # bf16, batch 1
    assert p.pinned_bytes == pytest.approx(checkpoints)
    assert p.host_bytes == pytest.approx(checkpoints + 12 * arch.n_params)  # + fp32 moments and master weights
    assert p.transfer_seconds == pytest.approx(2 * checkpoints / 20e9)
    text = str(p)
    assert "host memory" in text and "PCIe" in text


def test_host_budget_too_small_is_refused_with_the_numbers(reach):
    s = int(reach["mst+checkpointing"] * 1.2)
    fits = plan(MODEL, s, GPU_GB, optimizer=OPT, margin=0.0)
    small = (fits.host_bytes / GiB) * 0.9
    with pytest.raises(InfeasibleHostBudgetError) as err:
        plan(MODEL, s, GPU_GB, optimizer=OPT, margin=0.0, host_budget_gb=small)
    e = err.value
    assert isinstance(e, mstfx.InfeasibleBudgetError)
    assert e.host_needed_bytes == pytest.approx(fits.host_bytes)
    assert e.host_budget_bytes == pytest.approx(small * GiB)
    assert e.pinned_bytes == pytest.approx(fits.pinned_bytes)
    assert f"{fits.host_bytes / GiB:.3g} GiB of host memory" in str(e) and "--host-gb" in str(e)
    # enough host memory: the same plan
    assert plan(MODEL, s, GPU_GB, optimizer=OPT, margin=0.0, host_budget_gb=fits.host_bytes / GiB * 1.01).mode == fits.mode


def test_plan_cli_host_budget_exit_codes(reach, capsys):
    from mstfx.planning.cli import EXIT_DOES_NOT_FIT, EXIT_OK, cli_main

    s = str(int(reach["mst+checkpointing"] * 1.2))
    base = ["--model", MODEL, "--seq-len", s, "--budget-gb", str(GPU_GB), "--optimizer", OPT, "--margin", "0"]
    assert cli_main(base + ["--pcie-gbps", "32"]) == EXIT_OK
    arch = arch_of(MODEL)
    seconds = 2 * arch.layers * int(s) * arch.hidden * 2 / 32e9
    out = capsys.readouterr().out
    assert "PCIe" in out and f"{seconds:.3g}" in out
    assert cli_main(base + ["--host-gb", "8"]) == EXIT_DOES_NOT_FIT
    assert "host budget 8 GiB" in capsys.readouterr().err


def test_bad_bandwidth_is_refused():
    with pytest.raises(ValueError, match="pcie_gbps"):
        plan(MODEL, 4096, GPU_GB, optimizer=OPT, pcie_gbps=0)


def test_offload_mode_flags():
    from mstfx.vocabulary import Mode

    mode = Mode.parse(offload.OFFLOAD_MODE)
    assert mode.chunked and mode.checkpointed and mode.offloaded
    assert offload.checkpoints_on_gpu(32, "mst+checkpointing") == 32
    assert offload.checkpoints_on_gpu(32, offload.OFFLOAD_MODE) == 2  # compiled: one recomputed, one prefetched
    assert offload.checkpoints_on_gpu(32, offload.OFFLOAD_MODE, "eager") == 1
