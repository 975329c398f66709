"""Finding a model's repeated blocks: the list of structurally identical layers to compile one by one.

By structure, not by class name: any ``nn.ModuleList`` / ``nn.Sequential`` of two or more children with
the same submodule types and the same parameter and buffer shapes qualifies, so a new architecture
needs no entry anywhere.  Both per-block programs (:mod:`.compile` under ``mstfx.compile`` and
:mod:`.buckets` under ``mstfx.transform``) start here.
"""

from __future__ import annotations

import torch


class NoRepeatedBlocksError(ValueError):
    """The model has no list of at least two structurally identical blocks to compile one by one."""


def _structure(module: torch.nn.Module) -> tuple:
    """What makes two blocks interchangeable for one compiled graph: the types of all submodules (by
    path) and the names, shapes and dtypes of all parameters and buffers."""
    mods = tuple((name, type(m)) for name, m in module.named_modules())
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers())
    return mods, params, buffers


def _repeated(container: torch.nn.Module) -> bool:
    children = list(container.children())
    if len(children) < 2 or len(children) != len(container):
        return False
    first = _structure(children[0])
    return any(True for _ in children[0].parameters()) and all(_structure(c) == first for c in children[1:])


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The model's repeated blocks: ``(path, container)`` of the ``nn.ModuleList`` or ``nn.Sequential``
    of at least two structurally identical children (same types, same parameter shapes) that is not
    inside another such list (a layer's experts are not the layers) and, of those, the longest (then the
    one with the most parameters).  Raises :class:`NoRepeatedBlocksError` when there is none."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and _repeated(m)]
    outer = [(name, m) for name, m in found
             if not any(other != name and name.startswith(other + ".") for other, _ in found)]
    if not outer:
        raise NoRepeatedBlocksError(
            f"per_block: {type(model).__name__} has no nn.ModuleList or nn.Sequential of two or more blocks of "
            "identical structure; compile it whole (per_block=False)")

    def size(item):
        return len(item[1]), sum(p.numel() for p in item[1].parameters())

    return max(outer, key=size)


def blocks_owner(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module that runs the blocks at ``path`` (a decoder's body: embedding, attention mask, final
    norm), or None when that is the model itself (the blocks sit directly on it).  Both per-block
    programs run this module eagerly: traced, it would build the full B×1×S×S attention mask that
    Hugging Face's eager code skips for causal attention, and hand it to every block graph."""
    owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else None
    return owner if owner is not model else None
