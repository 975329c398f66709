"""Read and check a model config given by name or path: the one reader of ``mstfx plan`` and ``mstfx simulate``.

Both commands accept the same things (``--config`` or its alias ``--model``): a built-in name (the
embedded real-model configs and the small presets), a ``config.json`` path, a model directory, or a
name in the local Hugging Face cache (never downloaded).  A bad one is a :class:`ConfigError` that
names the file and the field, so both commands report it the same way (exit code 2).

No torch or transformers import here except for the Hugging Face cache lookup and the ``model_type``
check, both when a config is read (``--help`` stays fast).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..config import is_positive_int
from . import ALIASES, NAMES, config_text

#: small configs known by name (HF config fields; ``reference`` is the benchmark's Llama)
PRESETS: dict[str, dict] = {
    "reference": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=8,
                      vocab_size=32000, model_type="llama"),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, model_type="gpt2", tie_word_embeddings=True),
}

#: size fields: (spellings, required).  Each present one must be a positive integer.
SIZE_FIELDS: list[tuple[tuple[str, ...], bool]] = [
    (("hidden_size", "n_embd", "d_model"), True),
    (("num_hidden_layers", "n_layer", "num_layers"), True),
    (("num_attention_heads", "n_head"), True),
    (("vocab_size",), True),
    (("intermediate_size", "n_inner", "ffn_dim"), False),
    (("num_key_value_heads",), False),
    (("head_dim",), False),
]


class ConfigError(ValueError):
    """A model config that cannot be used: unknown name, unreadable file, not a JSON object, an unknown
    ``model_type``, a size field that is missing or not a positive integer, or head counts that do not
    divide.  The message names the file and the field."""


def names() -> list[str]:
    """Every built-in name (presets first, then the embedded real-model configs)."""
    return sorted(PRESETS) + list(NAMES)


def read(source: str) -> tuple[dict, str]:
    """``(config dict, label)`` of a built-in name, a config.json path, a model directory or a cached
    Hugging Face name; the label names where it came from (for messages)."""
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"a config is a name or a path, got {type(source).__name__}")
    path = os.fspath(source)
    if path.lower() in PRESETS:
        return dict(PRESETS[path.lower()]), f"built-in {path.lower()!r}"
    text = config_text(path)
    if text is not None:
        return _parse(text, f"built-in {ALIASES[path.lower()]!r}"), f"built-in {ALIASES[path.lower()]!r}"
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                text = f.read()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
        return _parse(text, path), path
    try:  # a name in the local Hugging Face cache (never downloads)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, local_files_only=True).to_dict(), path
    except Exception:  # noqa: BLE001 - any failure means "not a usable name"
        pass
    if path.endswith(".json") or path.startswith((os.sep, ".", "~")):
        raise ConfigError(f"cannot read config {path}: no such file (built-in names: {', '.join(names())})")
    raise ConfigError(
        f"unknown model or config {path!r}: no such file, and not a built-in name ({', '.join(names())}) "
        "nor a model in the local Hugging Face cache; give a config.json path or one of those names"
    )


def _parse(text: str, label: str) -> dict:
    if not text.strip():
        raise ConfigError(f"config {label} is empty (expected a Hugging Face config.json object)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config {label} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {label} is a JSON {type(data).__name__}, not an object: a Hugging Face config.json is one "
            "object of fields such as hidden_size"
        )
    return data


def flatten(d: dict) -> dict:
    """A multimodal config's ``text_config`` merged into the top level (the language model's sizes)."""
    inner = d.get("text_config")
    if isinstance(inner, dict):
        return {**inner, **{k: v for k, v in d.items() if k != "text_config"}}
    return d


def check(d: dict, label: str, *, require_model_type: bool = False, known_model_type: bool = True) -> dict:
    """``d`` (flattened) if it describes a model both ``mstfx plan`` and ``mstfx simulate`` can use; else
    a :class:`ConfigError` that names ``label`` and the field.  The one check of a model config:

    * ``model_type``: required if ``require_model_type`` (simulate builds the model from it); when
      given and ``known_model_type``, one transformers knows (a config object already built, e.g. a
      model's own, is not asked: pass ``known_model_type=False``);
    * every size field (:data:`SIZE_FIELDS`) a positive integer;
    * the heads: without ``head_dim``, hidden a multiple of the attention heads; the attention heads a
      multiple of the key/value heads (grouped-query attention).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"config {label} is a {type(d).__name__}, not a mapping of fields")
    d = flatten(d)
    model_type = d.get("model_type")
    if model_type is None and require_model_type:
        raise ConfigError(f"config {label}: field 'model_type' is missing (is it a Hugging Face config.json?)")
    if model_type is not None and known_model_type:
        _check_model_type(model_type, label)
    found = {}
    for spellings, required in SIZE_FIELDS:
        present = [k for k in spellings if d.get(k) is not None]
        if not present:
            if required:
                raise ConfigError(f"config {label}: field {' / '.join(spellings)} is missing")
            continue
        key = present[0]
        value = d[key]
        if not is_positive_int(value):
            raise ConfigError(f"config {label}: field {key!r} must be a positive integer, got {value!r}")
        found[spellings[0]] = (key, value)
    (hkey, hidden), (nkey, heads) = found["hidden_size"], found["num_attention_heads"]
    if "head_dim" not in found and hidden % heads:
        raise ConfigError(
            f"config {label}: {hkey} {hidden} is not a multiple of {nkey} {heads}; each head is hidden / heads "
            "wide unless head_dim says otherwise (fix the sizes, or give head_dim)"
        )
    if "num_key_value_heads" in found and heads % found["num_key_value_heads"][1]:
        raise ConfigError(
            f"config {label}: {nkey} {heads} is not a multiple of num_key_value_heads "
            f"{found['num_key_value_heads'][1]} (each key/value head serves a whole group of attention heads)"
        )
    return d


def _check_model_type(model_type: Any, label: str) -> None:
    """A :class:`ConfigError` unless transformers knows ``model_type`` (its own or a registered one).  The
    message is short: how many types there are, the close matches, and what to do."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers is a dependency; without it nothing is known
        return
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    import difflib

    import transformers

    known = list(CONFIG_MAPPING.keys())
    close = difflib.get_close_matches(str(model_type), known, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(repr(c) for c in close)}" if close else "no close match"
    raise ConfigError(
        f"config {label}: unknown model_type {model_type!r}: transformers {transformers.__version__} knows "
        f"{len(known)} model types ({hint}); fix model_type, or pass the model's own config.json (--config "
        "PATH) with a model_type transformers knows"
    )


def load(source: Any) -> tuple[dict, str]:
    """:func:`read` then :func:`check`: the checked, flattened dict and its label."""
    d, label = read(source)
    return check(d, label), label


__all__ = ["ConfigError", "PRESETS", "SIZE_FIELDS", "check", "flatten", "load", "names", "read"]
