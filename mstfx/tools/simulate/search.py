"""The longest sequence that fits a GPU: a search over S of simulated peaks per mode, and the longest S
per optimizer setup interpolated from the runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...vocabulary import Mode, Program
from .options import GiB, OPTIMIZERS
from .fake_model import SimulatedBreakdown
from .measure import check_args, check_program, cached_fake_model, check_heads, simulate_all


@dataclass
class ModeResult:
    mode: Mode
    max_seq_len: int  # 0: nothing fits
    at_max: SimulatedBreakdown | None
    runs: list[tuple[int, float]]  # (S, total bytes) of every run, for the plot
    confirmed: bool
    note: str = ""


def _round(s: float, q: int) -> int:
    return max(q, int(s // q) * q)


def search_longest(
    peak_fn: Callable[[int], float],
    budget: float,
    *,
    start: int = 4096,
    quantum: int = 128,
    rel_tol: float = 0.005,
    max_runs: int = 9,
    max_len: int = 1 << 24,
    on_run: Callable[[int, float], None] | None = None,
) -> tuple[int, list[tuple[int, float]]]:
    """Largest S (multiple of ``quantum``) with ``peak_fn(S) <= budget``; 0 if not even ``quantum`` fits.

    The peak is convex and piecewise linear in S: a chord between a fitting and a non-fitting S lands on
    the fitting side, a line through the two largest fitting runs overshoots; the two are alternated.
    The returned S is always one that was run and fitted.
    """
    runs: dict[int, float] = {}

    def run(s: int) -> float:
        s = min(max(quantum, s), max_len)
        if s not in runs:
            runs[s] = peak_fn(s)
            if on_run:
                on_run(s, runs[s])
        return runs[s]

    def fits():
        return sorted(s for s, v in runs.items() if v <= budget)

    def over():
        return sorted(s for s, v in runs.items() if v > budget)

    if run(start) > budget:
        if run(quantum) > budget:
            return 0, sorted(runs.items())
        lo, hi = quantum, start
        # line through the two runs, then alternate as below
    else:
        run(min(max_len, start * 4))
    last_over = bool(over())
    for _ in range(max_runs):
        f, o = fits(), over()
        if not f:
            break
        lo = f[-1]
        hi = o[0] if o else None
        if hi is not None and hi - lo <= max(quantum, rel_tol * lo):
            break
        line = None
        if len(f) >= 2:  # line through the two largest fitting runs: overshoots (convex peak)
            a, b = f[-2], f[-1]
            slope = (runs[b] - runs[a]) / (b - a)
            # a flat stretch (the compiled step at short S peaks at the end of its backward, where
            # nothing grows with S) says nothing of where the peak crosses: grow by 4× until it rises
            line = b + (budget - runs[b]) / slope if slope > 0 else None
        if hi is None:
            guess = line if line is not None else lo * 4
        else:
            chord = lo + (budget - runs[lo]) * (hi - lo) / (runs[hi] - runs[lo])  # lands on the fitting side
            guess = chord if (last_over or line is None or line >= hi) else line
        s = _round(guess, quantum)
        if hi is not None:
            s = min(s, hi - quantum)
        if s <= lo:
            s = lo + quantum
        if s in runs or s > max_len:
            break
        last_over = run(s) > budget
    f = fits()
    return (f[-1] if f else 0), sorted(runs.items())


def find_max_seq_len(
    config, gpu_gb: float, mode: Mode | str, optimizer: str = "adamw", batch: int = 1, gpus: int = 1, progress=None,
    program: Program | str = Program.EAGER, sequence_parallel: int = 1, **search
) -> tuple[ModeResult, dict[int, dict[str, SimulatedBreakdown]]]:
    """Longest S that fits ``gpu_gb`` GiB per GPU in ``mode``; also every run's breakdowns.
    ``sequence_parallel`` N: S is the whole sequence, a multiple of N (the search's quantum and start
    are multiplied by N)."""
    mode = check_args(sequence_parallel, mode, batch, optimizer, gpus, sequence_parallel)
    program = check_program(program)
    check_heads(config, sequence_parallel)
    n = sequence_parallel
    search = {**search, "quantum": search.get("quantum", 128) * n, "start": search.get("start", 4096) * n,
              "max_len": search.get("max_len", 1 << 24) * n}
    budget = gpu_gb * GiB
    all_runs: dict[int, dict[str, SimulatedBreakdown]] = {}
    fm = cached_fake_model(config)
    fixed = OPTIMIZERS[optimizer][0] * fm.n_params / gpus + fm.param_bytes / gpus
    if fixed > budget:
        note = (
            f"nothing fits: weights + optimizer state alone need {fixed / GiB:.1f} GiB per GPU "
            f"(> {gpu_gb:g}) before any gradient or activation"
        )
        return ModeResult(mode, 0, None, [], True, note), all_runs

    def peak(s: int) -> float:
        bd = simulate_all(config, s, mode, batch, gpus, program, sequence_parallel)
        all_runs[s] = bd
        if progress is not None:
            progress(mode, s, bd[optimizer].total)
        return bd[optimizer].total

    best, runs = search_longest(peak, budget, **search)
    note = "" if best else f"nothing fits: even {search.get('quantum', 128)} tokens exceed {gpu_gb:g} GiB"
    return ModeResult(mode, best, all_runs.get(best, {}).get(optimizer), runs, best > 0, note), all_runs


def _interpolated_max(all_runs: dict[int, dict[str, SimulatedBreakdown]], optimizer: str, budget: float) -> int:
    """Longest S for another optimizer setup from the runs already made (piecewise-linear interpolation);
    0 where no run fits it (see :func:`longest_for_setup` for what is known then)."""
    pts = sorted((s, bd[optimizer].total) for s, bd in all_runs.items())
    fit = [s for s, v in pts if v <= budget]
    if not fit:
        return 0
    best = max(fit)
    above = [(s, v) for s, v in pts if s > best]
    if above:
        (s1, v1), (s2, v2) = (best, dict(pts)[best]), above[0]
        return int(s1 + (budget - v1) * (s2 - s1) / (v2 - v1))
    below = [(s, v) for s, v in pts if s < best]
    if below and dict(pts)[best] > below[-1][1]:
        (s1, v1), (s2, v2) = below[-1], (best, dict(pts)[best])
        return int(s2 + (budget - v2) * (s2 - s1) / (v2 - v1))  # extrapolated
    return best


def fixed_bytes(fm, optimizer: str, gpus: int, program: Program | str = Program.EAGER) -> float:
    """Bytes of a step of ``optimizer``'s setup that do not grow with S: parameters, every gradient (or
    the one alive, grads freed as made) and optimizer state, as the eager and compiled breakdowns count
    them: the peak as S → 0.  The whole-model compiled program keeps every gradient whatever the setup
    (its one backward graph returns them together), so there a setup that frees gradients as made still
    holds all of them; counting one would put the chord of :func:`longest_for_setup` under the true
    peak and its "lower bound" above the longest S."""
    state_bpp, grads_kept, _ = OPTIMIZERS[optimizer]
    program = Program.parse(program)
    grads_kept = grads_kept or (program.compiled and not program.per_block)
    extra = fm.largest_module_bytes if gpus > 1 else 0.0
    params = fm.param_bytes / gpus + 2 * extra
    grads = fm.param_bytes / gpus + extra if grads_kept else fm.largest_param_bytes / gpus
    return params + grads + state_bpp * fm.n_params / gpus


def longest_for_setup(all_runs: dict[int, dict[str, SimulatedBreakdown]], optimizer: str, budget: float, fixed: float,
                       quantum: int) -> tuple[int | None, str]:
    """``(longest S, how it is known)`` of a setup that was not searched, from the runs made for another.

    * a run fits it: interpolated between runs (or extrapolated past the longest), as before;
    * else, its fixed bytes (``fixed``: the peak as S → 0) exceed the budget: 0, nothing fits;
    * no run fits it, but runs exist: the peak is convex in S, so on [0, shortest run] it lies under the
      chord from (0, ``fixed``) to the shortest run; where the chord meets the budget is a length that
      fits (a lower bound, rounded down to ``quantum``);
    * no run at all (the searched setup could not hold its own weights): not known, None.
    """
    pts = sorted((s, bd[optimizer].total) for s, bd in all_runs.items())
    if any(v <= budget for _, v in pts):
        best = _interpolated_max(all_runs, optimizer, budget)
        return best, "extrapolated" if best > pts[-1][0] else "interpolated"
    if fixed > budget:
        return 0, "nothing fits: weights + gradients + optimizer state exceed the budget"
    if not pts:
        return None, "not run: the searched setup fits no length; rerun with --optimizer " + optimizer
    s1, v1 = pts[0]
    bound = int(s1 * (budget - fixed) / (v1 - fixed)) // quantum * quantum if v1 > fixed else 0
    return bound, (f"at least: a lower bound below the shortest run (S = {s1}); rerun with --optimizer {optimizer} "
                   "or a smaller --start for the longest S")
