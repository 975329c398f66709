"""GPU check: the compiled step's real CUDA peak beside the compiled simulation's prediction.

    python -m mstfx.tools.gpu_check                          # ~1B Llama, S = 4096 16384 32768
    python -m mstfx.tools.gpu_check --seq-lens 4096 --json gpu.json

Every memory figure of mstfx on CPU is checked against the profiler; this is the same check on a
GPU, where ``torch.cuda.max_memory_allocated`` is the truth.  For each length and mode (plain
Inductor, mst, mst + HF checkpointing) one bf16 training step is compiled, run once (warm-up and
compile), then run again between ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``:
the peak above what was allocated before it (parameters; gradients None) is what
``mstfx simulate --program compiled`` predicts (:func:`mstfx.tools.compiled_program.compiled_peak`,
activations + gradients at the peak).  Printed: both, measured/predicted, and mst/inductor (each
mode's measured peak over plain Inductor's at the same length).  A length that runs out of memory is
a row "OOM", not a crash.  Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..vocabulary import Mode

#: ~1.1B Llama (TinyLlama's shape at 16 layers): GQA 32 query / 4 KV heads
DEFAULT_CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000)
DEFAULT_SEQ_LENS = (4096, 16384, 32768)
#: gpu_check's modes (its command line and JSON) → what the compiled simulation runs
MODES = {"inductor": Mode.STANDARD, "mst": Mode.MST, "mst+ckpt": Mode.MST_CHECKPOINTING}
GiB = 2**30


@dataclass
class Row:
    """One (length, mode): bytes above the step's start, measured and predicted; status "ok" or "OOM"."""

    seq_len: int
    mode: str
    status: str
    measured: int | None = None
    predicted: int | None = None
    measured_over_predicted: float | None = None
    over_inductor: float | None = None


def llama_config(config: dict, seq_len: int):
    """An HF Llama config from a plain dict (SDPA attention, no cache, positions for ``seq_len``)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{"max_position_embeddings": max(seq_len, 4096), **config}, use_cache=False,
                       attn_implementation="sdpa")


def cuda_peak(step: Callable[[], None], device: str) -> int:
    """Peak bytes ``step()`` allocates above what is allocated when it starts (the CUDA allocator's count)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def predicted_peak(config: dict, seq_len: int, mode: str, batch: int) -> int:
    """The compiled simulation's step peak above parameters for ``config`` (what ``mstfx simulate
    --program compiled`` prints as activations + gradients)."""
    from .compiled_program import compiled_peak

    return compiled_peak(llama_config(config, seq_len), seq_len, MODES[mode], batch, device="cuda").total


def _step(config: dict, seq_len: int, mode: str, batch: int, device: str, dtype, compiler: str):
    """The model and its compiled training step (loss only out, so the logits can be chunked away)."""
    from transformers import LlamaForCausalLM

    import mstfx

    from ..compat import with_tracing_settings
    from ..hf_checkpointing import enable_checkpointing
    from .measure import fresh_code

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(config, seq_len)).to(dtype).train()
    if mode == "mst+ckpt":
        enable_checkpointing(model)
    backend = compiler if mode == "inductor" else mstfx.backend(compiler=compiler)
    # Dynamo's settings for checkpointed layers traced whole, scoped to the calls (every mode alike)
    loss = with_tracing_settings(torch.compile(fresh_code(lambda i: model(input_ids=i, labels=i).loss), backend=backend))
    ids = torch.randint(0, config["vocab_size"], (batch, seq_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    def step():
        loss(ids).backward()

    return model, step


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_one(config: dict, seq_len: int, mode: str, *, batch: int = 1, device: str = "cuda",
                dtype=torch.bfloat16, compiler: str = "inductor", peak_fn=cuda_peak) -> Row:
    """One row: warm-up step (compiles), gradients dropped, then the measured step."""
    model = None
    try:
        model, step = _step(config, seq_len, mode, batch, device, dtype, compiler)
        step()
        model.zero_grad(set_to_none=True)
        return Row(seq_len, mode, "ok", measured=int(peak_fn(step, device)))
    except Exception as exc:  # an OOM at this length is a result, anything else is a bug to see
        if not _is_oom(exc):
            raise
        return Row(seq_len, mode, "OOM")
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def measure(config: dict, seq_lens=DEFAULT_SEQ_LENS, modes=tuple(MODES), *, batch: int = 1, device: str = "cuda",
            dtype=torch.bfloat16, compiler: str = "inductor", peak_fn=cuda_peak, predict_fn=predicted_peak,
            progress: bool = True) -> list[Row]:
    """Rows for every length × mode, predicted beside measured, with the two ratios filled in."""
    from .progress import Progress, quiet_library_warnings

    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    rows = []
    with Progress(2 * len(seq_lens) * len(modes), enabled=progress) as bar, quiet_library_warnings():
        for s in seq_lens:
            for mode in modes:
                bar.step(f"S = {s}, {mode}: measuring")
                row = measure_one(config, s, mode, batch=batch, device=device, dtype=dtype, compiler=compiler,
                                  peak_fn=peak_fn)
                bar.step(f"S = {s}, {mode}: predicting")
                row.predicted = int(predict_fn(config, s, mode, batch))
                rows.append(row)
    return with_ratios(rows)


def with_ratios(rows: list[Row]) -> list[Row]:
    """measured / predicted per row, and measured / plain Inductor's measured at the same length."""
    plain = {r.seq_len: r.measured for r in rows if r.mode == "inductor" and r.measured}
    for r in rows:
        if r.measured is not None and r.predicted:
            r.measured_over_predicted = r.measured / r.predicted
        if r.measured is not None and plain.get(r.seq_len):
            r.over_inductor = r.measured / plain[r.seq_len]
    return rows


def table(rows: list[Row], title: str = "compiled step peak above parameters (GiB)"):
    """A rich table of the rows."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("S", "mode", "measured", "predicted", "measured/predicted", "/ inductor"):
        t.add_column(col, justify="left" if col == "mode" else "right")

    def gib(v):
        return "-" if v is None else f"{v / GiB:.3f}"

    def ratio(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        measured = gib(r.measured) if r.status == "ok" else r.status
        t.add_row(str(r.seq_len), r.mode, measured, gib(r.predicted), ratio(r.measured_over_predicted),
                  ratio(r.over_inductor))
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mstfx.tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=DEFAULT_CONFIG["num_hidden_layers"])
    p.add_argument("--vocab", type=int, default=DEFAULT_CONFIG["vocab_size"], help="e.g. 128256 for Llama 3's")
    p.add_argument("--intermediate", type=int, default=DEFAULT_CONFIG["intermediate_size"])
    p.add_argument("--json", metavar="PATH", help="also write the rows and the config as JSON ('-': stdout)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: skipped")
        return 0
    from rich.console import Console

    config = {**DEFAULT_CONFIG, "num_hidden_layers": args.layers, "vocab_size": args.vocab,
              "intermediate_size": args.intermediate}
    rows = measure(config, args.seq_lens, args.modes, batch=args.batch)
    title = f"{torch.cuda.get_device_name()}: compiled step peak above parameters (GiB), batch {args.batch}"
    Console().print(table(rows, title))
    if args.json:
        out = json.dumps({"device": torch.cuda.get_device_name(), "config": config, "batch": args.batch,
                          "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, indent=2)
        if args.json == "-":
            print(out)
        else:
            with open(args.json, "w") as f:
                f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
