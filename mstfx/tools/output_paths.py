"""Output files of the command-line tools (``--json``, ``--plot``, ``--data``) are checked before the
run: a simulation or a sweep takes minutes, and a path it cannot write should fail at once, with exit
code 2 (bad input), not after the run with a traceback (and exit code 1, which means "does not fit")."""

from __future__ import annotations

import os


def unwritable(path: str, *, make_dirs: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (None if it can, as far as can be told without
    creating it): a directory, a missing or non-directory parent, no write permission.  ``make_dirs``:
    the writer creates missing parent directories, so the nearest existing one must be writable."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return "it is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "no permission to write it"
    parent = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
    elif not os.path.exists(parent):
        return f"directory {parent} does not exist"
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    return None if os.access(parent, os.W_OK) else f"no permission to create files in {parent}"


def check_writable(paths: dict[str, str | None], *, make_dirs: bool = False) -> str | None:
    """The first problem of ``{option: path}`` (None paths and ``-``, stdout, skipped) as one message
    (``cannot write --json out/x.json: directory /abs/out does not exist; ...``), or None."""
    for option, path in paths.items():
        if path is None or path == "-":
            continue
        why = unwritable(path, make_dirs=make_dirs)
        if why is not None:
            where = "a writable place" if make_dirs else "a directory that exists and is writable"
            return f"cannot write {option} {path}: {why}; give a path in {where}"
    return None


__all__ = ["check_writable", "unwritable"]
