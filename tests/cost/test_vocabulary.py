"""The typed vocabulary: every spelling the command lines and JSON accept parses to one member and
prints back the same; a bad spelling is refused with the valid ones named; no torch is needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mstfx.vocabulary import Action, ChunkForm, Mode, Program

#: the planner's spelling, ``mstfx simulate``'s, and what the mode turns on (mst, checkpointing, offload)
MODES = [
    ("standard", "standard", (False, False, False)),
    ("checkpointing", "ckpt", (False, True, False)),
    ("mst", "mst", (True, False, False)),
    ("mst+checkpointing", "mst+ckpt", (True, True, False)),
    ("mst+checkpointing+offload", "mst+ckpt+offload", (True, True, True)),
]


@pytest.mark.parametrize("long, short, flags", MODES)
def test_mode_round_trips_both_spellings(long, short, flags):
    mode = Mode.parse(long)
    assert Mode.parse(short) is mode and Mode.parse(mode) is mode
    assert str(mode) == long == mode and mode.short == short
    assert (mode.chunked, mode.checkpointed, mode.offloaded) == flags
    assert Mode.of(*flags) is mode
    assert json.loads(json.dumps({"mode": mode})) == {"mode": long}


def test_every_mode_is_listed():
    assert [m.value for m in Mode] == [long for long, _, _ in MODES]
    assert set(Mode.spellings()) == {s for long, short, _ in MODES for s in (long, short)}


@pytest.mark.parametrize("bad", ["ckpt+offload", "offload", "mst+", "MST", "", None, 3, "checkpointing+mst"])
def test_a_bad_mode_names_the_valid_spellings(bad):
    with pytest.raises(ValueError, match=r"mode must be one of standard, checkpointing, mst, .*mst\+ckpt\+offload; got"):
        Mode.parse(bad)


def test_offload_without_mst_and_checkpointing_is_not_a_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        Mode.of(chunked=False, checkpointed=True, offloaded=True)


@pytest.mark.parametrize("word, spellings", [
    (Program, ("eager", "compiled", "compiled-per-block")),
    (ChunkForm, ("loop", "unrolled")),
    (Action, ("chunked", "rewritten", "skipped")),
])
def test_words_round_trip_and_refuse_bad_spellings(word, spellings):
    assert word.spellings() == spellings
    for text in spellings:
        member = word.parse(text)
        assert str(member) == text == member and word.parse(member) is member
        assert json.dumps(member) == json.dumps(text)
    with pytest.raises(ValueError, match="must be one of " + ", ".join(spellings) + "; got 'nope'"):
        word.parse("nope")


def test_program_flags():
    assert [(p.compiled, p.per_block) for p in Program] == [(False, False), (True, False), (True, True)]


def test_chunk_form_error_names_the_option():
    with pytest.raises(ValueError, match="^chunk_form must be one of loop, unrolled"):
        ChunkForm.parse("rolled")


def test_kind_is_a_word_of_the_vocabulary():
    from mstfx.regions.registry import REGION_KINDS, Kind
    from mstfx.vocabulary import Word

    assert issubclass(Kind, Word) and Kind.spellings() == tuple(k.name for k in REGION_KINDS)
    assert Kind.parse("mlp") is Kind.MLP and str(Kind.LM_HEAD) == "lm_head"
    with pytest.raises(ValueError, match="kind must be one of lm_head, .*mlp; got 'mpl'"):
        Kind.parse("mpl")


def test_imports_without_torch():
    # imported on its own (not through the mstfx package, whose __init__ brings the backend)
    out = subprocess.run([sys.executable, "-c", "import importlib.util, sys; "
                          "spec = importlib.util.spec_from_file_location('vocab', sys.argv[1]); "
                          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                          "m.Mode.parse('mst+ckpt'); print('torch' in sys.modules)",
                          __import__("mstfx.vocabulary").vocabulary.__file__], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_report_decision_takes_the_action_member_not_a_spelling():
    """Passes hand :class:`Action` members; a spelling is refused where it is made, not parsed later."""
    from mstfx.passes.report import RegionDecision

    decision = RegionDecision("mlp", "model.layers.0.mlp", Action.CHUNKED, "S×I intermediates", chunks=4)
    assert decision.row()[2] == "chunked"
    with pytest.raises(TypeError, match="must be an Action member"):
        RegionDecision("mlp", "model.layers.0.mlp", "chunked", "S×I intermediates")
