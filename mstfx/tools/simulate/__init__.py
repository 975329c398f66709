"""``mstfx simulate``: the longest sequence that trains on a GPU of a given size, found without a GPU.

The real Hugging Face model is built and run (one forward + backward) under ``FakeTensorMode``: no
weights, no data, no device; every tensor has only a shape, a dtype and a storage size.
``MemTracker`` (``torch.distributed._tools``) follows every allocation and free, so the peak it
reports is the peak the eager step would reach on a GPU.  Four modes:

``standard``   the model as it is
``ckpt``       Hugging Face ``gradient_checkpointing_enable()`` (each decoder layer recomputed)
``mst``        the mst backend's rewrite: chunked MLPs and fused chunked LM head + loss
``mst+ckpt``   both
``mst+ckpt+offload``  both, and the checkpoints (each layer's input) kept in host memory

The MsT rewrite is the mst backend's own: for each sequence length the MLP module (one decoder
layer's) and the LM-head + loss function are captured by Dynamo and handed to
``mstfx.backend(compiler="eager")``, which runs the pass pipeline and returns the eager form of the
rewritten graph (each MLP chunk under ``torch.utils.checkpoint``, the LM head through
``chunked_ops.linear_cross_entropy``, M from ``mstfx/regions/rules.py``).  Every decoder layer then runs
that graph with its own weights.  (Dynamo refuses to run while a dispatch mode such as FakeTensorMode
or MemTracker is active, so the whole model cannot be captured inside the simulation; the regions
are captured outside it, with the same fake parameters, and replayed inside.)

Attention runs as FlashAttention-2 does on a GPU (no S×S tensor, K/V kept at their own head count,
the backward's fp32 dq accumulator and GQA-expanded dk/dv workspace), and HF's packed-sequence probe,
which cannot read fake position ids, is answered "not packed" as a real single-sequence run does
(see docs/simulate.md).

Optimizer state is added by formula (see :data:`OPTIMIZERS`); "grads freed as made" setups (the MsT
paper's optimizer-in-backward) use the peak of (memory − gradients) over the step plus the largest
single gradient.  ``gpus > 1`` models FSDP (ZeRO-3): parameters, gradients and optimizer state are
divided by the GPUs, plus two all-gathered modules and one unsharded gradient module; activations are
not sharded by FSDP.  ``sequence_parallel = N`` (dividing ``gpus``) adds Ulysses sequence parallelism:
one rank's step is run, on its S/N tokens, with the attention kernel run as a rank runs it (an
all-to-all from S/N tokens × H heads to the whole S × H/N heads and back, the send and receive
buffers allocated; see :func:`.attention.flash_sim_attention` and docs/distributed.md).
"""

from __future__ import annotations

# The names tests, examples and docs reach through ``mstfx.tools.simulate`` (the package re-exports them;
# each lives in the module of its job: options, attention, fake_model, measure, search, compare, report,
# plot, cli).
from .cli import cli_main, run_cli  # noqa: F401
from .compare import compare_with_cost_model
from .fake_model import SimulatedBreakdown
from .measure import simulate_all, simulate_peak
from .options import EMBEDDED_MODELS, MODES, OPTIMIZERS, GiB, SimulateError, load_config  # noqa: F401
from .plot import default_plot_name  # noqa: F401
from .search import ModeResult, find_max_seq_len, search_longest  # noqa: F401

__all__ = [
    "SimulatedBreakdown",
    "MODES",
    "OPTIMIZERS",
    "SimulateError",
    "find_max_seq_len",
    "load_config",
    "search_longest",
    "simulate_all",
    "simulate_peak",
    "cli_main",
    "compare_with_cost_model",
]
