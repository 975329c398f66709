"""The plan table without the tools extra: rich when installed, plain text otherwise.

Why: ``mstfx.plan`` is part of the compiler pass (``transform`` plans), which installs with torch and
sympy alone; rich is a dependency of the tools extra.  :class:`PlainTable` takes the same calls as
``rich.table.Table`` that the planner makes, so the planner builds one table either way.
"""

from __future__ import annotations

import io
from typing import Any


class PlainTable:
    """The subset of ``rich.table.Table`` the plan table uses, rendered as aligned text."""

    def __init__(self, title: str = "", caption: str = "") -> None:
        self.title, self.caption = title, caption
        self.columns: list[tuple[str, str]] = []
        self.rows: list[list[str] | None] = []  # None: a section rule

    def add_column(self, name: str, justify: str = "left") -> None:
        self.columns.append((name, justify))

    def add_row(self, *cells: str) -> None:
        self.rows.append([str(c) for c in cells])

    def add_section(self) -> None:
        self.rows.append(None)

    def __str__(self) -> str:
        header = [name for name, _ in self.columns]
        body = [r for r in self.rows if r is not None]
        widths = [max([len(header[i])] + [len(r[i]) for r in body]) for i in range(len(header))]

        def line(cells):
            return "  ".join(c.rjust(w) if just == "right" else c.ljust(w)
                             for c, w, (_, just) in zip(cells, widths, self.columns)).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        out = [self.title, line(header), rule] if self.title else [line(header), rule]
        out += [rule if r is None else line(r) for r in self.rows]
        if self.caption:
            out.append(self.caption)
        return "\n".join(out)


def new_table(title: str = "", caption: str = "") -> Any:
    """A ``rich.table.Table`` if rich is installed, else a :class:`PlainTable`."""
    try:
        from rich.table import Table
    except ImportError:
        return PlainTable(title=title, caption=caption)
    return Table(title=title, caption=caption)


def render(table: Any, width: int = 120) -> str:
    """``table`` as text (rich's rendering when it is a rich table)."""
    if isinstance(table, PlainTable):
        return str(table)
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
    return buf.getvalue().rstrip()
