"""Routed experts chunked: the compiled step's peak against plain Inductor, and what the cost model
predicts the experts alone should save.

Tiny Mixtral and Qwen2-MoE from ``mstfx.tools.architectures`` (hidden 64, 2 layers, top-2 of 4
experts), S = 4096, batch 1, fp32, CPU; one fwd+bwd from fresh gradients, peak bytes above the
parameters by the profiler (``mstfx.tools.measure.peak_bytes``), all variants in this one process:

* plain Inductor (``torch.compile`` of the loss function),
* mst with the routed experts left unchanged (``skip_kinds=("routed_experts",)``),
* mst (routed experts chunked too),

each mst variant at M = 8, with loss and gradients compared with eager on the same weights.
The predicted share is the routed-experts kind's cost terms: saved bytes unchunked − chunked, all
layers (``RoutedExpertsKind.cost``); the predicted peaks are the cost model's whole step
(``predict_peak``, standard for plain Inductor and mst at M), above the parameters.

    python examples/moe_peak.py [mixtral qwen2-moe]
"""

from __future__ import annotations

import sys

import torch

import mstfx
from mstfx.planning import cost_model as cm
from mstfx.planning.planner import arch_of
from mstfx.regions.routed_experts import KIND as EXPERTS
from mstfx.tools.architectures import BY_NAME, loss_and_grads, variant_peaks

SEQ = 4096
M = 8


def predicted_share(model, seq: int = SEQ, m: int = M) -> float:
    """Bytes the cost model says chunking the routed experts saves (saved for backward, all layers)."""
    arch, prec = arch_of(model), cm.Precision()
    full = EXPERTS.cost(arch, prec, False, 1, "compiled")
    chunked = EXPERTS.cost(arch, prec, True, m, "compiled")
    return full.count * (cm.evaluate(full.saved, seq) - cm.evaluate(chunked.saved, seq, m_mlp=m))


def measure(name: str, seq: int = SEQ, m: int = M) -> dict:
    """Peaks (bytes) of the three variants, the largest |Δ| of loss and grads vs eager, and the share."""
    model = BY_NAME[name].build()
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (1, seq), generator=g)
    ref = loss_and_grads(model, ids, ids)
    out = {"predicted_share": predicted_share(model, seq, m)}
    # the whole step as the cost model predicts it, above the parameters (gradients + activations)
    from mstfx.planning.planner import predict_peak

    for label, mode, ms in (("inductor", "standard", None), ("mst", "mst", m)):
        b = predict_peak(model, seq, mode=mode, mini_sequences=ms)
        out[f"predicted {label}"] = b.peak - b.params
    variants = {
        "inductor": "inductor",
        "mst, experts unchanged": mstfx.backend(mini_sequences=m, skip_kinds=("routed_experts",)),
        "mst": mstfx.backend(mini_sequences=m),
    }
    out.update(variant_peaks(model, ids, ref, variants))
    return out


def main(argv: list[str]) -> int:
    names = argv or ["mixtral", "qwen2-moe"]
    print(f"S = {SEQ}, M = {M}, fp32; MiB = 2**20 bytes")
    print("| model | inductor | mst, experts unchanged | mst | inductor − mst | experts' saving (measured) | experts' share (predicted) | "
          "inductor (predicted) | mst (predicted) | max \\|Δ\\| vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        r = measure(name)
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        print(f"| {name} | {mib(r['inductor'])} | {mib(r['mst, experts unchanged'])} | {mib(r['mst'])} | "
              f"{mib(r['inductor'] - r['mst'])} | {mib(r['mst, experts unchanged'] - r['mst'])} | "
              f"{mib(r['predicted_share'])} | {mib(r['predicted inductor'])} | {mib(r['predicted mst'])} | {max(r['mst max|Δ|'], r['mst, experts unchanged max|Δ|']):.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
