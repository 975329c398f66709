"""Logits: train a causal LM without ever materialising its tokens×vocab logits.

A Hugging Face causal LM returns ``logits`` beside ``loss``.  A graph output cannot be chunked away,
so the full logits would still be computed.  :func:`drop_logits` wraps the model's ``forward`` so that
``logits`` is ``None`` whenever a loss was computed; Dynamo traces the wrapper with the model, the
logits become dead code and only the chunked loss remains.
"""

from __future__ import annotations

import functools

import torch

_ORIG_ATTR = "_mstfx_original_forward"


def without_logits(output):
    """``output`` with ``logits`` set to None when it carries a loss (HF ModelOutput or dict)."""
    if getattr(output, "loss", None) is None or not hasattr(output, "logits"):
        return output  # inference or no labels: keep the logits
    output["logits"] = None
    return output


def drop_logits(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model(..., labels=...)`` return the loss without logits (in place; returns ``model``).

    The model's ``forward`` is wrapped (an instance attribute, so ``torch.compile(model)`` traces the
    wrapper and the logits become dead code).  Calls without labels are unchanged.  Undo with
    :func:`keep_logits`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"drop_logits expects an nn.Module, got {type(model).__name__}")
    if getattr(model, _ORIG_ATTR, None) is None:
        original = model.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return without_logits(original(*args, **kwargs))

        setattr(model, _ORIG_ATTR, original)
        model.forward = forward
    return model


def keep_logits(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`drop_logits`."""
    original = getattr(model, _ORIG_ATTR, None)
    if original is not None:
        del model.forward
        setattr(model, _ORIG_ATTR, None)
    return model
