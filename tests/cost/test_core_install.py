"""The compiler pass installs with torch and sympy alone: no tools extra, no transformers.

Each check runs in a fresh interpreter where importing the tools extra's packages (rich, tqdm,
matplotlib) and transformers fails, as on a ``pip install mstfx`` without extras.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"rich", "tqdm", "matplotlib", "transformers"}:
                raise ImportError(f"{name} is not installed (blocked by the test)")
            return None
    sys.meta_path.insert(0, Block())
    import importlib.util
    _find = importlib.util.find_spec
    importlib.util.find_spec = lambda n, *a: None if n.split(".")[0] in {"rich", "tqdm", "matplotlib", "transformers"} else _find(n, *a)
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=600)


def test_backend_compiles_a_plain_model_without_extras():
    out = _run("""
        import torch, torch.nn as nn, torch.nn.functional as F
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(64, 16); self.up = nn.Linear(16, 64); self.down = nn.Linear(64, 16)
                self.head = nn.Linear(16, 64, bias=False)
            def forward(self, ids):
                h = self.emb(ids); h = h + self.down(F.gelu(self.up(h)))
                return F.cross_entropy(self.head(h).view(-1, 64), ids.view(-1))
        torch.manual_seed(0)
        net = Net(); ids = torch.randint(0, 64, (1, 32))
        ref = net(ids)
        import mstfx
        loss = torch.compile(net, backend=mstfx.backend(mini_sequences=2, compiler="aot_eager"))(ids)
        torch.testing.assert_close(loss, ref)
        report = mstfx.explain()
        print("mlp chunked" if "mlp" in report and "lm_head" in report else report)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mlp chunked" in out.stdout, out.stdout


def test_plan_prints_a_plain_table_and_simulate_names_the_extra():
    out = _run("""
        import mstfx
        from mstfx.cli import main
        print(mstfx.plan("llama3-8b", 65536, 80, optimizer="adamw-bf16"))
        print("exit", main(["simulate", "--model", "llama3-8b", "--gpu-gb", "80"]))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "predicted peak vs budget" in out.stdout and "exit 2" in out.stdout
    assert 'pip install "mstfx[tools]"' in out.stderr


def test_planning_core_imports_no_torch():
    """The planning core (config, rules, region kinds' cost side, cost model, planner) plans Llama3-8B in a
    process where importing torch fails."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import importlib.abc, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is not importable here (blocked by the test)")
                return None
        sys.meta_path.insert(0, NoTorch())
        import mstfx
        p = mstfx.plan("llama3-8b", 65536, 80, optimizer="adamw-bf16")
        assert "torch" not in sys.modules
        print(p.mode, p.fits, sorted(p.mini_sequences))
    """)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "True" in out.stdout and "mlp" in out.stdout, out.stdout
