"""dreamr.steps: where a step ends, and the final-answer marker."""

from __future__ import annotations

from dreamr.steps import StepWriter, ends_step, has_answer


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
