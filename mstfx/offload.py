"""Checkpoints in host memory: the inputs of checkpointed layers leave the GPU in forward and come back
for each layer's recompute in backward.

With MsT and activation checkpointing, what grows with S on the GPU is mostly the checkpoints
themselves (one tokens×hidden tensor per layer: Llama3-8B at 84K tokens, 21 GiB of 80).  Moving them
to host memory is exact (the same values come back) and costs two PCIe transfers of each checkpoint a
step.  Both forms use PyTorch's own machinery:

* **compiled** (``mstfx.backend(offload_checkpoints=True)``, or a plan in the offload mode): the joint
  pass :mod:`mstfx.post_grad.offload_checkpoints` marks the checkpoints and AOT autograd's activation
  offloading (``torch._functorch.config.enable_activation_offloading``, patched for that compile only,
  :func:`offloading_partition`) inserts the offload and reload copies; on CUDA with its separate
  stream and reload prefetching (``activation_offload_separate_stream``, ``activation_reload_prefetch``).
* **eager** (:func:`enable_checkpoint_offload`, :func:`offloaded_checkpoint`): each layer runs under
  ``torch.utils.checkpoint`` (non-reentrant) inside ``torch.autograd.graph.save_on_cpu`` (pinned host
  memory on CUDA).  The checkpoint saves its inputs as saved tensors *before* it installs its own
  saved-tensor hook, so ``save_on_cpu`` packs exactly those inputs to the host, and unpacks them
  (non-blocking from pinned memory) when the layer is recomputed; every tensor saved inside the
  layer goes to the checkpoint's own hook (it is recomputed, not stored).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch


@contextlib.contextmanager
def offloading_partition(prefetch: bool = False):
    """AOT autograd's activation offloading, on for the partitions made inside the block only.

    ``prefetch``: copy on a separate stream and start each reload early enough to overlap the backward
    (CUDA only; the copies are synchronous otherwise)."""
    from .compat.functorch import activation_offloading

    with activation_offloading(prefetch):
        yield


def offloading_compiler(compiler: Callable, example_inputs) -> Callable:
    """``compiler`` (Inductor's ``compile_fx``) with :func:`offloading_partition` around its call:
    AOT autograd partitions while it runs, so the backward compiled later has its reloads already."""
    prefetch = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)

    @functools.wraps(compiler)
    def compile_offloading(gm, inputs):
        with offloading_partition(prefetch):
            return compiler(gm, inputs)

    return compile_offloading


def host_hooks() -> torch.autograd.graph.saved_tensors_hooks:
    """Where saved tensors go: pinned host memory when CUDA is there (so reloads can be asynchronous)."""
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def offloaded_checkpoint(function: Callable, *args: Any, hooks: Callable[[], Any] = host_hooks, **kwargs: Any):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)`` whose saved
    inputs live in host memory.

    ``hooks``: a factory of the saved-tensor hooks that hold them (default :func:`host_hooks`; the
    simulator passes hooks that only count the bytes).  ``kwargs`` are the checkpoint's and
    ``function``'s, as for ``torch.utils.checkpoint.checkpoint``."""
    kwargs.setdefault("use_reentrant", False)
    if kwargs["use_reentrant"]:
        raise ValueError("offloaded_checkpoint needs the non-reentrant checkpoint (use_reentrant=False)")
    with hooks():
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def enable_checkpoint_offload(model: torch.nn.Module, hooks: Callable[[], Any] = host_hooks) -> torch.nn.Module:
    """Hugging Face gradient checkpointing with every checkpointed layer's inputs in host memory (eager).

    Turns gradient checkpointing on and gives each checkpointed module :func:`offloaded_checkpoint` as
    its checkpoint function; :func:`mstfx.hf_checkpointing.disable_checkpointing` undoes both.  Returns ``model``.
    Under ``torch.compile`` use the backend's ``offload_checkpoints=True`` instead (saved-tensor hooks
    break Dynamo's graph)."""
    from .hf_checkpointing import can_checkpoint, enable_checkpointing

    if not can_checkpoint(model):
        raise TypeError(f"{type(model).__name__} has no activation/gradient checkpointing switch: not a Hugging Face "
                        "model; wrap its layers with mstfx.offload.offloaded_checkpoint instead")
    enable_checkpointing(model)
    func = functools.partial(offloaded_checkpoint, hooks=hooks, use_reentrant=False)
    swapped = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = func
            swapped += 1
    if not swapped:
        raise TypeError(f"{type(model).__name__}: gradient checkpointing enabled no module to offload")
    return model
