"""What ``transform`` does to a model's outputs is documented where users read: its docstring and the
README's section on it (with labels the logits are None)."""

from __future__ import annotations

from pathlib import Path

import mstfx


def test_transform_docstring_says_logits_are_none_with_labels():
    doc = " ".join(mstfx.transform.__doc__.split())
    assert "logits=None" in doc and "labels" in doc and "chunked_logprobs" in doc


def test_readme_transform_section_says_logits_are_none_with_labels():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("## Use it")
    section = readme[start:readme.index("\n## ", start + 1)]
    assert "logits=None" in section and "labels" in section
