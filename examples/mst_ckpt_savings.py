"""What the attention pass and chunk-by-chunk checkpoint recompute should save, then what they save.

Reference Llama config, mode mst+checkpointing, CPU, fp32, batch 1.  The prediction is the cost model's
difference between the step with HF's S×S mask, repeated K/V and whole-MLP recompute in checkpointed
layers (``plain_causal=False``, ``ckpt_mlp_whole=1``) and the step without them; the measurement is the
profiler's peak now against the one measured before those changes (:data:`MEASURED_BEFORE`, by the
same measurement, ``examples/predicted_vs_measured.py``, on the same machine type).

    python examples/mst_ckpt_savings.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import predicted_vs_measured as pvm  # noqa: E402

from mstfx.planning import cost_model as cm  # noqa: E402
from mstfx.planning.planner import arch_of, predict_peak  # noqa: E402


#: profiler peaks (bytes) of the reference config in mst+checkpointing before the attention pass and the
#: chunk-by-chunk recompute: ``docs/predicted_vs_measured.json`` as of commit 072153c (that commit's
#: code reproduces them with ``examples/predicted_vs_measured.py --models llama --modes mst+checkpointing``)
MEASURED_BEFORE = {2048: 212_965_320, 4096: 372_431_816, 8192: 792_042_440}


def main() -> int:
    # the measurements before were made with the unrolled chunk form (then the only one): compare like
    # with like, so that the saving is the two changes' alone and not the loop form's too
    pvm._use_chunk_form("unrolled")
    model = pvm.build("llama")
    arch = arch_of(model)
    print("| S | predicted saving MB | measured before MB | measured now MB | measured saving MB |")
    print("|---:|---:|---:|---:|---:|")
    for s in (2048, 4096, 8192):
        now = predict_peak(model, s, mode="mst+checkpointing", optimizer="none", chunk_form="unrolled").peak
        saved = dict(cm.COEF)
        cm.COEF["ckpt_mlp_whole"] = 1.0
        try:
            old = predict_peak(dataclasses.replace(arch, plain_causal=False), s, mode="mst+checkpointing",
                               optimizer="none", chunk_form="unrolled").peak
        finally:
            cm.COEF.update(saved)
        was = MEASURED_BEFORE[s]
        measured = pvm.measure("llama", "mst+checkpointing", s)
        print(f"| {s} | {(old - now) / 1e6:.1f} | {was / 1e6:.1f} | {measured / 1e6:.1f} | {(was - measured) / 1e6:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
