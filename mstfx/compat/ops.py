"""How operators look in the torch-level FX graph Dynamo hands a backend, where some are the C
bindings under ``torch._C`` rather than their public names: the passes match them by identity.

Imports torch at import time (the passes' module constants are built from it); imported by the passes
only.  Checked on torch 2.13.0 and 2.14.1 (``mstfx.compat.CHECKED_ON``); a binding that is gone leaves
only the public name in its set (the graph then shows the public function, the pass still matches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _binding(name: str) -> tuple:
    """``torch._C._nn.<name>`` when this torch has it: Dynamo records ``F.linear`` and
    ``F.scaled_dot_product_attention`` as these bindings (they are the same C function)."""
    fn = getattr(getattr(torch._C, "_nn", None), name, None)
    return (fn,) if fn is not None else ()


#: a linear layer's call in the graph: ``F.linear`` or its binding ``torch._C._nn.linear``
LINEAR_FUNCTIONS = frozenset({F.linear, *_binding("linear")})

#: scaled-dot-product attention in the graph: the public function or ``torch._C._nn.scaled_dot_product_attention``
SDPA_FUNCTIONS = frozenset({F.scaled_dot_product_attention, *_binding("scaled_dot_product_attention")})

#: modules whose functions hold functorch's interpreter state (``vmap`` levels and the like): a call
#: into them is bookkeeping of a transform, not maths on tensors
FUNCTORCH_MODULES = ("torch._functorch", "torch._C._functorch")


def is_functorch_function(fn) -> bool:
    """Whether ``fn`` (an FX node's target) comes from one of :data:`FUNCTORCH_MODULES`: vmap bookkeeping."""
    return (getattr(fn, "__module__", None) or "").startswith(FUNCTORCH_MODULES)
