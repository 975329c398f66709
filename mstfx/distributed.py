"""mst with data parallelism: DDP's graph splitting, and how to keep MLPs in one graph.

Under ``torch.compile``, Dynamo's *DDP optimizer* cuts every graph of a ``DistributedDataParallel``
model at gradient-bucket boundaries (``bucket_cap_mb``, first bucket 1 MB) so that all-reduce of one
bucket overlaps the backward of the next.  The mst backend then receives the pieces one by one, and a
cut can fall inside an MLP (the gate projection in one piece, the up and down projections in the
next).  A cut MLP is not chunked: the piece holding its up-projection sees the activation escape as a
graph output, the next piece sees a second token input, and both are reported and left unchanged.
With real model sizes every MLP weight exceeds the 25 MB default bucket, so almost every MLP is cut.

:func:`ddp_whole_graph` compiles DDP models as whole graphs instead (Dynamo's
``optimize_ddp=False``): every MLP is visible and chunked; DDP's C++ reducer still all-reduces the
gradients, but only once the compiled backward has produced them (no communication/compute
overlap).  It changes Dynamo's setting only inside the ``with`` block (or the decorated function),
never globally.  FSDP2 (``fully_shard``) needs nothing of this: see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from .regions.registry import Kind
from .vocabulary import Action

log = logging.getLogger("mstfx")

__all__ = ["ddp_whole_graph", "ddp_split_active"]


@contextlib.contextmanager
def ddp_whole_graph() -> Iterator[None]:
    """Inside this block, Dynamo compiles DDP models without splitting their graphs at bucket boundaries.

    Dynamo reads the setting when it compiles a frame, i.e. on the first call of the compiled model
    and on every recompilation, so enclose the training steps (or decorate the step function)::

        model = DDP(model)
        compiled = torch.compile(model, backend="mst")
        with mstfx.distributed.ddp_whole_graph():
            for batch in loader:
                compiled(**batch).loss.backward(); opt.step(); opt.zero_grad()

    Also usable as a decorator: ``@mstfx.distributed.ddp_whole_graph()``.  Equivalent to
    ``torch._dynamo.config.patch(optimize_ddp=False)``; not compatible with compiled autograd.
    """
    from .compat.distributed import ddp_optimizer_off

    with ddp_optimizer_off():
        yield


def ddp_split_active() -> bool:
    """True while Dynamo compiles a DDP model's graph through the DDP optimizer (graph split by buckets).

    Only meaningful when called from inside a ``torch.compile`` backend.
    """
    from .compat.distributed import ddp_optimizer_active

    return ddp_optimizer_active()  # False where torch lacks distributed or the API moved


_warned = False


def warn_if_ddp_split(report) -> None:
    """Log once per process when a DDP split graph left an MLP unchanged (called by the backend)."""
    global _warned
    if _warned or not ddp_split_active():
        return
    if any(d.kind == Kind.MLP and d.action is not Action.CHUNKED for d in report.decisions):
        _warned = True
        log.warning(
            "mstfx: DDP's graph splitting (torch._dynamo.config.optimize_ddp) cut an MLP at a gradient-bucket "
            "boundary; cut MLPs are left unchanged. Run the steps inside mstfx.distributed.ddp_whole_graph() "
            "to compile whole graphs (see docs/distributed.md)."
        )
