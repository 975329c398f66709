"""Aten-level passes that run inside Inductor, chained by the backend into Inductor's custom-pass hooks:
``joint_custom_pre_pass`` (the joint graph, before the partition: :mod:`.checkpoint_outputs`) and
``post_grad_custom_post_pass`` (after it: :mod:`.partial_sum_order`, then :mod:`.bias_grad_order`).

The torch-level passes that find and rewrite regions are in :mod:`mstfx.passes`; these only decide
what Inductor saves and in which order it runs what the rewrite produced.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx

from ..compat.inductor import custom_graph_pass_api

CustomGraphPass, get_hash_for_files = custom_graph_pass_api()

_aten = torch.ops.aten

#: reshapes a gradient passes through on its way into an accumulation (same elements, new shape)
RESHAPES = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.squeeze.dim,
                      _aten.squeeze.dims})

#: matmuls of a 2-D weight (a linear and its gradients)
DENSE_MATMULS = frozenset({_aten.mm.default, _aten.addmm.default})
#: matmuls of stacked weights (one per batch entry or expert): batched and grouped
BATCHED_MATMULS = frozenset({_aten.bmm.default, _aten.baddbmm.default}
                            | {getattr(_aten, n).default for n in ("_grouped_mm", "_scaled_grouped_mm") if hasattr(_aten, n)})


def through(node, targets) -> object:
    """``node`` with every producer among ``targets`` (view ops) skipped: the tensor it is a view of."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets:
        node = node.args[0]
    return node


class ChainedPass(CustomGraphPass):
    """An mstfx pass in one of Inductor's custom-pass slots, then ``then`` (the pass the user had set)."""

    def __init__(self, then: CustomGraphPass | None = None) -> None:
        self.then = then

    def run(self, graph: fx.Graph) -> None:
        raise NotImplementedError

    def __call__(self, graph: fx.Graph) -> None:
        self.run(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        # Inductor's FX graph cache keys on this: the hash of the pass's file, so an edited pass never
        # reuses code compiled by an older one
        # (and of this module, whose helpers the passes share)
        own = get_hash_for_files((inspect.getfile(type(self)), __file__))
        if self.then is None:
            return own
        inner = self.then.uuid() if hasattr(self.then, "uuid") else None
        return None if inner is None else (own, inner)  # None: the user's pass is not cacheable
