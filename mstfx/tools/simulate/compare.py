"""Simulated peaks beside the cost model's prediction (``mstfx simulate --compare``)."""

from __future__ import annotations

from dataclasses import replace

from ...vocabulary import Mode, Program
from .options import GiB, MODES
from .measure import simulate_peak


def compare_with_cost_model(config, seq_lens, modes=MODES, batch: int = 1) -> list[dict]:
    """Simulated vs predicted peak (bf16 weights, grads kept, no optimizer state) at each length and mode.

    ``rel`` = (predicted − simulated) / simulated; the target is |rel| ≤ 0.10.
    """
    from mstfx.planning.planner import arch_of, predict_peak
    from mstfx.planning.setup import TrainingSetup

    # the simulation runs FlashAttention whatever the config asks for (no S × S scores)
    arch = replace(arch_of(config), eager_attention=False)
    # what the simulation trains: bf16 weights and grads, no optimizer state, op by op
    setup = TrainingSetup(batch=batch, optimizer="none", mixed_precision="bf16", program=Program.EAGER)
    rows = []
    for mode in map(Mode.parse, modes):
        for s in seq_lens:
            simd = simulate_peak(config, int(s), mode, batch, optimizer="offload")
            # the offload mode's LM head follows its own rule (``offload_sim.lm_head_chunks``): predict with the M run
            ms = simd.chunks if mode.offloaded else {}
            pred = predict_peak(arch, int(s), setup, mode=mode, mini_sequences=dict(ms) or None)
            rows.append(
                dict(
                    mode=mode.short,
                    seq_len=int(s),
                    simulated_gib=round(simd.total / GiB, 3),
                    predicted_gib=round(pred.peak / GiB, 3),
                    sim_activations_gib=round(simd.activations / GiB, 3),
                    pred_activations_gib=round(pred.activations / GiB, 3),
                    rel=round((pred.peak - simd.total) / simd.total, 4),
                )
            )
    return rows
