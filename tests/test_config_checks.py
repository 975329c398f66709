"""MstConfig checks its fields when it is made and whenever one is set later; the model-config checks
that ``mstfx plan`` and ``mstfx simulate`` share."""

from __future__ import annotations

import pytest

import mstfx


def test_deprecated_lm_head_chunks_conflicting_with_mini_sequences_is_refused():
    with pytest.raises(ValueError, match=r"lm_head_chunks=4.*mini_sequences\['lm_head'\]=8"), \
            pytest.warns(DeprecationWarning):
        mstfx.MstConfig(lm_head_chunks=4, mini_sequences={"lm_head": 8})
    with pytest.warns(DeprecationWarning):  # the same M twice is no conflict; an int M for all kinds neither
        assert mstfx.MstConfig(lm_head_chunks=4, mini_sequences={"lm_head": 4}).lm_head_chunks == 4
        assert mstfx.MstConfig(lm_head_chunks=4, mini_sequences=8).mini_sequences == 8


@pytest.mark.parametrize("field, bad", [
    ("mini_sequences", 0), ("mini_sequences", {"mlp": 1000}), ("mini_sequences", {"nonsense": 2}),
    ("compiler", "tvm"), ("chunk_form", "spiral"), ("chunk_mlp", "yes"), ("min_lm_head_chunk_tokens", 0),
    ("region_chunks", {"model.layers.0.mlp": -1}), ("skip_kinds", ("nonsense",)),
])
def test_fields_set_after_construction_are_checked_and_left_unchanged(field, bad):
    cfg = mstfx.MstConfig()
    before = getattr(cfg, field)
    with pytest.raises(ValueError):
        setattr(cfg, field, bad)
    assert getattr(cfg, field) == before


def test_fields_set_after_construction_are_normalised_and_cross_checked():
    cfg = mstfx.MstConfig()
    cfg.skip_kinds = ["mlp"]
    assert cfg.skip_kinds == ("mlp",)  # normalised as at construction
    cfg.offload_checkpoints = True
    with pytest.raises(ValueError, match="offload_checkpoints"):
        cfg.compiler = "eager"  # the pair is checked, not only the field
    assert cfg.compiler == "inductor"
    cfg.mini_sequences = {"lm_head": 8}
    with pytest.raises(ValueError, match="lm_head_chunks"), pytest.warns(DeprecationWarning):
        cfg.lm_head_chunks = 4
    assert cfg.lm_head_chunks is None
    cfg.chunk_form = "unrolled"  # a good value is taken
    assert cfg.chunk_form == "unrolled"
