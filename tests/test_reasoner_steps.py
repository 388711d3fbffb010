"""dreamr.steps: where a step ends, the final-answer marker, and the one step splitter."""

from __future__ import annotations

import pytest

from dreamr.steps import StepWriter, ends_step, has_answer, split_steps


def test_ends_step():
    assert ends_step("The sum is 4.\n\n", "\n\n")
    assert not ends_step("\n\n", "\n\n")  # leading blank lines do not make a step
    assert not ends_step("\n\nThe sum", "\n\n")
    assert ends_step("\n\nThe sum is 4.\n\n", "\n\n")
    assert not ends_step("The sum is 4.\n", "\n\n")
    assert ends_step("a ### b", "###")


def test_has_answer():
    assert has_answer("#### 72", "####") and not has_answer("72", "####") and not has_answer("#### 72", None)


def test_step_writer_ends_at_delimiter_eos_and_cap(tok_a):
    eos = {tok_a.eos_token_id}
    ids = tok_a.encode("Step 1: 2 + 2 = 4.\n\nStep 2", add_special_tokens=False)
    w = StepWriter(tok_a, eos, "\n\n", 100)
    ends = [w.add(t) for t in ids]
    cut = ends.index("delimiter")
    assert all(e is None for e in ends[:cut])
    assert w.text.startswith("Step 1: 2 + 2 = 4.\n\n")

    w = StepWriter(tok_a, eos, "\n\n", 100)
    assert w.add(ids[0]) is None and w.add(tok_a.eos_token_id) == "eos"
    assert w.content_ids == ids[:1] and w.ids == [ids[0], tok_a.eos_token_id] and w.end == "eos"

    w = StepWriter(tok_a, eos, "\n\n", 3)
    assert [w.add(t) for t in ids[:3]] == [None, None, "cap"] and w.content_ids == ids[:3]


def test_split_steps_keeps_delimiters_and_never_makes_a_blank_step():
    assert split_steps("a\n\nb\n\n\n\nc") == ["a\n\n", "b\n\n\n\n", "c"]
    assert split_steps("\n\nThe sum is 4.\n\n") == ["The sum is 4.\n\n"]  # a leading blank piece is dropped
    assert split_steps("x ### y", "###") == ["x ###", " y"]
    assert split_steps("") == [] and split_steps("  \n\n ") == [] and split_steps(None) == []
    text = "Step 1: 2 + 2 = 4.\n\nStep 2: 4 * 3 = 12.\n\nThe answer is 12."
    steps = split_steps(text)
    assert "".join(steps) == text and len(steps) == 3
    # every piece but the last ends a step by the same rule the writers use
    assert all(ends_step(s, "\n\n") for s in steps[:-1]) and not ends_step(steps[-1], "\n\n")
    with pytest.raises(ValueError, match="delimiter"):
        split_steps("a", "")
