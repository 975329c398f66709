"""Peaks of one simulated step: the arguments checked, the fake model run in each mode (eager or a
compiled program), optimizer state, FSDP sharding and host memory added as :class:`SimulatedBreakdown`."""

from __future__ import annotations

from ...vocabulary import Mode, Program
from .options import GPUS_PER_NODE, MODES, OPTIMIZERS, SimulateError
from .fake_model import SimulatedBreakdown, FakeModel


def check_args(seq_len: int, mode: Mode | str, batch: int, optimizer: str, gpus: int, sequence_parallel: int = 1) -> Mode:
    """The arguments checked (SimulateError naming the bad one); ``mode`` as a :class:`Mode`."""
    try:
        mode = Mode.parse(mode)
    except ValueError:
        raise SimulateError(f"unknown mode {mode!r}; one of {', '.join(MODES)} (or the planner's spelling "
                            "with 'checkpointing')") from None
    if optimizer not in OPTIMIZERS:
        raise SimulateError(f"unknown optimizer setup {optimizer!r}; one of {', '.join(OPTIMIZERS)}")
    from ...config import is_positive_int

    for name, v in (("seq_len", seq_len), ("batch", batch), ("gpus", gpus), ("sequence_parallel", sequence_parallel)):
        if not is_positive_int(v):
            raise SimulateError(f"{name} must be a positive integer, got {v!r}")
    if gpus % sequence_parallel:
        raise SimulateError(f"sequence_parallel={sequence_parallel} must divide gpus={gpus} "
                            f"(a mesh of gpus/N data-parallel × N sequence-parallel ranks)")
    if seq_len % sequence_parallel:
        raise SimulateError(f"seq_len={seq_len} must be a multiple of sequence_parallel={sequence_parallel} "
                            f"(each rank holds S/N tokens)")
    return mode


def check_program(program: Program | str) -> Program:
    """``program`` as a :class:`Program` (SimulateError naming the spellings for an unknown one)."""
    try:
        return Program.parse(program)
    except ValueError:
        raise SimulateError(f"unknown program {program!r}; one of {', '.join(PROGRAMS)}") from None


def check_heads(config, sequence_parallel: int) -> None:
    """Ulysses needs whole heads per rank: N divides the query heads (SimulateError otherwise); K/V heads
    are repeated as the runtime repeats them (``cost_model.kv_heads_split``)."""
    if sequence_parallel == 1:
        return
    from ...planning import cost_model as cm

    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    arch = cm.Arch(hidden=1, intermediate=1, layers=1, heads=heads, kv_heads=kv, head_dim=1, vocab=1)
    try:
        cm.check_sequence_parallel(arch, sequence_parallel, sequence_parallel)
    except ValueError as err:
        raise SimulateError(str(err)) from None


_MODEL_CACHE: dict[int, FakeModel] = {}


def cached_fake_model(config) -> FakeModel:
    """The :class:`FakeModel` of ``config``, built once and reused while the same config object is asked for
    again (building one takes seconds; the command, the search and the peaks all ask for it)."""
    fm = _MODEL_CACHE.get(id(config))
    if fm is None:
        _MODEL_CACHE.clear()
        fm = _MODEL_CACHE[id(config)] = FakeModel(config)
        fm._config_ref = config  # keep id() valid
    return fm


def _weights(gpus: int) -> list[tuple[float, float]]:
    """Peaks tracked per run: [grads kept, grads freed as made] with params/grads divided by ``gpus``."""
    s = 1.0 / gpus
    return [(s, s), (s, 0.0)]


def _breakdowns(fm: FakeModel, tracker, seq_len, mode, batch, gpus, chunks, host: float = 0.0,
                sequence_parallel: int = 1) -> dict[str, SimulatedBreakdown]:
    from ..offload_sim import HOST_STATE_BYTES_PER_PARAM

    per_node = min(gpus, GPUS_PER_NODE)
    out = {}
    sharded_extra_p = 2 * fm.largest_module_bytes if gpus > 1 else 0.0  # all-gathered current + prefetched
    sharded_extra_g = fm.largest_module_bytes if gpus > 1 else 0.0  # unsharded grads before reduce-scatter
    for opt, (state_bpp, grads_kept, _) in OPTIMIZERS.items():
        i = 0 if grads_kept else 1
        p, g, acts = tracker.split(i)
        if not grads_kept:
            g = fm.largest_param_bytes / gpus  # the one gradient alive while its Adam steps
        out[opt] = SimulatedBreakdown(
            seq_len=seq_len,
            mode=mode,
            optimizer=opt,
            batch=batch,
            gpus=gpus,
            params=p + sharded_extra_p,
            grads=g + (sharded_extra_g if grads_kept else 0.0),
            optimizer_state=state_bpp * fm.n_params / gpus,
            activations=acts,
            chunks=dict(chunks),
            host=(h := host + HOST_STATE_BYTES_PER_PARAM.get(opt, 0.0) * fm.n_params / gpus),
            sequence_parallel=sequence_parallel,
            host_node=h * per_node,
        )
    return out


#: which program is simulated: the eager step (op by op under MemTracker) or the compiled one (the
#: graphs the mst backend / Inductor builds, see :mod:`mstfx.tools.compiled_program`)
#: (``compiled-per-block``: ``mstfx.compile(model, per_block=True)``, each decoder layer its own graph)
PROGRAMS = Program.spellings()


