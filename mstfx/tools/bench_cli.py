"""``mstfx bench``'s command line: the one-step table (:mod:`mstfx.tools.bench`), ``--sweep`` over lengths
(:mod:`mstfx.tools.sweep`) and ``--compile-time`` (:mod:`mstfx.tools.compile_time`).  Apart from the
measurements so that the sweep can build on the bench's variants without an import circle."""

from __future__ import annotations

import argparse
import json
import sys

from . import compile_time, sweep
from dataclasses import asdict

from .bench import CONFIGS, DEFAULT_VARIANTS, VARIANTS, markdown, ratios, render, run


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mstfx bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {VARIANTS} (default: all but eager-mst; with --sweep see below)")
    parser.add_argument(
        "--config", default="reference", choices=sorted(CONFIGS),
        help="reference: hidden 512, 2 layers, vocab 32000; mlp-heavy: hidden 256, intermediate 1024, 4 layers, vocab 2000",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    sweep.add_arguments(parser)
    compile_time.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.compile_time:
        return compile_time.cli_compile_time(args)
    if args.sweep is not None:
        return sweep.cli_sweep(args, CONFIGS)
    variants = [v.strip() for v in (args.variants or ",".join(DEFAULT_VARIANTS)).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"mstfx bench: unknown variant(s) {unknown}; choose from {VARIANTS}", file=sys.stderr)
        return 2
    if args.seq_len < 1 or args.batch < 1 or args.repeats < 1:
        print("mstfx bench: --seq-len, --batch and --repeats must be positive", file=sys.stderr)
        return 2
    rows = run(args.seq_len, variants, args.repeats, args.batch, progress=not args.json, config=args.config)
    if args.json:
        print(json.dumps({"seq_len": args.seq_len, "rows": [asdict(r) for r in rows], "ratios": ratios(rows)}, indent=2))
    else:
        print(render(rows, args.seq_len, args.config))
        if args.markdown:
            print(markdown(rows))
        for r in rows:
            if r.report:
                print(f"\n{r.variant}:\n{r.report}")
    return 0
