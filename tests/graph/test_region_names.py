"""Region names are module paths as the user's model names them, whatever wrappers Dynamo (a
``torch.compile``d module: ``_orig_mod``, ``_torchdynamo_inline``, ``__self__``) or PEFT (modules reached
through ``__dict__['_modules']``) put around them: a name from the report works in ``region_chunks``."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import mstfx
from mstfx.passes.common import module_path

PEFT = "__dict__['_modules']['base_model'].__dict__['_modules']['model']"


@pytest.mark.parametrize("dynamo_path, name", [
    ("L['self'].model.layers.0.mlp", "model.layers.0.mlp"),
    ("L['original'].__self__.model.layers.0.mlp", "model.layers.0.mlp"),
    ("L['original']._torchdynamo_inline.__self__.model.layers.0.mlp", "model.layers.0.mlp"),
    ("L['self']._orig_mod.model.layers.0.mlp", "model.layers.0.mlp"),
    (f"L['original'].__self__.{PEFT}.model.layers.0.mlp", "base_model.model.model.layers.0.mlp"),
    (f"L['original']._torchdynamo_inline.__self__.{PEFT}.model.layers.0.mlp", "base_model.model.model.layers.0.mlp"),
    ("L['self']._modules['model']._modules['layers']._modules['0'].mlp", "model.layers.0.mlp"),
    ("L['self'].model.layers[3].mlp", "model.layers.3.mlp"),
    ("G['net'].__self__.blocks.0", "blocks.0"),
])
def test_module_path_drops_wrapper_segments(dynamo_path, name):
    g = fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(torch.relu, (x,))
    node.meta["nn_module_stack"] = {"outer": ("L['self']", nn.Module), "inner": (dynamo_path, nn.Module)}
    assert module_path(node) == name
    assert module_path(node, strip_leaf=True) == name.rsplit(".", 1)[0]


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].mlp = _MLP()

    def forward(self, x):
        return self.model.layers[0].mlp(x)


class _Forwarding(nn.Module):
    """Holds ``inner`` as ``attr`` and forwards unknown attributes to it, as PEFT's wrappers do (Dynamo
    then reaches the inner modules through ``__dict__['_modules']``)."""

    def __init__(self, attr: str, inner: nn.Module, call):
        super().__init__()
        setattr(self, attr, inner)
        self._attr, self._call = attr, call

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules[self.__dict__["_attr"]], name)

    def forward(self, *args):
        return self._call(self)(*args)


def _peft_like(model: nn.Module) -> nn.Module:
    lora = _Forwarding("model", model, lambda m: m.model.forward)
    return _Forwarding("base_model", lora, lambda m: m.base_model.model)


@pytest.mark.parametrize("wrap", ["peft", "compiled", "compiled peft"])
def test_region_names_through_wrappers_are_the_user_module_paths(wrap):
    torch.manual_seed(0)
    user_model = _peft_like(_Model()) if "peft" in wrap else _Model()
    name = "base_model.model.model.layers.0.mlp" if "peft" in wrap else "model.layers.0.mlp"
    assert name in dict(user_model.named_modules())
    given = torch.compile(user_model) if "compiled" in wrap else user_model
    original = given.forward  # as mstfx.transform calls the model it is given

    be = mstfx.backend(compiler="eager", region_chunks={name: 3})
    x = torch.randn(2, 12, 16)
    out = torch.compile(lambda t: original(t), backend=be, dynamic=False)(x)
    torch.testing.assert_close(out, user_model(x))
    decisions = [d for r in be.reports for d in r.decisions if d.kind == "mlp"]
    assert [(d.where, d.chunks) for d in decisions] == [(name, 3)], mstfx.explain(be)
