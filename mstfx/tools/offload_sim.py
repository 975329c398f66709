"""Host memory in ``mstfx simulate``: what the offload mode and an offloaded optimizer keep off the GPU.

The eager simulation runs the offload mode's own code (:func:`mstfx.offload.enable_checkpoint_offload`:
each layer under the reentrant checkpoint, its saved inputs handed to saved-tensor hooks) with
:class:`FakeHostHooks` in place of ``save_on_cpu``: a packed tensor is dropped from the simulated GPU
and its bytes are counted as host memory; unpacking makes a new tensor of the same layout on the GPU
(the reload).  Fake tensors carry no data, so nothing is copied; the allocation pattern on the GPU is
the one ``save_on_cpu`` makes.
"""

from __future__ import annotations

import math

import torch

from mstfx.planning.offload_cost import HOST_STATE_BYTES_PER_PARAM  # noqa: F401  (bytes per parameter on the host, per setup)


def lm_head_chunks(hidden: int, vocab: int, tokens: int) -> int:
    """M of the LM head + loss in the offload mode: chunks of at most ``hidden`` tokens, as the MLP's.

    The paper's rule (``M = ⌈vocab / hidden⌉``, the backend's default) fixes the number of chunks, so
    a chunk's vocab-wide tensors (13 B per vocab entry per token, op by op) grow with S; at the lengths
    the offload mode reaches they would be the step's peak (Llama3-8B at 420K tokens: 32 chunks of
    13,125 tokens × 128,256 × 13 B = 20.4 GiB).  The offload mode is planned for those lengths, and a
    plan gives the LM head the chunks it needs; this rule is the same as the paper's up to S = vocab (and
    at most the backend's cap on M)."""
    from mstfx.config import MAX_USER_CHUNKS

    return min(MAX_USER_CHUNKS, max(math.ceil(vocab / hidden), math.ceil(tokens / hidden)))


class HostCounter:
    """Bytes held in (simulated) host memory now and at most."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)


class FakeHostHooks(torch.autograd.graph.saved_tensors_hooks):
    """``save_on_cpu`` for fake tensors: pack forgets the device tensor and counts its bytes on the
    host; unpack allocates it again on its device.  Host bytes are freed at unpack, as ``save_on_cpu``
    frees its host copy when the backward no longer holds it (after the layer's recompute)."""

    def __init__(self, counter: HostCounter) -> None:
        def pack(t: torch.Tensor):
            nbytes = t.untyped_storage().nbytes()
            counter.add(nbytes)
            return t.shape, t.stride(), t.dtype, t.device, nbytes

        def unpack(packed) -> torch.Tensor:
            shape, stride, dtype, device, nbytes = packed
            counter.add(-nbytes)
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)

        super().__init__(pack, unpack)
