"""Step time of per-block compilation against the whole-model compile, reference config, one process.

Hugging Face Llama, hidden 512, intermediate 1792, 2 layers, vocab 32000, S = 4096, fp32, CPU;
``mstfx.drop_logits`` on both; the two programs' steps interleaved after two warm-up steps each.

    python examples/per_block_step.py --steps 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaForCausalLM

import mstfx
from mstfx.tools.bench import reference_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = LlamaForCausalLM(reference_config(args.seq_len)).train()
    ids = torch.randint(0, base.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    whole, per_block = copy.deepcopy(base), copy.deepcopy(base)
    for model in (whole, per_block):
        mstfx.drop_logits(model)
    mstfx.compile(whole)
    mstfx.compile(per_block, per_block=True)

    def step(model) -> tuple[float, float]:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    for model in (whole, per_block):
        step(model)
        step(model)
    times = {"whole": [], "per_block": []}
    for _ in range(args.steps):
        for name, model in (("whole", whole), ("per_block", per_block)):
            times[name].append(step(model)[0])
    w, p = statistics.median(times["whole"]), statistics.median(times["per_block"])
    print(f"median step: whole-model {w:.2f} s, per-block {p:.2f} s, per-block / whole {p / w:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
