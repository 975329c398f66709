"""The words mstfx speaks in, as types: what a training setup turns on (:class:`Mode`), which step is
run or predicted (:class:`Program`), how a chunked region appears in the graph (:class:`ChunkForm`),
what the report says happened to a region (:class:`Action`).  The region kinds are a word of the
same sort, ``mstfx.regions.registry.Kind`` (a :class:`Word` built from the registry, which lives with
the kinds: this module imports nothing of mstfx, so every layer may import it without a circle).

Every type is a ``str`` Enum: a member equals its spelling (``Mode.MST == "mst"``), so plans, JSON,
configs and command lines keep plain strings.  Strings are turned into members once, where they
enter (the command lines, the public functions: ``Mode.parse``, ``Program.parse``...); inside, code
asks the member (``mode.chunked``, ``program.per_block``) instead of testing spellings.

No imports beyond the standard library: the cost model and planner use it without torch.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Word(str, Enum):
    """A str Enum whose members print as their spelling and parse with an error that lists them (the base
    of every word here and of ``mstfx.regions.registry.Kind``)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def spellings(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, text: Any):
        """The member spelled ``text`` (a member is returned as it is); ValueError naming the spellings."""
        if isinstance(text, cls):
            return text
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"{cls._what()} must be one of {', '.join(cls.spellings())}; got {text!r}") from None

    @classmethod
    def _what(cls) -> str:
        return cls.__name__.lower()


#: the parts a mode is written with, each with its spellings (the planner's long ones first)
_PARTS = {"mst": ("mst",), "checkpointing": ("checkpointing", "ckpt"), "offload": ("offload",)}


class Mode(Word):
    """What a training step does to save memory: mst chunking, activation checkpointing of every
    decoder layer, checkpoints offloaded to host memory.  A member's value is the planner's spelling
    (``mst+checkpointing``); :attr:`short` is ``mstfx simulate``'s (``mst+ckpt``).  :meth:`parse`
    takes either."""

    STANDARD = "standard"
    CHECKPOINTING = "checkpointing"
    MST = "mst"
    MST_CHECKPOINTING = "mst+checkpointing"
    #: the checkpoints in host memory (``mstfx.planning.offload_cost``); planned only when no other mode fits
    MST_CHECKPOINTING_OFFLOAD = "mst+checkpointing+offload"

    @property
    def chunked(self) -> bool:
        """Regions are chunked (the mst backend's rewrite)."""
        return "mst" in self._parts()

    @property
    def checkpointed(self) -> bool:
        """Every decoder layer is activation-checkpointed."""
        return "checkpointing" in self._parts()

    @property
    def offloaded(self) -> bool:
        """The checkpoints go to host memory between forward and backward."""
        return "offload" in self._parts()

    @property
    def short(self) -> str:
        """The spelling of ``mstfx simulate`` (its command line, tables and JSON): ``ckpt`` for checkpointing."""
        return "+".join(_PARTS[p][-1] for p in self._parts()) or "standard"

    @classmethod
    def of(cls, chunked: bool, checkpointed: bool, offloaded: bool = False) -> "Mode":
        """The mode that turns on what is asked (ValueError for offload without mst + checkpointing)."""
        parts = [p for p, on in zip(_PARTS, (chunked, checkpointed, offloaded)) if on]
        return cls.parse("+".join(parts) or "standard")

    @classmethod
    def spellings(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls) + tuple(m.short for m in cls if m.short != m.value)

    @classmethod
    def parse(cls, text: Any) -> "Mode":
        """``text`` in either spelling (``"mst+checkpointing"`` or ``"mst+ckpt"``) as a member."""
        if isinstance(text, cls):
            return text
        if isinstance(text, str):
            for m in cls:
                if text in (m.value, m.short):
                    return m
        raise ValueError(f"mode must be one of {', '.join(cls.spellings())}; got {text!r}")

    def _parts(self) -> tuple[str, ...]:
        return () if self.value == "standard" else tuple(self.value.split("+"))


class Program(Word):
    """Which step is run or predicted: op by op (eager autograd, FlashAttention), the Inductor step the
    mst backend compiles as one graph, or per-block compilation (``mstfx.compile(model, per_block=True)``:
    each decoder layer its own graph)."""

    EAGER = "eager"
    COMPILED = "compiled"
    COMPILED_PER_BLOCK = "compiled-per-block"

    @property
    def compiled(self) -> bool:
        """Run through Inductor (whole or per block)."""
        return self is not Program.EAGER

    @property
    def per_block(self) -> bool:
        return self is Program.COMPILED_PER_BLOCK


class ChunkForm(Word):
    """How a chunked region appears in the compiled graph (``MstConfig.chunk_form``): one loop
    operator whose body is one chunk (compile work does not grow with M), or M copies of the region."""

    LOOP = "loop"
    UNROLLED = "unrolled"

    @classmethod
    def _what(cls) -> str:
        return "chunk_form"


class Action(Word):
    """What the report says happened to a region: chunked (an LM head at M = 1 is fused, and the report
    says so), rewritten (an attention call), or left unchanged."""

    CHUNKED = "chunked"
    REWRITTEN = "rewritten"
    SKIPPED = "skipped"


__all__ = ["Action", "ChunkForm", "Mode", "Program", "Word"]
