"""One compiled training step of a gradient-checkpointed GQA Llama: no S×S allocation, same grads as eager.

HF Llama, hidden 256, intermediate 1024, 4 layers, 8 query / 2 KV heads, vocab 2000, batch 1, fp32,
``gradient_checkpointing_enable()``, compiled with the mst backend as ``mstfx.compile`` does; run without an
``attention_mask`` and with an all-ones one (what every data collator passes).  Prints, for each, the
largest single allocation of the step (profiler) against S² bytes, the step's peak, and the largest
difference of the loss and every gradient from eager on the same weights.

    python examples/compiled_step_check.py --seq-len 8192
"""

from __future__ import annotations

import argparse

import torch

from mstfx.compat import with_tracing_settings


def _step(model, ids, mask, backend=None):
    model.zero_grad(set_to_none=True)
    fn = lambda i, a: model(input_ids=i, attention_mask=a, labels=i).loss  # noqa: E731
    if backend is not None:  # what mstfx.compile does, with this backend (its reports are read below)
        fn = with_tracing_settings(torch.compile(fn, backend=backend))
    loss = fn(ids, mask)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def main(argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    import mstfx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    args = ap.parse_args(argv)
    s = args.seq_len
    cfg = LlamaConfig(
        vocab_size=2000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (1, s), generator=torch.Generator().manual_seed(0))
    for label, mask in (("no attention_mask", None), ("all-ones attention_mask", torch.ones_like(ids))):
        ref = _step(model, ids, mask)
        torch._dynamo.reset()
        backend = mstfx.backend()
        got = _step(model, ids, mask, backend)  # compiles
        diff = max([(ref[0] - got[0]).abs().item()] + [(a - b).abs().max().item() for a, b in zip(ref[1], got[1])])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _step(model, ids, mask, backend)
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
        live = peak = largest = 0
        for e in events:
            live += e.nbytes()
            peak, largest = max(peak, live), max(largest, e.nbytes())
        attention = [d for r in backend.reports for d in r.decisions if d.kind == "attention"]
        mlps = [d for r in backend.reports for d in r.decisions if d.kind == "mlp"]
        print(
            f"S={s}, {label}: largest allocation {largest / 2**20:.1f} MiB (S² bytes = {s * s / 2**20:.1f} MiB), "
            f"peak {peak / 2**20:.0f} MiB, max |Δ| loss/grads vs eager {diff:.1e}, "
            f"attention calls rewritten {sum(d.action == 'rewritten' for d in attention)}/{len(attention)}, "
            f"MLPs chunked {sum(d.action == 'chunked' for d in mlps)}/{cfg.num_hidden_layers}, graphs {len(backend.reports)}"
        )
        if largest >= s * s:
            print("  an allocation of S² bytes or more is left in the step")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
