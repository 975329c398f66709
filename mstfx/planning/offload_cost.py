"""Cost of keeping checkpoints in host memory: host bytes (pinned), GPU bytes left, PCIe time per step.

The offload mode is MsT + checkpointing whose checkpoints (each checkpointed layer's input, one
tokens×hidden tensor per layer) live in host memory between the forward and their layer's recompute.
On the GPU it leaves at most :data:`RESIDENT_CHECKPOINTS` of them (compiled on CUDA: the layer being
recomputed and the next one, prefetched; eager: the one being recomputed); in host memory it adds all of them, in pinned (page-locked) buffers so the
copies can run asynchronously.  Each checkpoint crosses PCIe twice a step (out in forward, back in
backward); at a bandwidth the user states that is a time, shown beside the recompute FLOPs.
Pure arithmetic on sympy expressions of S and B, as the rest of the cost model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import sympy as sp

from ..vocabulary import Mode, Program

#: the offload mode (the planner spells it ``mst+checkpointing+offload``, ``mstfx simulate`` ``mst+ckpt+offload``)
OFFLOAD_MODE = Mode.MST_CHECKPOINTING_OFFLOAD
#: checkpoints on the GPU at once in backward, per program: compiled, the one being recomputed and the
#: next, prefetched (AOT autograd's reload prefetch); eager, the one being recomputed (``save_on_cpu``
#: reloads a checkpoint when its layer's backward unpacks it)
RESIDENT_CHECKPOINTS = {Program.COMPILED: 2, Program.EAGER: 1}
#: PCIe bandwidth (GB/s = 1e9 bytes/s, each direction) used when none is given: a stated assumption,
#: not a measurement (PCIe 4.0 x16 is 32 GB/s raw per direction; pinned copies reach about 25)
DEFAULT_PCIE_GBPS = 25.0
#: bytes per parameter the host keeps for an optimizer whose state is offloaded: ``offload``, AdamW's
#: fp32 moments and fp32 master weights (4 + 4 + 4); ``zero-offload`` (DeepSpeed ZeRO-Offload, simulate
#: only) also the fp32 gradients the optimizer steps with
HOST_STATE_BYTES_PER_PARAM = {"offload": 12, "zero-offload": 16}


def is_offload(mode: Mode | str) -> bool:
    return Mode.parse(mode).offloaded


def checkpoints_on_gpu(layers: int, mode: Mode | str, program: Program | str = Program.COMPILED) -> int:
    """Checkpoints the GPU holds at once: every layer's, or with offload the resident ones only."""
    return min(layers, RESIDENT_CHECKPOINTS[Program.parse(program)]) if is_offload(mode) else layers


def checkpoint_bytes(hidden: int, layers: int, act_bytes: int, S: sp.Symbol, B: sp.Symbol) -> sp.Expr:
    """Bytes of all checkpoints: one B×S×hidden tensor per checkpointed layer."""
    return layers * B * S * hidden * act_bytes


def host_state_bytes(n_params: int, optimizer_setup: str) -> int:
    """Optimizer state kept in host memory by ``optimizer_setup`` (0 for setups that keep it on the GPU)."""
    return HOST_STATE_BYTES_PER_PARAM.get(optimizer_setup, 0) * n_params


def transfer_seconds(nbytes: float, pcie_gbps: float = DEFAULT_PCIE_GBPS) -> float:
    """Time on PCIe of one step's copies of ``nbytes`` of checkpoints: out in forward, back in backward
    (each direction at ``pcie_gbps``; overlapped with compute when the copies run on their own stream)."""
    return 2 * float(nbytes) / (check_gbps(pcie_gbps) * 1e9)


def check_gbps(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < math.inf):
        raise ValueError(f"pcie_gbps must be a positive, finite bandwidth in GB/s, got {value!r}")
    return float(value)
