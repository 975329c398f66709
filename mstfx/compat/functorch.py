"""Autograd, AOT-autograd and operator internals mstfx uses: the functorch config (activation
offloading, the memory budget of a benchmark baseline), AOT autograd's entry point, partitioner and
boxed calling convention and its rng wrappers (compiled-program simulation only), fake tensors, the
``OpOverload`` class of aten operators, and autograd inside a custom operator's kernel.

Every entry imports torch's internals when called, never when this module is imported.  Checked on
torch 2.13.0 and 2.14.1 (``mstfx.compat.CHECKED_ON``); a missing entry raises
:class:`mstfx.compat.MissingTorchAPI` unless its docstring names a fallback.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from .errors import private


def functorch_config():
    """AOT autograd's config module (``torch._functorch.config``); patched, never set, for one compile."""
    return private("torch._functorch.config", used_for="AOT autograd options")


def activation_offloading(prefetch: bool = False) -> contextlib.AbstractContextManager:
    """AOT autograd's activation offloading on for the partitions made inside the context
    (``enable_activation_offloading``; with ``prefetch``, ``activation_offload_separate_stream`` and
    ``activation_reload_prefetch``): the compiled form of mstfx's checkpoint offload."""
    return functorch_config().patch(
        enable_activation_offloading=True,
        activation_offload_separate_stream=prefetch,
        activation_reload_prefetch=prefetch,
    )


def has_activation_memory_budget() -> bool:
    """Whether AOT autograd's partitioner takes ``activation_memory_budget`` (a benchmark baseline).
    Fallback: False where it is missing, and the benchmark reports the variant as not available."""
    try:
        return hasattr(functorch_config(), "activation_memory_budget")
    except ImportError:
        return False


def activation_memory_budget(budget: float) -> contextlib.AbstractContextManager:
    """The partitioner's ``activation_memory_budget`` (0-1, share of the activations it may keep) for the
    compiles inside the context; check :func:`has_activation_memory_budget` first."""
    return functorch_config().patch(activation_memory_budget=budget)


def aot_autograd_api() -> tuple[Callable, Callable, Callable]:
    """``(aot_module_simplified, min_cut_rematerialization_partition, make_boxed_func)``: AOT autograd's
    entry point, Inductor's partitioner and the boxed calling convention of compiled graphs.  The
    compiled-program simulation drives AOT autograd with them to keep the forward and backward graphs
    Inductor would compile."""
    used_for = "the compiled-program simulation"
    return (private("torch._functorch.aot_autograd", "aot_module_simplified", used_for=used_for),
            private("torch._functorch.partitioners", "min_cut_rematerialization_partition", used_for=used_for),
            private("torch._functorch.aot_autograd", "make_boxed_func", used_for=used_for))


def rng_state_wrappers() -> tuple[Any, Any]:
    """``(run_and_save_rng_state, run_with_rng_state)`` (``torch._prims.rng_prims``): the operators AOT
    autograd wraps a checkpointed layer's seeded op in; the compiled-program simulation recognises and
    unwraps them."""
    used_for = "the compiled-program simulation"
    return (private("torch._prims.rng_prims", "run_and_save_rng_state", used_for=used_for),
            private("torch._prims.rng_prims", "run_with_rng_state", used_for=used_for))


def fake_tensor_mode() -> type:
    """``FakeTensorMode`` (``torch._subclasses.fake_tensor``): tensors with shapes and no storage, for the
    simulations' weights and inputs."""
    return private("torch._subclasses.fake_tensor", "FakeTensorMode", used_for="fake tensors")


def fake_tensor() -> type:
    """``FakeTensor`` (``torch._subclasses.fake_tensor``): the verification pass checks every graph value
    it propagates is one."""
    return private("torch._subclasses.fake_tensor", "FakeTensor", used_for="verifying the rewritten graph")


def is_op_overload(target: Any) -> bool:
    """Whether an FX node's target is an operator overload (``torch._ops.OpOverload``:
    ``torch.ops.aten.mm.default`` and the like), as opposed to a Python function or a higher-order op."""
    return isinstance(target, private("torch._ops", "OpOverload", used_for="telling operators from functions"))


def op_name(target: Any) -> str:
    """An operator overload's name without namespace and overload (``"mm"`` for
    ``torch.ops.aten.mm.default``, from its ``_schema.name``); ``""`` for anything else."""
    return target._schema.name.split("::")[-1] if is_op_overload(target) else ""


def autograd_inside_operator() -> contextlib.ExitStack:
    """Autograd inside an operator's kernel.  A custom operator's kernel runs below the Autograd
    dispatch key (``torch.library`` excludes it for the call); the backward re-enables it for its own
    recompute so that autograd differentiates each chunk of the body as eager PyTorch would
    (``torch._C._SetExcludeDispatchKeyGuard(DispatchKey.AutogradFunctionality, False)``)."""
    import torch

    guard = private("torch._C", "_SetExcludeDispatchKeyGuard", used_for="autograd inside mstfx's loop operators")
    stack = contextlib.ExitStack()
    stack.enter_context(guard(torch._C.DispatchKey.AutogradFunctionality, False))
    stack.enter_context(torch.enable_grad())
    return stack
