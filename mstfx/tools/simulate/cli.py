"""``mstfx simulate``: the argument parser, the run behind it, and the command (table, JSON, plot)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ...vocabulary import Mode, Program
from .options import GPUS_PER_NODE, GiB, MODES, MODE_LABELS, OPTIMIZERS, SimulateError, load_config
from .fake_model import SimulatedBreakdown
from .measure import PROGRAMS, cached_fake_model, check_heads
from .search import ModeResult, fixed_bytes, longest_for_setup, find_max_seq_len
from .compare import compare_with_cost_model
from .report import print_table
from .plot import save_plot, default_plot_name


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``mstfx simulate`` (also read by the tests that keep its flags consistent with
    ``mstfx plan``'s)."""
    from ...model_configs import source

    p = argparse.ArgumentParser(
        prog="mstfx simulate",
        description="Longest sequence that trains on a GPU of a given size: the real HF model run under "
        "FakeTensor + MemTracker (no weights, no GPU), in four modes. Memory is in GiB (2**30 bytes).",
        epilog="exit status: 0 done, 1 nothing fits in any requested mode, 2 bad input (unknown model, bad config or "
        "option, an output path that cannot be written: checked before the run)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    names = ", ".join(source.names())
    src.add_argument("--model", metavar="NAME_OR_PATH", help=f"model: a built-in name ({names}) or a config.json path")
    src.add_argument("--config", metavar="NAME_OR_PATH", help="the same as --model (as in mstfx plan)")
    p.add_argument("--gpu-gb", type=float, required=True, help="memory of one GPU in GiB (2**30 bytes)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--optimizer", default="adamw", help=f"one of {', '.join(OPTIMIZERS)} (default adamw)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (with --strategy fsdp)")
    p.add_argument("--strategy", default="fsdp", choices=["fsdp"], help="how state is split over --gpus")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="Ulysses sequence parallelism of degree N (dividing --gpus and the query heads): each GPU "
                   "holds S/N tokens, attention runs on the whole S with H/N heads (default 1); S is the whole sequence")
    p.add_argument("--start", type=int, default=4096, help="first sequence length tried")
    p.add_argument("--quantum", type=int, default=128, help="answer granularity in tokens")
    p.add_argument("--plot", "--out", dest="plot", default=None,
                   help="PNG path (default: simulate-<model>-<GPU GiB>gib-<optimizer>[-<program>].png in the current "
                   "directory; 'none' to skip; not written when no mode fits)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write JSON to a file or '-' for stdout")
    p.add_argument(
        "--program", default="eager", choices=PROGRAMS,
        help="eager: the step run op by op (FlashAttention); compiled: the graphs torch.compile(backend='mst') "
        "builds (plain Inductor for standard/ckpt), their saved tensors and recomputes; compiled-per-block: "
        "mstfx.compile(model, per_block=True), each block's gradients freed at its backward's end under the "
        "grads-freed-as-made setups (paper, zero-offload) (default eager)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--compare-cost-model",
        metavar="S1,S2,...",
        default=None,
        help="instead of the search: simulated vs cost-model peak at these lengths (bf16, no optimizer state)",
    )
    return p


def _validate_cli(args) -> list[Mode]:
    if not (args.gpu_gb > 0) or math.isinf(args.gpu_gb):
        raise SimulateError(f"--gpu-gb must be a positive number of GiB, got {args.gpu_gb:g}")
    if args.batch < 1 or args.gpus < 1 or args.quantum < 1 or args.start < 1 or args.sequence_parallel < 1:
        raise SimulateError("--batch, --gpus, --sequence-parallel, --start and --quantum must be positive integers")
    if args.gpus % args.sequence_parallel:
        raise SimulateError(f"--sequence-parallel {args.sequence_parallel} must divide --gpus {args.gpus} "
                            f"(a mesh of gpus/N data-parallel × N sequence-parallel ranks)")
    if args.optimizer not in OPTIMIZERS:
        raise SimulateError(f"unknown --optimizer {args.optimizer!r}; one of {', '.join(OPTIMIZERS)}")
    given = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in given if m not in Mode.spellings()]
    if bad or not given:
        raise SimulateError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(map(Mode.parse, given)))


