"""The ``mstfx`` command line: ``mstfx bench``, ``mstfx plan``, ``mstfx simulate``.

Each sub-command lives in its own module with a ``cli_main(argv) -> int`` function, imported only when
that command runs (torch and transformers are slow to import).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

#: What each command needs beyond the core install (torch, sympy), and the extra that brings it.
NEEDS = {"bench": ("rich", "tqdm", "matplotlib", "transformers"), "simulate": ("rich", "tqdm", "matplotlib", "transformers")}

COMMANDS = {
    "bench": ("mstfx.tools.bench_cli", "peak memory and step time: eager, checkpointing, Inductor, auto_chunker, mst"),
    "plan": ("mstfx.planning.cli", "what mst would chunk for a model, sequence length and memory budget"),
    "simulate": ("mstfx.tools.simulate", "longest sequence that trains on a GPU of a given size (FakeTensor, no GPU)"),
}


def _usage() -> str:
    lines = ["usage: mstfx <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "mstfx <command> --help for the options of one command"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mstfx: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"mstfx {name} needs the tools extra ({', '.join(missing)} not installed): "
              f'pip install "mstfx[tools]"', file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli_main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
