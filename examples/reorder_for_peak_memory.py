"""Why the mst backend compiles with Inductor's ``reorder_for_peak_memory`` off: the measured peak of one
compiled training step with the setting as the backend has it (off) and flipped on, same model, same
process.

The setting's estimate moves matmuls whose inputs are all saved tensors to the start of the backward.
In the unrolled chunk form every chunk's recompute is such a matmul, so all layers' chunks were
recomputed before the first gradient and chunking's saving in backward was lost.  The default loop
form hides each chunk's recompute inside one operator, so the setting has less to move; this script
measures both forms:

    nice -n 10 python examples/reorder_for_peak_memory.py                      # Llama, S = 1024
    nice -n 10 python examples/reorder_for_peak_memory.py --model gpt2 --seq-len 2048

Peaks are the profiler method of ``examples/predicted_vs_measured.py`` (bytes above the parameters,
gradients included), in MB (10**6 bytes) as that table prints them.
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import predicted_vs_measured as pvm  # noqa: E402  (the same models and measurement as the 39-point table)

import importlib  # noqa: E402

#: the backend module (``mstfx.backend`` the attribute is the backend function)
BACKEND_MODULE = importlib.import_module("mstfx.backend")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="a model of predicted_vs_measured.py (default llama)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--modes", default="mst,mst+checkpointing")
    parser.add_argument("--chunk-forms", default="loop,unrolled")
    args = parser.parse_args(argv)

    print(f"{args.model}, S = {args.seq_len}: measured peak MB with reorder_for_peak_memory off (mstfx) / on")
    for form in args.chunk_forms.split(","):
        pvm.CHUNK_FORM = form
        for mode in args.modes.split(","):
            peaks = {}
            for reorder in (False, True):
                with mock.patch.dict(BACKEND_MODULE.INDUCTOR_CONFIG_PATCHES, {"reorder_for_peak_memory": reorder}):
                    peaks[reorder] = pvm.measure(args.model, mode, args.seq_len) / pvm.MB
            print(f"  {form:9s} {mode:18s} off {peaks[False]:7.1f}   on {peaks[True]:7.1f}   "
                  f"on/off {peaks[True] / peaks[False]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
