"""``mstfx plan``: the argument parser and the command (print a plan's table, or why none fits)."""

from __future__ import annotations

import argparse
import math

from ..config import is_positive_int
from ..model_configs import source as config_source
from . import cost_model as cm
from . import offload_cost as offload
from .checks import SETUPS, UNMODELLED_SETUPS
from .errors import InfeasibleBudgetError
from .planner import MARGIN, MAX_CHUNKS, plan
from .setup import TrainingSetup


#: exit codes of ``mstfx plan`` (and ``mstfx simulate``): argparse's convention for bad input
EXIT_OK, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2

def _positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not is_positive_int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text}")
    return value


EXIT_CODES_HELP = "exit status: 0 fits, 1 does not fit the budget, 2 bad input (unknown model, bad config or option)"


def parser() -> argparse.ArgumentParser:
    """The ``mstfx plan`` argument parser (no torch or sympy import: ``--help`` is fast)."""
    ap = argparse.ArgumentParser(
        prog="mstfx plan", description="What mst would chunk (and whether to checkpoint) so one training step "
        "fits a memory budget, from the cost model. Memory is in GiB (2**30 bytes).", epilog=EXIT_CODES_HELP)
    ap.add_argument("--config", "--model", dest="config", required=True, metavar="NAME_OR_PATH",
                    help="model: a config.json path, a model directory, a cached Hugging Face name, or a built-in "
                    f"name ({', '.join(config_source.names())}); --model is the same option")
    ap.add_argument("--seq-len", type=_positive_int_arg, required=True, help="tokens per sequence S")
    ap.add_argument("--budget-gb", type=_positive_float_arg, required=True,
                    help="memory budget of one training step in GiB (2**30 bytes), parameters included")
    ap.add_argument("--batch", type=_positive_int_arg, default=1, help="sequences per step (default 1)")
    ap.add_argument("--optimizer", choices=list(cm.OPTIMIZERS) + list(SETUPS) + list(UNMODELLED_SETUPS), default="adamw",
                    help="optimizer state: adamw, sgd, none (in the model's precision), or one of mstfx simulate's "
                    f"setups {', '.join(SETUPS)} (they fix --mixed-precision); 'paper' is simulate-only (default adamw)")
    ap.add_argument("--mixed-precision", default=None, choices=["fp32", "bf16", "fp16", "amp"],
                    help="fp32 (default), bf16 or fp16 (2-byte weights and activations), amp (bf16 with fp32 master weights)")
    ap.add_argument("--max-chunks", type=_positive_int_arg, default=MAX_CHUNKS,
                    help=f"most mini-sequences per region a plan may use (default {MAX_CHUNKS})")
    ap.add_argument("--no-checkpointing", action="store_true", help="never plan activation checkpointing")
    ap.add_argument("--no-offload", action="store_true", help="never plan checkpoints in host memory")
    ap.add_argument("--host-gb", type=_positive_float_arg, default=None,
                    help="host memory a plan may use in GiB (offloaded checkpoints, pinned, + optimizer state kept "
                    "there; default: not limited)")
    ap.add_argument("--pcie-gbps", type=_positive_float_arg, default=offload.DEFAULT_PCIE_GBPS,
                    help=f"host-GPU bandwidth in GB/s for the offload transfer time (default {offload.DEFAULT_PCIE_GBPS:g}, "
                    "an assumption: PCIe 4.0 x16)")
    ap.add_argument("--gpus", type=_positive_int_arg, default=1,
                    help="GPUs the step runs on (with --strategy fsdp: parameters, gradients and optimizer state sharded "
                    "over all of them); --budget-gb is per GPU (default 1)")
    ap.add_argument("--strategy", default="fsdp", choices=["fsdp"], help="how state is split over --gpus (default fsdp)")
    ap.add_argument("--sequence-parallel", type=_positive_int_arg, default=1, metavar="N",
                    help="Ulysses sequence parallelism of degree N (dividing --gpus, the query heads and --seq-len): "
                    "each GPU holds S/N tokens, attention runs on the whole S with H/N heads (default 1)")
    ap.add_argument("--margin", type=float, default=MARGIN,
                    help=f"headroom kept on predicted grads + activations, in [0, 1) (default {MARGIN}: the cost model's error bound)")
    return ap


def cli_main(argv: list[str] | None = None) -> int:
    """``mstfx plan --config NAME_OR_PATH --seq-len 65536 --budget-gb 70``; exit codes: :data:`EXIT_CODES_HELP`."""
    import sys

    ap = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse printed the message to stderr
        return int(e.code or 0)
    if args.gpus % args.sequence_parallel:
        ap.print_usage(sys.stderr)
        print(f"mstfx plan: error: --sequence-parallel {args.sequence_parallel} must divide --gpus {args.gpus}",
              file=sys.stderr)
        return EXIT_BAD_INPUT

    from .text_table import render

    try:
        setup = TrainingSetup(batch=args.batch, optimizer=args.optimizer, mixed_precision=args.mixed_precision,
                              gpus=args.gpus, sequence_parallel=args.sequence_parallel)
        p = plan(args.config, args.seq_len, args.budget_gb, setup, max_chunks=args.max_chunks,
                 allow_checkpointing=not args.no_checkpointing, margin=args.margin, host_budget_gb=args.host_gb,
                 allow_offload=not args.no_offload, pcie_gbps=args.pcie_gbps)
    except InfeasibleBudgetError as err:
        print(f"mstfx plan: does not fit: {err}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except (ValueError, TypeError) as err:
        print(f"mstfx plan: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(render(p.table(), width=140))
    print(f"longest S that fits with this plan: {p.longest_seq_len}")
    return EXIT_OK
