"""The shape of the package: no import circle (lazy imports count), no module importing another module's
private (underscored) name, and a new region kind takes one package and one registry entry (a toy kind,
written here as a package of its own, is found, chunked, reported and costed)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys

import torch
import torch.nn.functional as F

import mstfx

PACKAGE = pathlib.Path(mstfx.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    """Dotted name → file of every module of the package."""
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = ("mstfx",) + p.relative_to(PACKAGE).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _source(node: ast.ImportFrom, name: str, path: pathlib.Path) -> str:
    """The dotted module a ``from X import ...`` of module ``name`` (file ``path``) reads, relative
    imports resolved."""
    if not node.level:
        return node.module or ""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def _imports() -> dict[str, set[str]]:
    """Module → mstfx modules it imports anywhere (inside functions too)."""
    mods = _modules()
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = _source(node, name, p)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    graph = _imports()
    assert len(graph) > 30  # the walk saw the package
    assert _cycles(graph) == [], "import circles (lazy imports included)"


def test_the_walk_finds_a_circle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


# -- a toy region kind, as a package of its own: a GELU applied to tokens×features, outside any MLP,
# chunked over the tokens.  The test writes it to a temporary folder, so nothing of mstfx is edited.
TOY_KIND = {
    "__init__.py": '''
"""Region kind: a GELU on tokens×features, chunked over the tokens (a test kind)."""
from mstfx.regions.base import RegionKind


class ToyGeluKind(RegionKind):
    name = "toy_gelu"
    label = "toy gelu"
    amplifier = "a test kind"

    def find(self, graph, params, claimed):
        from .graph import find_regions

        return find_regions(graph, claimed)

    def mini_sequences(self, region, config):
        return config.mini_sequences_for(self.name, region) or 2

    def rewrite(self, owner, region, m, ctx):
        from .graph import rewrite

        return rewrite(owner, region, m)

    def report_fields(self, region, m):
        return self.fields(region, region.hidden, "gelu per chunk")

    def cost(self, arch, prec, chunked, m, program):
        from .cost import cost

        return cost(self.name, arch, prec, chunked, m)


KIND = ToyGeluKind()
''',
    "graph.py": '''
import torch
import torch.nn.functional as F


class GeluRegion:
    def __init__(self, node):
        self.node, self.nodes = node, [node]
        val = node.args[0].meta["example_value"]
        self.tokens, self.hidden, self.dtype = val.shape[-2], val.shape[-1], val.dtype
        self.name = f"gelu@{node.name}"


def _part(parts, i):
    return parts[i]


def find_regions(graph, claimed):
    found = [GeluRegion(n) for n in graph.nodes
             if n.op == "call_function" and n.target is F.gelu and n not in claimed]
    return found, []


def rewrite(owner, region, m):
    graph, node = owner.graph, region.node
    with graph.inserting_before(node):
        parts = graph.call_function(torch.chunk, (node.args[0], m, -2))
        outs = [graph.call_function(F.gelu, (graph.call_function(_part, (parts, i)),)) for i in range(m)]
        joined = graph.call_function(torch.cat, (outs, -2))
    node.replace_all_uses_with(joined)
    graph.erase_node(node)
    return f"; {m} chunks"
''',
    "cost.py": '''
from mstfx.planning.terms import B, RegionCost, S


def cost(name, arch, prec, chunked, m):
    width = arch.hidden * prec.act_bytes
    return RegionCost(name, 1, f"{arch.hidden}", saved=B * S * width,
                      fwd_transient=B * S * width / (m if chunked else 1), bwd_transient=B * S * width)
''',
}


def test_a_new_kind_is_one_package_and_one_registry_entry(monkeypatch, tmp_path):
    from mstfx.regions import registry

    package = tmp_path / "toy_gelu"
    package.mkdir()
    for file, text in TOY_KIND.items():
        (package / file).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    kind = importlib.import_module("toy_gelu").KIND  # the one package
    assert "toy_gelu.graph" not in sys.modules and "toy_gelu.cost" not in sys.modules  # loaded when used
    monkeypatch.setattr(registry, "REGION_KINDS", (*registry.REGION_KINDS, kind))  # the one registry line

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.head = torch.nn.Linear(16, 50, bias=False)

        def forward(self, ids):
            h = F.gelu(self.emb(ids))
            return F.cross_entropy(self.head(h).view(-1, 50), ids.view(-1))

    torch.manual_seed(0)
    net, ids = Net(), torch.randint(0, 50, (1, 24))
    ref = net(ids)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    backend = mstfx.backend(compiler="aot_eager", mini_sequences={"toy_gelu": 3})  # the config knows the kind
    loss = torch.compile(net, backend=backend)(ids)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n])
    rows = {d.kind: d for r in backend.reports for d in r.chunked}
    assert rows["toy_gelu"].chunks == 3 and "toy gelu" in mstfx.explain(backend)
    assert [name for name, _ in mstfx.passes.driver.pipeline()][:4] == [
        "find_lm_head", "find_routed_experts", "find_mlp", "find_toy_gelu"]

    # the cost side: the planner's table has a row for the new kind, from its cost terms
    plan = mstfx.plan("llama3-8b", 8192, 80, optimizer="adamw-bf16")
    assert any("toy_gelu" in r.region for r in plan.rows), [r.region for r in plan.rows]


# Private names still imported across modules (none): an entry here must name its reason; the test fails
# on an entry no longer imported, so the set only shrinks.
PRIVATE_IMPORTS_ALLOWED: set[tuple[str, str]] = set()


def _private_imports() -> list[tuple[str, int, str, str]]:
    """``(file, line, name, module)`` of every ``from X import _name`` in the package (relative or absolute,
    inside functions too) where X is an mstfx module other than the importing file's own; dunders
    (``__version__``) and ``__future__`` are not private names."""
    found = []
    for own, p in sorted(_modules().items(), key=lambda item: item[1]):
        file = "/".join(("mstfx",) + p.relative_to(PACKAGE).parts)
        for node in ast.walk(ast.parse(p.read_text(), file)):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _source(node, own, p)
            if source != "mstfx" and not source.startswith("mstfx.") or source == own:
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                    found.append((file, node.lineno, name, source))
    return found


def test_no_module_imports_another_modules_private_name():
    """A name another module imports is part of its module's interface: public (no underscore), with a
    docstring, so that renaming or removing it is seen as the interface change it is."""
    found = _private_imports()
    offenders = [f"{file}:{line}: {name} (from {source})" for file, line, name, source in found
                 if (file, name) not in PRIVATE_IMPORTS_ALLOWED]
    assert offenders == [], "private names imported from another module:\n" + "\n".join(offenders)
    stale = PRIVATE_IMPORTS_ALLOWED - {(file, name) for file, _, name, _ in found}
    assert not stale, f"allowed private imports no longer made (remove them from the allow-set): {stale}"


def test_the_private_import_scan_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "mstfx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    (pkg / "sub" / "__init__.py").write_text("from . import _own_private_module\n")  # its own: allowed
    (pkg / "sub" / "a.py").write_text("from __future__ import annotations\n_x = 1\n")
    (pkg / "sub" / "b.py").write_text(
        "from .a import _x\nfrom mstfx import __version__\n"
        "def f():\n    from mstfx.sub.a import _x as y, public\n    return y\n"
        "from mstfx.sub.b import _self_ok\nfrom os.path import _joinrealpath\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert _private_imports() == [("mstfx/sub/b.py", 1, "_x", "mstfx.sub.a"), ("mstfx/sub/b.py", 4, "_x", "mstfx.sub.a")]
