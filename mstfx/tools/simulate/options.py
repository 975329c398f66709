"""What ``mstfx simulate`` takes: its modes, optimizer setups and model names, the error for bad
input, and :func:`load_config` (a built-in name, a cached Hugging Face name or a config file)."""

from __future__ import annotations

from pathlib import Path

from ... import model_configs
from ...vocabulary import Mode


GiB = 1 << 30
#: GPUs that share one host (the host memory per node sums theirs; ``planning.cost_model.GPUS_PER_NODE``)
GPUS_PER_NODE = 8

#: the modes as this tool spells them (its ``--modes``, tables and JSON: ``Mode.short``); every function
#: here also takes a :class:`~mstfx.vocabulary.Mode` or the planner's spelling
MODES = tuple(m.short for m in Mode)
MODE_LABELS = {
    Mode.STANDARD: "standard",
    Mode.CHECKPOINTING: "activation checkpointing",
    Mode.MST: "MsT",
    Mode.MST_CHECKPOINTING: "MsT + checkpointing",
    Mode.MST_CHECKPOINTING_OFFLOAD: "MsT + checkpointing + offload",
}

#: name -> (bytes per parameter of optimizer state (+ fp32 master weights) on the GPU,
#:          gradients kept until the step (False: freed as made, optimizer in backward), description)
OPTIMIZERS: dict[str, tuple[float, bool, str]] = {
    "adamw": (8.0, True, "AdamW, fp32 states (2×4 B/param), bf16 weights and grads, no fp32 master"),
    "adamw-master": (12.0, True, "AdamW, fp32 states + fp32 master weights (12 B/param)"),
    "adamw-bf16": (4.0, True, "AdamW, bf16 states (2×2 B/param)"),
    "offload": (0.0, True, "AdamW, states and master weights offloaded to CPU"),
    "zero-offload": (0.0, False, "DeepSpeed ZeRO-Offload (ALST's setup): states, master weights and gradients "
                     "offloaded to CPU, each gradient copied out as it is made"),
    "paper": (4.0, False, "MsT paper: bf16 weights, one Adam per param stepped in a post-accumulate-grad hook, bf16 states, grads freed as made"),
}

MODEL_ALIASES = model_configs.ALIASES
EMBEDDED_MODELS = model_configs.NAMES

#: The name the simulated FlashAttention is registered under in transformers' attention and mask registries
#: (:func:`.attention.flash_sim_attention`) and set as the fake model's ``_attn_implementation``; a name with
#: "flash" in it makes HF look for a hub kernel.
ATTN_NAME = "mstfx_sim_attention"


class SimulateError(ValueError):
    """Bad input to the simulator (unknown model, unreadable config, impossible GPU size...)."""


def load_config(model: str | None = None, config_path: str | None = None):
    """A transformers ``PretrainedConfig`` from a built-in name or a config path (``--model`` and
    ``--config`` accept the same things, read and checked as ``mstfx plan`` does:
    ``mstfx/model_configs/source.py``)."""
    from transformers import AutoConfig

    from ...model_configs import source

    if (model is None) == (config_path is None):
        raise SimulateError("give exactly one of --model or --config (a built-in name or a config.json path)")
    given = model if model is not None else config_path
    try:
        data, label = source.read(given)
        source.check(data, label, require_model_type=True)  # the checks mstfx plan makes, and model_type
    except source.ConfigError as err:
        raise SimulateError(str(err)) from None
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except Exception as err:
        text = str(err) if len(str(err)) <= 500 else str(err)[:500] + " ..."
        raise SimulateError(f"config {label}: transformers cannot build a {model_type!r} config: {text}") from None
    cfg._mstfx_name = MODEL_ALIASES.get(given.lower(), Path(given).stem) if isinstance(given, str) else Path(given).stem
    return cfg
