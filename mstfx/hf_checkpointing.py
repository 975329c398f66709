"""Hugging Face activation checkpointing on and off, by the name the installed transformers supports.

transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and
warns (FutureWarning) on the old name; transformers 4.57 has only the old one.  mstfx always asks for
the non-reentrant form: it is the one Dynamo traces into one graph.
"""

from __future__ import annotations

from typing import Any


def can_checkpoint(model: Any) -> bool:
    """Whether ``model`` has Hugging Face's switch for checkpointing every decoder layer."""
    return any(callable(getattr(model, name, None)) for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"))


def enable_checkpointing(model: Any) -> None:
    """Checkpoint every decoder layer of ``model`` (non-reentrant)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_checkpointing(model: Any) -> None:
    """Undo :func:`enable_checkpointing`."""
    disable = getattr(model, "activation_checkpointing_disable", None)
    (disable if callable(disable) else model.gradient_checkpointing_disable)()


def is_checkpointing(model: Any) -> bool:
    """Whether ``model``'s layers are checkpointed (HF's flag, by either name)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in getattr(model, "__dict__", {}):
            return bool(getattr(model, name))
    return False