def run_cli(args) -> dict:
    modes = _validate_cli(args)
    program = Program.parse(args.program)  # argparse's choices are its spellings
    config = load_config(args.model, args.config)
    check_heads(config, args.sequence_parallel)
    name = config._mstfx_name
    t0 = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(modes) * 6, desc=f"simulate {name}", unit="run", file=sys.stderr, leave=False)

    def progress(mode, s, total):
        if bar is not None:
            if bar.n >= bar.total:
                bar.total += 2
            bar.update(1)
            bar.set_postfix_str(f"{mode.short} S={s} peak={total / GiB:.1f} GiB")

    results: dict[Mode, ModeResult] = {}
    all_runs: dict[Mode, dict[int, dict[str, SimulatedBreakdown]]] = {}
    fm = None
    try:
        fm = cached_fake_model(config)
        for mode in modes:
            results[mode], all_runs[mode] = find_max_seq_len(
                config, args.gpu_gb, mode, args.optimizer, args.batch, args.gpus, progress,
                program=program, sequence_parallel=args.sequence_parallel, start=args.start, quantum=args.quantum,
            )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    budget = args.gpu_gb * GiB
    out = {
        "model": name,
        "params_billion": round(fm.n_params / 1e9, 3),
        "gpu_gib": args.gpu_gb,
        "gpus": args.gpus,
        "strategy": args.strategy if args.gpus > 1 else None,
        "sequence_parallel": args.sequence_parallel,
        "gpus_per_node": min(args.gpus, GPUS_PER_NODE),
        "batch": args.batch,
        "optimizer": args.optimizer,
        "program": str(program),
        "seconds": round(elapsed, 1),
        "modes": {},
        "by_optimizer": {},
        "by_optimizer_how": {},
    }
    for mode, r in results.items():  # keyed by this tool's spelling (``Mode.short``) in the JSON
        out["modes"][mode.short] = {
            "max_seq_len": r.max_seq_len,
            "note": r.note,
            "peak_gib": r.at_max.gib() if r.at_max else None,
            "chunks": r.at_max.chunks if r.at_max else {},
            "runs": [[s, round(v / GiB, 3)] for s, v in r.runs],
            # host memory of each run (offloaded checkpoints + optimizer state kept there)
            "host_runs": [[s, round(all_runs[mode][s][args.optimizer].host / GiB, 3)] for s, _ in r.runs if s in all_runs[mode]],
            # the same runs' host memory of one node (its GPUs' offloaded checkpoints and optimizer state)
            "host_node_runs": [[s, round(all_runs[mode][s][args.optimizer].host_node / GiB, 3)]
                               for s, _ in r.runs if s in all_runs[mode]],
        }
        # the longest S of every other setup from the same runs, and how it is known (``longest_for_setup``)
        found = {opt: (r.max_seq_len, "searched") if opt == args.optimizer else
                 longest_for_setup(all_runs[mode], opt, budget, fixed_bytes(fm, opt, args.gpus, program),
                                    args.quantum)
                 for opt in OPTIMIZERS}
        out["by_optimizer"][mode.short] = {opt: v for opt, (v, _) in found.items()}
        out["by_optimizer_how"][mode.short] = {opt: how for opt, (_, how) in found.items()}
    std = out["modes"].get("standard", {}).get("max_seq_len")
    for mode in out["modes"]:
        m = out["modes"][mode]["max_seq_len"]
        out["modes"][mode]["vs_standard"] = round(m / std, 2) if std else None
    return out


def _compare_cli(args) -> int:
    modes = _validate_cli(args)
    try:
        lens = [int(x) for x in args.compare_cost_model.split(",") if x.strip()]
    except ValueError:
        raise SimulateError(f"--compare-cost-model wants comma-separated integers, got {args.compare_cost_model!r}") from None
    if not lens or min(lens) < 1:
        raise SimulateError("--compare-cost-model wants positive sequence lengths")
    config = load_config(args.model, args.config)
    t0 = time.perf_counter()
    rows = compare_with_cost_model(config, lens, modes, args.batch)
    if args.json is not None:
        text = json.dumps({"model": config._mstfx_name, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=2)
        if args.json == "-":
            print(text)
        else:
            try:
                Path(args.json).write_text(text + "\n")
            except OSError as err:
                return _write_error("--json", args.json, err)
    if args.json != "-":
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{config._mstfx_name}: simulated vs cost model (bf16, batch {args.batch}, no optimizer state)")
        for col in ("mode", "S", "simulated GiB", "cost model GiB", "difference"):
            t.add_column(col, justify="left" if col == "mode" else "right")
        for r in rows:
            t.add_row(MODE_LABELS[Mode.parse(r["mode"])], f"{r['seq_len']:,}", f"{r['simulated_gib']:.2f}", f"{r['predicted_gib']:.2f}", f"{r['rel']:+.1%}")
        Console().print(t)
    return 0


def _check_outputs(args) -> None:
    """Every file the run will write (``--json``, ``--plot`` or the default plot in the current
    directory) is writable: a SimulateError (exit 2) now rather than a failure after the run."""
    import os

    from ..output_paths import check_writable

    paths = {"--json": args.json}
    if not args.compare_cost_model:
        if args.plot is None:
            if not os.access(os.getcwd(), os.W_OK):
                raise SimulateError(f"cannot write the default plot into the current directory {os.getcwd()}: "
                                    "no permission; give --plot PATH, or --plot none")
        elif args.plot.lower() != "none":
            paths["--plot"] = args.plot
    problem = check_writable(paths)
    if problem is not None:
        raise SimulateError(problem)


def _write_error(option: str, path: str, err: OSError) -> int:
    print(f"mstfx simulate: error: cannot write {option} {path}: {err.strerror or err}", file=sys.stderr)
    return 2


def cli_main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed the message; exit code 2 on errors
        return int(e.code or 0)
    try:
        _check_outputs(args)
        if args.compare_cost_model:
            return _compare_cli(args)
        out = run_cli(args)
    except SimulateError as err:
        print(f"mstfx simulate: error: {err}", file=sys.stderr)
        return 2
    if args.json is not None:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
        else:
            try:
                Path(args.json).write_text(text + "\n")
            except OSError as err:  # checked before the run; something changed since
                return _write_error("--json", args.json, err)
    if args.json != "-":
        print_table(out)
    plot = args.plot if args.plot is not None else default_plot_name(out)
    if plot.lower() == "none":
        pass
    elif not any(r["max_seq_len"] for r in out["modes"].values()):
        print(f"no plot: no mode fits {out['gpu_gib']:g} GiB at any length, nothing to draw", file=sys.stderr)
    else:
        try:
            save_plot(out, plot)
        except OSError as err:
            return _write_error("--plot", plot, err)
        if args.json != "-":
            print(f"plot: {plot}")
    return 0 if any(r["max_seq_len"] for r in out["modes"].values()) else 1  # 1: does not fit
