"""Peak and step time of the compiled training step for several LM-head chunk counts M, the MLPs at
their default rule: why the default LM-head rule keeps chunks at 256 tokens or more.

Each LM-head chunk passes once over the vocab×hidden weight-gradient accumulator, so many short
chunks cost time; past the point where the logits of one chunk are small beside the rest of the
step, more chunks no longer lower the peak.  Same model (the reference Llama config), same process,
one compile per M:

    nice -n 10 python examples/lm_head_chunk_count.py                        # S = 4096, M = 4, 16, 63
    nice -n 10 python examples/lm_head_chunk_count.py --seq-len 8192 --ms 8,32,63

Peaks are ``mstfx.tools.measure.peak_bytes`` (bytes above the parameters, gradients included) in MiB;
step times the median of ``--repeats`` steps (state the machine's load with them).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--ms", default="4,16,63", help="LM-head chunk counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from transformers import LlamaForCausalLM

    import mstfx
    from mstfx.tools.bench import reference_config
    from mstfx.tools.measure import fresh_code, peak_bytes, step_seconds, training_step

    torch.manual_seed(0)
    model = LlamaForCausalLM(reference_config(args.seq_len)).train()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    print(f"reference Llama, S = {args.seq_len}: LM-head M, peak MiB, step s (median of {args.repeats})")
    losses = []
    for m in (int(x) for x in args.ms.split(",")):
        torch._dynamo.reset()
        backend = mstfx.backend(mini_sequences={"lm_head": m})
        loss_fn = mstfx.compat.with_tracing_settings(
            torch.compile(fresh_code(lambda: model(input_ids=ids, labels=ids).loss), backend=backend))
        step = training_step(model, loss_fn)
        step()  # compile
        step()  # warm
        peak, loss = peak_bytes(step)
        seconds = step_seconds(step, repeats=args.repeats)
        head = [d for r in backend.reports for d in r.decisions if d.kind == "lm_head" and d.chunks]
        assert head and all(d.chunks == m for d in head), mstfx.explain(backend)
        losses.append(loss)
        print(f"  M = {m:3d}   {peak / 2**20:7.1f} MiB   {seconds:6.2f} s   loss {loss:.6f}", flush=True)
    assert max(losses) - min(losses) < 1e-4, losses
    return 0


if __name__ == "__main__":
    sys.exit(main())
