"""What a region kind is: one object that brings everything mstfx does with one kind of region.

A *region* is a token-wise part of the graph whose memory grows with the tokens (an MLP's
tokens×intermediate activations, the LM head's tokens×vocab logits); a *kind* is the structure that
recognises such regions and knows how to chunk them.  Each kind is a :class:`RegionKind` subclass in a
module of its own, listed once in :mod:`mstfx.regions.registry`; the pass pipeline
(``mstfx.passes.run_passes``), the cost model, the planner, the simulator and the report iterate over
that list, so a new kind touches nothing else.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..vocabulary import Word


class KindEnum(Word):
    """Base of :data:`mstfx.regions.Kind`: members compare equal to their name (``Kind.MLP == "mlp"``),
    so configs, JSON and command lines keep using plain strings (a word of :mod:`mstfx.vocabulary`)."""


class RegionKind:
    """One region kind.  Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the kind's one name (the value of its :data:`~mstfx.regions.Kind` member); also the
            pass names ``find_<name>`` and ``rewrite_<name>`` in ``mstfx.passes.PASS_ORDER``.
        label: how the report shows it (may be more readable than ``name``).
        amplifier: the report's reason for chunking it (which tensor grows with the tokens).
        switch: the ``MstConfig`` field (a bool) that turns the kind off, if it has its own.
        in_checkpoint_bodies: also look inside activation-checkpointed layers.
        cost_symbol: the cost model's M symbol whose value this kind's chunks take ("M_mlp" or
            "M_head"): the planner's ``mini_sequences`` entry for this kind feeds that symbol.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    amplifier: ClassVar[str] = ""
    switch: ClassVar[str | None] = None
    in_checkpoint_bodies: ClassVar[bool] = False
    cost_symbol: ClassVar[str] = "M_mlp"
    #: rewritten even at M = 1 (the LM head: its fused loss alone saves the logits); other kinds are
    #: left unchanged there ("one mini-sequence: nothing to save")
    rewrite_at_one: ClassVar[bool] = False

    @property
    def kind(self) -> str:
        """The kind's name, as reports record it (equal to its :data:`~mstfx.regions.Kind` member)."""
        return self.name

    def enabled(self, config: Any) -> bool:
        """Whether ``config`` asks for this kind (its own switch, and not in ``config.skip_kinds``)."""
        if self.name in getattr(config, "skip_kinds", ()):
            return False
        return self.switch is None or bool(getattr(config, self.switch, True))

    # ---- graph side (the torch-level FX graph Dynamo hands the backend)

    def find(self, graph, params: set, claimed: set) -> tuple[list, list[tuple[str, str]]]:
        """``(regions, [(where, why), ...])``: the regions of ``graph`` and the candidates left alone.

        ``params``: placeholders holding parameters; ``claimed``: nodes another kind already took."""
        raise NotImplementedError

    def claims(self, region) -> set:
        """Nodes of ``region`` that no later kind may take."""
        return set(getattr(region, "nodes", ()))

    def mini_sequences(self, region, config: Any) -> int:
        """M for ``region``: the user's or plan's number (``config.mini_sequences_for``), else the
        kind's default rule (:mod:`mstfx.regions.rules`: ``mlp_chunks``, ``lm_head_chunks``)."""
        raise NotImplementedError

    def rewrite(self, owner, region, m: int, ctx) -> str:
        """Replace ``region`` in ``owner`` (a GraphModule) by its chunked form; returns words for the
        report's detail column (may be empty).  ``ctx``: :class:`mstfx.passes.RewriteContext`."""
        raise NotImplementedError

    def report_fields(self, region, m: int) -> dict:
        """The structured report fields of a region (``where``, ``tokens``, ``hidden``, ``width``,
        ``dtype``, ``detail``) as keyword arguments of ``RegionDecision``."""
        raise NotImplementedError

    @staticmethod
    def fields(region, width: Any, detail: str) -> dict:
        """:meth:`report_fields` of a region with ``name``, ``tokens``, ``hidden`` and ``dtype``: only the
        width its amplifier reaches and the detail differ between kinds."""
        from .rules import token_str

        return dict(where=region.name, tokens=token_str(region.tokens), hidden=region.hidden, width=width,
                    dtype=str(region.dtype).replace("torch.", ""), detail=detail)

    # ---- cost side (pure sympy: ``mstfx.planning.cost_model``)

    def cost(self, arch, prec, chunked: bool, m, program: str):
        """This kind's :class:`~mstfx.planning.terms.RegionCost` (pure sympy, no torch: the kind's
        ``cost`` module), or ``None`` when the model has no such region.  The cost model
        (``mstfx.planning.cost_model``) asks every kind of the registry; a kind adds its saved bytes to
        every layer it has (its ``count``) and its backward transient as a phase of its own.  The MLP
        and the LM head have phases beyond that (a checkpointed layer's recompute, the head's weight
        gradient), which the cost model's ``step_cost`` writes for them."""
        return None
