"""Progress of long measurements, visible whether or not the output is a terminal.

On a terminal a rich spinner (transient, so the tables stay clean); otherwise -- output redirected to a
file or a CI log -- one plain line per step on stderr, flushed, so a run of many minutes is never
silent.  Also :func:`quiet_profiler`: the profiler's native log lines (Kineto's ``USDT ...
profiler_start/stop``, ``CPUAllocator`` notes about blocks allocated before profiling began) are
written by C++ straight to file descriptor 2, past Python's ``sys.stderr``; they are captured around
our own profiling and dropped, and any other native output is passed on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

#: Native lines the profiler writes on every run that say nothing about the measurement.
PROFILER_NOISE = re.compile(r"USDT:.*profiler_(start|stop)|CPUAllocator|Memory block of unknown size")


class Progress:
    """``with Progress(total) as p: p.step("compiling x")`` -- spinner on a tty, flushed lines otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled, self.done = total, enabled, 0
        self.stream = stream if stream is not None else sys.stderr
        self._bar = self._task = None
        self._start = time.monotonic()

    def __enter__(self) -> Progress:
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import Progress as RichProgress
            from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                     transient=True, console=Console(file=self.stream))
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def step(self, description: str) -> None:
        """Announce the next unit of work (call before doing it)."""
        if not self.enabled:
            return
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, description=description, completed=self.done - 1)
        else:
            elapsed = time.monotonic() - self._start
            print(f"[{self.done}/{self.total} {elapsed:6.0f} s] {description}", file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Drop the profiler's native noise lines written to fd 2 inside the block; pass other lines on.

    fd 2 is restored on exit, whatever happens inside.  Where fd 2 cannot be duplicated (no real
    stderr, e.g. some notebook kernels), the block runs unchanged.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [ln for ln in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not PROFILER_NOISE.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Hide deprecation/future warnings raised by transformers and torch inside the block only.

    They are about the libraries' own APIs (not the user's code) and would interleave with the tables;
    ``warnings.catch_warnings`` restores the filters on exit.
    """
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch)(\.|$)")
        yield
