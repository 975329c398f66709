"""What is trained and how, as one value: :class:`TrainingSetup` (batch, optimizer setup, precision,
GPUs and sequence parallelism, the program and its optimizer in backward).

The planner's public functions (``plan``, ``longest_fitting``, ``predict_peak``, ``longest_seq_len``)
all describe the same training step; the setup is checked and turned into the cost model's words once,
here, and the planner passes the one object down instead of the same eight keywords through every
call.  What a search tries or bounds (the mode, M, the budget, the margin, checkpointing and offload
allowed, the host budget) stays with the functions.  No torch: the planner runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..config import positive_int
from ..vocabulary import ChunkForm, Mode, Program
from . import cost_model as cm
from .checks import parallel, per_block_program, precision_of, resolve_setup

__all__ = ["TrainingSetup", "training_setup"]


@dataclass(frozen=True)
class TrainingSetup:
    """One training step's setup, checked when made (ValueError naming the valid values; an unknown
    field is a TypeError).

    ``batch``: sequences per step.  ``optimizer``: ``"adamw"``, ``"sgd"``, ``"none"`` (no optimizer
    state), or one of ``mstfx simulate``'s setups ``"adamw-master"``, ``"adamw-bf16"``, ``"offload"``
    (each fixes the precision too; then leave ``mixed_precision`` unset), or ``"paper"`` (AdamW, bf16
    states, stepped in backward: per-block program only).  ``mixed_precision``: None / ``"fp32"``,
    ``"bf16"``, ``"fp16"``, ``"amp"`` (None also means: bf16 when the planned nn.Module's weights are).
    ``gpus``: FSDP over that many GPUs; ``sequence_parallel``: the Ulysses degree N dividing ``gpus``
    (and the model's query heads, checked when a model is planned).  ``program``: ``"compiled"`` (the
    mst backend's step) or ``"eager"`` (op by op, as ``mstfx simulate`` runs it; predictions only).
    ``per_block``: the program of ``mstfx.compile(model, per_block=True)``; ``optimizer_in_backward``
    (needs ``per_block``): the optimizer steps in post-accumulate-grad hooks, so each block's gradients
    leave when its backward ends.

    The fields keep the spellings given (``program`` becomes a :class:`~mstfx.vocabulary.Program`);
    what the cost model takes is derived once: :attr:`cost_optimizer`, :attr:`cost_precision`,
    :attr:`element_bytes`, :attr:`steps_in_backward`.  Change a field with ``dataclasses.replace``.
    """

    batch: int = 1
    optimizer: str = "adamw"
    mixed_precision: str | bool | None = None
    gpus: int = 1
    sequence_parallel: int = 1
    program: Program | str = Program.COMPILED
    per_block: bool = False
    optimizer_in_backward: bool = False

    #: the cost model's optimizer (``adamw``, ``sgd``, ``none``) of the setup
    cost_optimizer: str = field(init=False, repr=False, compare=False)
    #: the mixed precision the setup trains in (an optimizer setup's own, else ``mixed_precision``)
    cost_precision: str | bool | None = field(init=False, repr=False, compare=False)
    #: bytes per element of weights, gradients, activations (and fp32 master weights)
    element_bytes: cm.Precision = field(init=False, repr=False, compare=False)
    #: the per-block program with its optimizer stepping in backward (``optimizer_in_backward``, or ``paper``)
    steps_in_backward: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "batch", positive_int("batch", self.batch))
        put(self, "gpus", positive_int("gpus", self.gpus))
        put(self, "sequence_parallel", positive_int("sequence_parallel", self.sequence_parallel))
        cm.check_mesh(self.sequence_parallel, self.gpus)
        put(self, "program", cm.cost_program(self.program))
        for name in ("per_block", "optimizer_in_backward"):
            if getattr(self, name) not in (True, False):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
            put(self, name, bool(getattr(self, name)))
        if not isinstance(self.optimizer, str):
            raise ValueError(f"optimizer must be a name such as 'adamw' or 'adamw-bf16', got {self.optimizer!r}")
        optimizer, program_keys = per_block_program(self.optimizer, self.per_block, self.optimizer_in_backward)
        optimizer, precision = resolve_setup(optimizer, self.mixed_precision)
        put(self, "cost_optimizer", optimizer)
        put(self, "cost_precision", precision)
        put(self, "element_bytes", cm.Precision.of(precision))
        put(self, "steps_in_backward", program_keys.get("optimizer_in_backward", False))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields a setup is made of (the keywords the planner's functions take for it)."""
        return tuple(f.name for f in fields(cls) if f.init)

    def for_model(self, model_or_config: Any) -> "TrainingSetup":
        """This setup with the precision an nn.Module implies when none is set (its floating weights all
        bf16 or fp16: ``"bf16"``, see ``checks.precision_of``); itself otherwise."""
        precision = precision_of(model_or_config, self.cost_precision)
        return self if precision is self.cost_precision else replace(self, mixed_precision=precision)

    def check_parallel(self, arch: cm.Arch, seq_len: int | None = None) -> None:
        """ValueError unless the model's heads split over ``sequence_parallel`` ranks (and ``seq_len``,
        when given, does too): ``checks.parallel``."""
        parallel(arch, self.gpus, self.sequence_parallel, seq_len)

    def tokens(self, seq_len: int) -> int:
        """Tokens one rank holds of a step of ``seq_len``: batch × S / N (what the backend's chunks divide)."""
        return seq_len * self.batch // self.sequence_parallel

    def step_cost(self, arch: cm.Arch, mode: Mode | str, m_mlp=cm.M_MLP, m_head=cm.M_HEAD,
                  chunk_form: ChunkForm | str = ChunkForm.LOOP) -> cm.StepCost:
        """``cost_model.step_cost`` of this setup's step in ``mode`` with M per cost symbol."""
        return cm.step_cost(arch, mode, self.cost_optimizer, self.element_bytes, m_mlp, m_head, self.program,
                            chunk_form, sequence_parallel=self.sequence_parallel, gpus=self.gpus,
                            per_block=self.per_block, optimizer_in_backward=self.steps_in_backward)


def training_setup(setup: TrainingSetup | None, setup_fields: dict[str, Any], caller: str,
                   **defaults: Any) -> TrainingSetup:
    """The setup a public function was given: ``setup`` itself, or one made of its keyword arguments
    (over the function's ``defaults``).  TypeError for both at once, a ``setup`` that is not a
    :class:`TrainingSetup` (such as a batch size passed by position), or a keyword that is neither the
    function's nor a field."""
    unknown = sorted(set(setup_fields) - set(TrainingSetup.field_names()))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}: neither its own nor a "
                        f"TrainingSetup field ({', '.join(TrainingSetup.field_names())})")
    if setup is None:
        return TrainingSetup(**{**defaults, **setup_fields})
    if not isinstance(setup, TrainingSetup):
        raise TypeError(f"{caller}(): setup must be a TrainingSetup or None, got {setup!r}; the setup's fields "
                        f"({', '.join(TrainingSetup.field_names())}) are keyword arguments")
    if setup_fields:
        raise TypeError(f"{caller}() got both setup= and the setup fields {sorted(setup_fields)}: give one "
                        f"(dataclasses.replace(setup, ...) changes a field)")
    return setup
