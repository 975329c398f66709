"""mstfx: the Mini-Sequence Transformer (MsT) as a torch.compile pass.

    model = torch.compile(model, backend="mst")            # after `pip install mstfx`
    model = torch.compile(model, backend=mstfx.backend(mini_sequences=8))
"""

from __future__ import annotations

from .backend import MstBackend, MstFallbackWarning, backend
from .config import MstConfig
from .explain import explain
from .wrappers import drop_logits
from .chunked_ops import chunked_logprobs, linear_cross_entropy

__all__ = ["MstBackend", "MstConfig", "MstFallbackWarning", "backend", "drop_logits", "explain", "linear_cross_entropy", "chunked_logprobs"]
__version__ = "0.1.0"

from .planning.planner import InfeasibleBudgetError, Plan, plan  # noqa: E402
from .transform import transform, untransform  # noqa: E402

__all__ += ["InfeasibleBudgetError", "Plan", "plan", "transform", "untransform"]
