"""Train a small Llama for a few steps with plain Inductor and with mst; print loss and peak memory.

    python examples/train_small.py               # timing: see the README
    python examples/train_small.py --seq-len 4096 --steps 5

Same weights, same data, same optimizer (AdamW) for both runs, in one process.  Peak = bytes above
the parameters during one forward + backward (gradients included), measured with the profiler, in
MiB (2^20 bytes).  Progress goes to stderr: a spinner on a terminal, one flushed line per step when
redirected, so a long run is never silent.
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from transformers import LlamaForCausalLM

import mstfx
from mstfx.compat import with_tracing_settings
from mstfx.tools.bench import reference_config
from mstfx.tools.measure import peak_bytes
from mstfx.tools.progress import Progress, quiet_library_warnings


def train(model, backend, ids_batches, measure_step: int = 1, progress: Progress | None = None):
    """Steps of AdamW on the loss function compiled with ``backend``; returns losses and the peak."""
    torch._dynamo.reset()
    loss_fn = torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend=backend)
    loss_fn = with_tracing_settings(loss_fn)  # what mstfx.compile adds: checkpointed layers traced whole
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, peak = [], None
    for step, ids in enumerate(ids_batches):
        if progress is not None:
            what = "compiling and running" if step == 0 else "measuring the peak of" if step == measure_step else "running"
            progress.step(f"{backend}: {what} step {step + 1}/{len(ids_batches)}")
        opt.zero_grad(set_to_none=True)

        def fwd_bwd():
            loss = loss_fn(ids)
            loss.backward()
            return loss.item()

        if step == measure_step:  # step 0 compiles; measure a warm step
            peak, loss = peak_bytes(fwd_bwd)
        else:
            loss = fwd_bwd()
        opt.step()
        losses.append(loss)
    return losses, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    base = LlamaForCausalLM(reference_config(args.seq_len))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (1, args.seq_len), generator=g) for _ in range(args.steps)]

    print(f"reference Llama (hidden 512, 2 layers, vocab 32000), S={args.seq_len}, fp32, AdamW, {args.steps} steps",
          flush=True)
    results = {}
    backends = [("inductor", "inductor"), ("mst", "mst")]
    with Progress(len(backends) * args.steps) as bar, quiet_library_warnings():
        for name, backend in backends:
            model = copy.deepcopy(base)
            losses, peak = train(model, backend, batches, progress=bar)
            results[name] = (losses, peak)
            print(f"  {name:<9} losses {' '.join(f'{l:.4f}' for l in losses)}   peak {peak / 2**20:7.0f} MiB", flush=True)
    (li, pi), (lm, pm) = results["inductor"], results["mst"]
    drift = max(abs(a - b) for a, b in zip(li, lm))
    print(f"peak mst / inductor = {pm / pi:.2f}   max |loss difference| over {args.steps} steps = {drift:.2e}")
    print()
    print(mstfx.explain(last=1))


if __name__ == "__main__":
    main()
