"""LoRA fine-tuning: the compiled step's peak with the adapted MLPs chunked, against plain Inductor, and
what the cost model predicts chunking the MLPs alone should save.

Tiny Llama from ``mstfx.tools.architectures`` (hidden 64, intermediate 176, vocab 256, 2 layers) with
PEFT LoRA on every linear (r = 4, no dropout, base weights frozen), S = 2048, batch 1, fp32, CPU; one
fwd+bwd from fresh gradients, peak bytes by the profiler (``mstfx.tools.measure.peak_bytes``), all
variants in this one process:

* plain Inductor (``torch.compile`` of the loss function),
* mst with the MLPs left unchanged (``skip_kinds=("mlp",)``: the LM head alone, what a LoRA model
  got before adapters were recognised inside the MLP),
* mst (MLPs with their adapters chunked too),

each mst variant at M = 8, with loss and gradients compared with eager on the same weights.  The
predicted share is the MLP cost terms (saved for backward, unchunked − chunked, all layers) of the
same Llama without adapters: the adapters add r = 4 columns per projection, which it does not count.

    python examples/lora_peak.py [seq]

Measured (torch 2.13 CPU, S = 2048, M = 8): plain Inductor 40.4 MiB, mst with the MLPs unchanged
21.8 MiB, mst 10.3 MiB; the MLPs' saving 11.5 MiB against a predicted 8.2 MiB saved for backward.
The rest is the MLP's backward transient (its tokens × intermediate gradients, one chunk's worth
when chunked): 5.5 → 1.2 MiB in the cost model, so 8.2 + 4.3 = 12.5 MiB bounds the saving from above.
Loss and every LoRA gradient within 4.8e-07 of eager.
"""

from __future__ import annotations

import sys

import torch

import mstfx
from mstfx.planning import cost_model as cm
from mstfx.planning.planner import arch_of
from mstfx.regions.mlp import cost as mlp_cost
from mstfx.tools.architectures import loss_and_grads, tiny_llama, variant_peaks

SEQ = 2048
M = 8


def lora_llama():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", r=4, lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    return model


def predicted_share(base, seq: int, m: int) -> float:
    """Bytes the cost model says chunking the MLPs saves (saved for backward, all layers)."""
    arch, prec = arch_of(base), cm.Precision()
    full, _ = mlp_cost.compiled(arch, prec, False, 1, arch.intermediate, arch.dense_layers)
    chunked, _ = mlp_cost.compiled(arch, prec, True, m, arch.intermediate, arch.dense_layers)
    return full.count * (cm.evaluate(full.saved, seq) - cm.evaluate(chunked.saved, seq, m_mlp=m))


def measure(seq: int = SEQ, m: int = M) -> dict:
    model = lora_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 256, (1, seq), generator=g)
    ref = loss_and_grads(model, ids, ids)
    out = {"predicted_share": predicted_share(tiny_llama(), seq, m)}
    variants = {
        "inductor": "inductor",
        "mst, MLPs unchanged": mstfx.backend(mini_sequences=m, skip_kinds=("mlp",)),
        "mst": mstfx.backend(mini_sequences=m),
    }
    out.update(variant_peaks(model, ids, ref, variants))
    return out


def main(argv: list[str]) -> int:
    seq = int(argv[0]) if argv else SEQ
    r = measure(seq)
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    print(f"S = {seq}, M = {M}, fp32; MiB = 2**20 bytes")
    print("| inductor | mst, MLPs unchanged | mst | inductor − mst | MLPs' saving (measured) | MLPs' share (predicted) | max \\|Δ\\| vs eager |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {mib(r['inductor'])} | {mib(r['mst, MLPs unchanged'])} | {mib(r['mst'])} | {mib(r['inductor'] - r['mst'])} | "
          f"{mib(r['mst, MLPs unchanged'] - r['mst'])} | {mib(r['predicted_share'])} | "
          f"{max(r['mst max|Δ|'], r['mst, MLPs unchanged max|Δ|'], r['inductor max|Δ|']):.1e} |")
    print("chunked:", {k: v for k, v in r.items() if k.endswith("chunked")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
