"""What sequence parallelism refuses: the error it raises and the query/K-V head rule every rank checks.

Torch-free and in one place, so the rewrite pass (at compile time, on the graph's static shapes) and
the Ulysses op (at run time) refuse the same models with the same words.  How K/V heads are split over
the group is the planner's rule too, so it lives with it (:func:`mstfx.planning.cost_model.kv_heads_split`).
"""

from __future__ import annotations


class SequenceParallelError(ValueError):
    """A model or batch the Ulysses rewrite cannot run exactly; the message says why."""


def check_heads(heads: int, kv_heads: int, world: int, where: str = "attention") -> None:
    """Refuse query heads that ``world`` does not divide (each rank computes H/N whole heads)."""
    if heads % world:
        raise SequenceParallelError(
            f"{where}: {heads} query heads are not divisible by the sequence-parallel group size {world}; "
            "Ulysses gives each rank H/N whole heads"
        )
    if kv_heads <= 0 or heads % kv_heads:
        raise SequenceParallelError(f"{where}: {heads} query heads are not a multiple of {kv_heads} K/V heads")
