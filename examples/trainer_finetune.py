"""Fine-tune a tiny causal LM with mst: Hugging Face Trainer and a plain PyTorch loop, each against the
same run without mst.  Draws both loss curves (``--out``, default ``trainer_loss.png`` in the current
directory) and prints the max difference.

    pip install -e ".[examples]"
    python examples/trainer_finetune.py                  # timing: see docs/training_loops.md
    python examples/trainer_finetune.py --out /tmp/loss.png
    python examples/trainer_finetune.py --update-docs    # redraw the committed docs/trainer_loss.png

The Trainer run is one extra line, ``mstfx.compile(model)`` (in place: Trainer still sees the same
module, so saving and unwrapping are unchanged).  ``TrainingArguments(torch_compile=True,
torch_compile_backend="mst")`` does not work with accelerate <= 1.15: its ``TorchDynamoPlugin`` accepts
only the backends of its ``DynamoBackend`` enum and raises ``ValueError: 'MST' is not a valid
DynamoBackend`` before training starts.  Pass ``--via-training-args`` to try that route anyway.
The model is a randomly initialised Llama-shaped model (hidden 64, 2 layers, vocab 256) built from
its config, and the data set is generated: noisy arithmetic token sequences, so the loss falls.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

VOCAB, SEQ = 256, 64
#: The figure docs/training_loops.md shows; only ``--update-docs`` writes it.
DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "trainer_loss.png"


def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def make_dataset(n: int = 512, seed: int = 0) -> list[dict]:
    """Sequences ``a, a+d, a+2d, ...`` (mod vocab) with 10% random tokens: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 8, (n, 1), generator=g)
    ids = (start + step * torch.arange(SEQ)) % VOCAB
    noise = torch.rand(n, SEQ, generator=g) < 0.1
    ids = torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), ids)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


# --------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------------------------------
def trainer_losses(use_mst: bool, steps: int, out_dir: str, via_training_args: bool = False) -> list[float]:
    from transformers import Trainer, TrainingArguments

    import mstfx

    model = make_model()
    mstfx.drop_logits(model)  # loss only: the tokens×vocab logits are never returned (same for both runs)
    if use_mst and not via_training_args:
        mstfx.compile(model)  # the whole mst integration (in place, like model.compile)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        warmup_steps=5,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
        torch_compile=use_mst and via_training_args,
        torch_compile_backend="mst" if use_mst and via_training_args else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# --------------------------------------------------------------------------------------------------
# Plain PyTorch loop
# --------------------------------------------------------------------------------------------------
def loop_losses(use_mst: bool, steps: int, batch: int = 8) -> list[float]:
    import mstfx

    model = make_model()
    mstfx.drop_logits(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    step_fn = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
    if use_mst:
        step_fn = mstfx.compile(step_fn)
    data = torch.stack([row["input_ids"] for row in make_dataset()])
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(steps):
        idx = order[(step * batch) % len(data) :][:batch]
        loss = step_fn(data[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (title, (plain, mst)) in zip(axes[0], curves.items()):
        diff = max(abs(a - b) for a, b in zip(plain, mst))
        ax.plot(range(1, len(plain) + 1), plain, label="without mst", linewidth=3, alpha=0.5)
        ax.plot(range(1, len(mst) + 1), mst, "--", label='torch.compile(backend="mst")', linewidth=1.5)
        ax.set_title(f"{title}: max |Δloss| = {diff:.2e}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="trainer_loss.png", help="PNG of the loss curves (default: current directory)")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"write the committed {DOCS_PNG.relative_to(DOCS_PNG.parents[1])} instead of --out")
    parser.add_argument("--skip-trainer", action="store_true", help="only the plain PyTorch loop")
    parser.add_argument("--via-training-args", action="store_true", help="TrainingArguments(torch_compile_backend='mst')")
    parser.add_argument("--tol", type=float, default=1e-3, help="fail if the curves differ by more")
    args = parser.parse_args(argv)
    out = str(DOCS_PNG) if args.update_docs else args.out
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    import mstfx

    curves = {}
    t0 = time.time()
    if not args.skip_trainer:
        with tempfile.TemporaryDirectory() as tmp:
            plain = trainer_losses(False, args.steps, tmp)
            torch._dynamo.reset()
            mst = trainer_losses(True, args.steps, tmp, args.via_training_args)
        curves["HF Trainer"] = (plain, mst)
        print(f"trainer: {len(mst)} steps, loss {mst[0]:.3f} -> {mst[-1]:.3f}  ({time.time() - t0:.0f}s)")
    t1 = time.time()
    torch._dynamo.reset()
    plain = loop_losses(False, args.steps)
    mst = loop_losses(True, args.steps)
    curves["PyTorch loop"] = (plain, mst)
    print(f"loop:    {len(mst)} steps, loss {mst[0]:.3f} -> {mst[-1]:.3f}  ({time.time() - t1:.0f}s)")
    print(mstfx.explain(last=1))
    plot(curves, out)
    worst = 0.0
    for title, (a, b) in curves.items():
        diff = max(abs(x - y) for x, y in zip(a, b))
        worst = max(worst, diff)
        print(f"{title}: max abs loss difference over {len(a)} steps = {diff:.3e}")
    print(f"wrote {out}  (total {time.time() - t0:.0f}s)")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
