"""Only ``mstfx.compat`` touches private PyTorch APIs: every other module of the package goes through it.

A private API (``torch._dynamo``, ``torch._C._nn.linear``, ``DistributedDataParallel._get_active_ddp_module``)
can move in any torch release; keeping them in one package makes a new release a check of that package.
The scan reads each module's syntax tree and flags, outside ``mstfx/compat/``:

* an import of a torch module with a private component (``import torch._dynamo``,
  ``from torch.distributed._tools.mem_tracker import ...``) or of a private name from torch
  (``from torch._C._profiler import _EventType``);
* an attribute chain rooted at a name bound to torch (``torch``, ``import torch.nn.functional as F``,
  ``from torch.nn.parallel import DistributedDataParallel``) with a private component (``torch._C._nn``,
  ``DistributedDataParallel._get_active_ddp_module``), and ``_C`` reached through any attribute;
* a string that is exactly a private dotted torch path (``"torch._functorch"``, a module-name check).

``torch.ops.<namespace>.<op>`` chains are operator names (ATen's ``_unsafe_view`` and the like), part of
the operator schema rather than Python modules, and stay allowed; so do dunders (``torch.__version__``),
docstrings and messages that only mention a private name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mstfx

PACKAGE = Path(mstfx.__file__).parent
COMPAT = PACKAGE / "compat"
_PRIVATE_PATH = re.compile(r"torch(\.\w+)*\._[A-Za-z]\w*(\.\w+)*")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` → ["a", "b", "c"]; None when the chain is not rooted at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every private torch API the source touches."""
    tree = ast.parse(source)
    torch_names = {"torch"}  # names bound to torch modules or to objects imported from torch
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "torch":
                    torch_names.add(alias.asname or "torch")
                    if any(map(_private, parts)):
                        found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "torch":
            parts = node.module.split(".")
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if any(map(_private, parts)) or _private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == "_C":
                found.append((node.lineno, "._C"))
                continue
            chain = _chain(node)
            if chain is None or chain[0] not in torch_names or (len(chain) > 1 and chain[1] == "ops"):
                continue
            if any(map(_private, chain[1:])):
                found.append((node.lineno, ".".join(chain)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if _PRIVATE_PATH.fullmatch(node.value):
                found.append((node.lineno, repr(node.value)))
    return sorted(set(found))


def test_scanner_flags_each_kind_of_private_use():
    source = (
        "import torch\nimport torch._dynamo\nimport torch.nn.functional as F\n"
        "from torch.distributed._tools.mem_tracker import MemTracker\n"
        "from torch._C._profiler import _EventType\n"
        "from torch.nn.parallel import DistributedDataParallel\n"
        "a = torch._C._nn.linear\nb = DistributedDataParallel._get_active_ddp_module()\n"
        "c = F._canonical_mask\nd = ('torch._functorch', 'torch._C._functorch')\ne = x.y._C\n"
    )
    lines = {line for line, _ in private_uses(source)}
    assert lines == {2, 4, 5, 7, 8, 9, 10, 11}, private_uses(source)


def test_scanner_leaves_public_uses_alone():
    source = (
        '"""Mentions torch._dynamo.explain in a docstring."""\nimport torch\nimport torch.nn.functional as F\n'
        "a = torch.ops.aten._unsafe_view.default\nb = torch.__version__\nc = F.linear\n"
        "d = torch.compiler.disable\ne = 'see torch._dynamo.explain(model) for where'\nf = obj._private\n"
    )
    assert private_uses(source) == []


def test_only_the_compat_package_touches_private_torch_apis():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if COMPAT in path.parents:
            continue
        for line, what in private_uses(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}")
    assert not offenders, "private PyTorch APIs outside mstfx/compat/ (add an entry there):\n" + "\n".join(offenders)


def test_compat_entries_say_what_they_are_and_where_they_were_checked():
    import importlib

    from mstfx.compat import CHECKED_ON

    assert CHECKED_ON and all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in CHECKED_ON)
    for path in sorted(COMPAT.glob("*.py")):
        module = importlib.import_module(f"mstfx.compat.{path.stem}" if path.stem != "__init__" else "mstfx.compat")
        assert module.__doc__ and ("2.13.0" in module.__doc__ or path.stem == "__init__"), path.name
        for name, obj in vars(module).items():
            if callable(obj) and getattr(obj, "__module__", None) == module.__name__ and not name.startswith("_"):
                assert obj.__doc__ and len(obj.__doc__.split()) >= 8, f"{path.name}: {name} needs a docstring"
