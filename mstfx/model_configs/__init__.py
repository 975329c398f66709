"""Hugging Face config.json files of real models that mstfx knows by name (no downloads).

One source for ``mstfx simulate --model NAME`` and ``mstfx plan --config NAME``.
"""

from __future__ import annotations

from importlib import resources

#: accepted spellings -> file stem
ALIASES = {
    "llama3-8b": "llama3-8b",
    "llama-3-8b": "llama3-8b",
    "llama2-7b": "llama2-7b",
    "llama-2-7b": "llama2-7b",
    "mistral-7b": "mistral-7b",
    "qwen2-7b": "qwen2-7b",
    "gemma2-9b": "gemma2-9b",
    "gemma-2-9b": "gemma2-9b",
}
NAMES = ("llama3-8b", "llama2-7b", "mistral-7b", "qwen2-7b", "gemma2-9b")


def config_text(name: str) -> str | None:
    """The config.json text of an embedded model, or None when ``name`` is not one of them."""
    key = ALIASES.get(name.lower())
    if key is None:
        return None
    return resources.files(__name__).joinpath(f"{key}.json").read_text()
