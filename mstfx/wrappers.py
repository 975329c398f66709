"""Logits: train a causal LM without ever materialising its tokens×vocab logits.

A Hugging Face causal LM returns ``logits`` beside ``loss``.  A graph output cannot be chunked away,
so the full logits would still be computed.  :func:`drop_logits` registers a forward hook that
replaces ``logits`` by ``None`` whenever a loss was computed; Dynamo traces the hook with the model,
the logits become dead code and only the chunked loss remains.
"""

from __future__ import annotations

import torch

_HOOK_ATTR = "_mstfx_drop_logits_handle"


def _drop_logits_hook(module, args, kwargs, output):
    loss = getattr(output, "loss", None) if not isinstance(output, tuple) else None
    if loss is None:
        return output  # inference or no labels: keep the logits
    output["logits"] = None
    return output


def drop_logits(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model(..., labels=...)`` return the loss without logits (in place; returns ``model``).

    Calls without labels are unchanged.  Undo with ``mstfx.wrappers.keep_logits(model)``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"drop_logits expects an nn.Module, got {type(model).__name__}")
    if getattr(model, _HOOK_ATTR, None) is None:
        handle = model.register_forward_hook(_drop_logits_hook, with_kwargs=True)
        setattr(model, _HOOK_ATTR, handle)
    return model


def keep_logits(model: torch.nn.Module) -> torch.nn.Module:
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(model, _HOOK_ATTR, None)
    return model