def _compiled_breakdowns(config, fm: FakeModel, seq_len: int, mode: Mode, batch: int, gpus: int,
                         sequence_parallel: int = 1, per_block: bool = False) -> dict[str, SimulatedBreakdown]:
    """Breakdowns of the compiled step: activations and gradients at its peak from the program itself.

    Its backward is one graph whose outputs are all the gradients, so they are alive together until it
    returns, whatever the optimizer setup: "grads freed as made" does not apply to it.  ``gpus > 1``:
    FSDP's shares as in the eager program (parameters, the gradients at the peak and the optimizer
    state divided by the GPUs, plus two all-gathered modules and one unsharded module gradient); the
    whole-model graph is kept (FSDP2 under compile breaks it per layer, which is not simulated).
    ``sequence_parallel``: ``seq_len`` is the whole sequence; the program captured is one rank's, on
    its S/N tokens, with Ulysses' all-to-alls around attention (``compiled_program.simulated_sdpa``).

    ``per_block``: the program of per-block compilation, composed from the whole one and the eager
    decoder body by :func:`~mstfx.tools.compiled_program.per_block_peak`: the same saved tensors and
    recomputes, the eager final norm's saved tensors at the forward's end, and each block's backward
    its own graph, so its gradients are handed to autograd (and, in the "grads freed as made" setups,
    consumed by the optimizer step in backward) when that block's backward ends."""
    from ..compiled_program import compiled_peak, eager_body_extra_of, per_block_peak
    from ..offload_sim import HOST_STATE_BYTES_PER_PARAM

    if per_block and gpus > 1:
        raise SimulateError("--program compiled-per-block models one GPU; use --program compiled with --gpus")
    peak = compiled_peak(config, seq_len // sequence_parallel, mode, batch, sequence_parallel=sequence_parallel)
    extra_p = 2 * fm.largest_module_bytes if gpus > 1 else 0.0
    extra_g = fm.largest_module_bytes if gpus > 1 else 0.0
    per_node = min(gpus, GPUS_PER_NODE)

    body_extra = eager_body_extra_of(config, seq_len // sequence_parallel, batch) if per_block else 0

    def grads_and_activations(grads_kept: bool) -> tuple[float, float]:
        if not per_block:
            return peak.grads / gpus + extra_g, peak.activations
        step = per_block_peak(peak, fm.largest_module_bytes, not grads_kept, body_extra)
        return step.grads, step.activations

    out = {}
    for opt, (state_bpp, grads_kept, _) in OPTIMIZERS.items():
        host = peak.host + HOST_STATE_BYTES_PER_PARAM.get(opt, 0.0) * fm.n_params / gpus
        grads, acts = grads_and_activations(grads_kept)
        out[opt] = SimulatedBreakdown(
            seq_len=seq_len, mode=mode, optimizer=opt, batch=batch, gpus=gpus, params=fm.param_bytes / gpus + extra_p,
            grads=grads, optimizer_state=state_bpp * fm.n_params / gpus,
            activations=acts, host=host, sequence_parallel=sequence_parallel, host_node=host * per_node,
        )
    return out


def simulate_all(config, seq_len: int, mode: Mode | str, batch: int = 1, gpus: int = 1,
                 program: Program | str = Program.EAGER, sequence_parallel: int = 1) -> dict[str, SimulatedBreakdown]:
    """One simulated step; the peak breakdown for every optimizer setup of :data:`OPTIMIZERS`."""
    mode = check_args(seq_len, mode, batch, "adamw", gpus, sequence_parallel)
    check_heads(config, sequence_parallel)
    program = check_program(program)
    fm = cached_fake_model(config)
    if program.compiled:
        return _compiled_breakdowns(config, fm, seq_len, mode, batch, gpus, sequence_parallel,
                                    per_block=program.per_block)
    tracker, chunks = fm.step_peak(seq_len // sequence_parallel, batch, mode, _weights(gpus), sequence_parallel)
    return _breakdowns(fm, tracker, seq_len, mode, batch, gpus, chunks, fm.host.peak, sequence_parallel)


def simulate_peak(
    config, seq_len: int, mode: Mode | str, batch: int = 1, optimizer: str = "adamw", gpus: int = 1,
    program: Program | str = Program.EAGER, sequence_parallel: int = 1,
) -> SimulatedBreakdown:
    """Simulated per-GPU peak of one training step (fwd + bwd, optimizer state resident).

    ``config``: a transformers config (see :func:`load_config`); ``mode``: a :class:`Mode` or one of :data:`MODES`;
    ``optimizer``: one of :data:`OPTIMIZERS`; ``gpus > 1``: FSDP, params/grads/optimizer sharded;
    ``program``: a :class:`Program`: eager (op by op), compiled (what ``backend="mst"`` / Inductor
    builds) or compiled-per-block;
    ``sequence_parallel`` N (dividing ``gpus`` and ``seq_len``): Ulysses, one rank's S/N tokens.
    """
    mode = check_args(seq_len, mode, batch, optimizer, gpus, sequence_parallel)
    return simulate_all(config, seq_len, mode, batch, gpus, program, sequence_parallel)[optimizer]
