"""``mstfx simulate --json``'s ``by_optimizer``: the longest S of every optimizer setup from the runs of
the search, reported honestly where no run fits the setup (no simulation runs here: the model and the
search are stand-ins with a known, linear peak)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mstfx.tools import simulate as sim
from mstfx.tools.simulate import cli as sim_cli
from mstfx.tools.simulate import search as sim_search

GiB = sim.GiB
N_PARAMS, PARAM_BYTES, LARGEST = 4e9, 8e9, 1e9  # a 4B bf16 model
ACT_PER_TOKEN = 25 * GiB / 4096  # activations grow linearly: the peak is exactly fixed + k·S


def _fixed(opt: str) -> float:
    bpp, kept, _ = sim.OPTIMIZERS[opt]
    return PARAM_BYTES + (PARAM_BYTES if kept else LARGEST) + bpp * N_PARAMS


def _breakdowns(s: int) -> dict:
    out = {}
    for opt, (bpp, kept, _) in sim.OPTIMIZERS.items():
        out[opt] = sim.SimulatedBreakdown(seq_len=s, mode="mst", optimizer=opt, batch=1, gpus=1, params=PARAM_BYTES,
                                 grads=PARAM_BYTES if kept else LARGEST, optimizer_state=bpp * N_PARAMS,
                                 activations=ACT_PER_TOKEN * s)
    return out


def _true_max(opt: str, budget_gib: float, quantum: int = 128) -> int:
    return int((budget_gib * GiB - _fixed(opt)) / ACT_PER_TOKEN) // quantum * quantum


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(sim_cli, "load_config", lambda model, path: SimpleNamespace(_mstfx_name="m"))
    fake = lambda config: SimpleNamespace(  # noqa: E731
        n_params=N_PARAMS, param_bytes=PARAM_BYTES, largest_param_bytes=LARGEST, largest_module_bytes=LARGEST)
    for module in (sim_cli, sim_search):  # the command and the search each build the model
        monkeypatch.setattr(module, "cached_fake_model", fake)


def _run(argv):
    return sim.run_cli(sim_cli.parser().parse_args(["--model", "m", "--no-progress", "--modes", "mst"] + argv))


def test_a_setup_that_fits_only_below_the_shortest_run_is_not_reported_as_zero(stand_ins, monkeypatch):
    """``offload`` (the one searched) fits from S = 4096 up; ``adamw-master`` fits at no run (all
    ≥ 4096) but does fit below: its longest S is bounded from the runs, not 0."""
    runs = {s: _breakdowns(s) for s in (4096, 10240, 16384)}

    def search(config, gpu_gb, mode, optimizer, *a, **k):
        best = max(s for s, bd in runs.items() if bd[optimizer].total <= gpu_gb * GiB)
        return sim.ModeResult(mode, best, runs[best][optimizer], sorted((s, bd[optimizer].total) for s, bd in runs.items()),
                              True), dict(runs)

    monkeypatch.setattr(sim_cli, "find_max_seq_len", search)
    out = _run(["--gpu-gb", "80", "--optimizer", "offload"])
    got = out["by_optimizer"]["mst"]
    assert runs[4096]["adamw-master"].total > 80 * GiB  # no run fits it
    assert got["adamw-master"] == _true_max("adamw-master", 80) > 0  # the bound is exact for a linear peak
    how = out["by_optimizer_how"]["mst"]
    assert "below the shortest run" in how["adamw-master"]
    assert got["offload"] == 10240 and how["offload"] == "searched"
    assert how["paper"] == "interpolated" and 0 < got["paper"] <= _true_max("paper", 80) + 128


def test_setups_when_the_searched_one_cannot_even_hold_its_weights(stand_ins):
    """No run is made (weights + adamw-master state exceed 50 GiB): a setup whose fixed bytes exceed the
    budget is 0 (known exactly); one whose fixed bytes fit is not known (None), not 0."""
    out = _run(["--gpu-gb", "50", "--optimizer", "adamw-master"])
    got = out["by_optimizer"]["mst"]
    assert out["modes"]["mst"]["runs"] == []
    assert _fixed("adamw-master") > 50 * GiB and got["adamw-master"] == 0
    assert _fixed("offload") < 50 * GiB and got["offload"] is None
    assert "not run" in out["by_optimizer_how"]["mst"]["offload"]


def test_the_compiled_programs_bound_counts_the_gradients_its_backward_keeps(stand_ins, monkeypatch):
    """The whole-model compiled program keeps every gradient whatever the setup (one backward graph
    returns them together): a setup that frees gradients as made (``paper``) holds them all there, so
    the bound below the shortest run must start from all gradients, or it lies above the true longest S.
    Per block, the setup's own rule holds (one module's gradients)."""
    def compiled_breakdowns(s: int) -> dict:
        out = {}
        for opt, (bpp, kept, _) in sim.OPTIMIZERS.items():  # every gradient alive, as the compiled program
            out[opt] = sim.SimulatedBreakdown(seq_len=s, mode="mst", optimizer=opt, batch=1, gpus=1, params=PARAM_BYTES,
                                              grads=PARAM_BYTES, optimizer_state=bpp * N_PARAMS,
                                              activations=ACT_PER_TOKEN * s)
        return out

    runs = {s: compiled_breakdowns(s) for s in (40960, 49152)}

    def search(config, gpu_gb, mode, optimizer, *a, **k):
        return sim.ModeResult(mode, 49152, runs[49152][optimizer], sorted((s, bd[optimizer].total) for s, bd in runs.items()),
                              True), dict(runs)

    monkeypatch.setattr(sim_cli, "find_max_seq_len", search)
    out = _run(["--gpu-gb", "80", "--optimizer", "offload", "--program", "compiled"])
    truth = int((80 * GiB - 2 * PARAM_BYTES - sim.OPTIMIZERS["paper"][0] * N_PARAMS) / ACT_PER_TOKEN)
    assert runs[40960]["paper"].total > 80 * GiB  # no run fits the paper setup: it is bounded from below
    assert 0 < out["by_optimizer"]["mst"]["paper"] <= truth
    fm = SimpleNamespace(n_params=N_PARAMS, param_bytes=PARAM_BYTES, largest_param_bytes=LARGEST, largest_module_bytes=LARGEST)
    assert sim_search.fixed_bytes(fm, "paper", 1, "compiled") == sim_search.fixed_bytes(fm, "adamw-bf16", 1, "compiled") \
        - sim.OPTIMIZERS["adamw-bf16"][0] * N_PARAMS + sim.OPTIMIZERS["paper"][0] * N_PARAMS
    assert sim_search.fixed_bytes(fm, "paper", 1, "compiled-per-block") == sim_search.fixed_bytes(fm, "paper", 1, "eager") \
        == PARAM_BYTES + LARGEST + sim.OPTIMIZERS["paper"][0] * N_PARAMS
