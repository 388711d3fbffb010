"""The real default pair (gemma-3-270m judges, SmolLM2-135M-Instruct drafts) on GSM8K problems.

Slow (model loading, then CPU decoding): run with ``pytest --runslow`` or ``DREAMR_RUN_SLOW=1``. The
first run converts the GGUF weights into the cache (minutes); later runs load in about a second each.

The step cap is small (24 tokens) so that a modest budget spans several steps. The runs below were
picked from measured verdicts (float32, greedy): on problem 0 the gemma judge gives SmolLM2's steps
cpn 0.73-0.77, so alpha 0.755 accepts the first drafted step and rejects the next ones, and the target
writes those steps (a fallback across two tokenizers, the draft catching up on re-tokenized text). These
small models do not finish a problem within an affordable CPU budget (both keep writing past the answer),
so the runs end by length; the draft-only run reaches a step that ends at the blank-line delimiter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent.parent / "examples" / "gsm8k_dev_sample.jsonl"
SYSTEM = ("Solve the problem step by step. Write each step as one short paragraph and leave a blank line "
          "between steps. End with 'The answer is N.'")
SETTINGS = dict(max_new_tokens=72, max_step_tokens=24, answer_marker="The answer is")


def gsm8k_prompt(index: int = 0):
    item = json.loads(DATA.read_text().splitlines()[index])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["question"]}]


@pytest.fixture(scope="module")
def real():
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner.from_pretrained(dtype="float32", progress=False, **SETTINGS)


def structure(result):
    return [(s.text, s.num_tokens) for s in result.steps]


def test_gsm8k_problem_end_to_end_with_accepted_and_target_steps(real):
    assert not real.same_tokenizer  # gemma and SmolLM2 tokenizers differ: steps re-tokenized
    engine = real.engine("speculative")
    seen = []
    engine.observer = lambda t_seq, d_seq: seen.append((list(t_seq.ids), list(d_seq.ids)))
    try:
        result = real.generate(gsm8k_prompt(0), alpha=0.755)
    finally:
        engine.observer = None
    steps = result.steps
    assert len(steps) >= 3 and result.finish_reason == "length"
    assert {s.source for s in steps} == {"draft", "target"}  # some accepted, some written by the target
    for step in steps:  # every step was verified and its (finite) cpn recorded
        assert step.cpn is not None and math.isfinite(step.cpn) and 0.0 <= step.cpn <= 1.0
        assert step.accepted == (step.source == "draft") == (step.cpn > 0.755)
        if step.accepted:
            assert step.rejected_text is None and step.rejected_num_tokens is None
        else:  # the rejected draft step is kept, and differs from what the target wrote
            assert step.rejected_text and step.rejected_num_tokens >= 1 and step.rejected_text != step.text
        assert 1 <= step.num_tokens <= SETTINGS["max_step_tokens"]
    m = result.metrics
    assert m.verified_steps == m.num_steps == len(steps) and m.accepted_steps == sum(s.accepted for s in steps)
    assert m.target_tokens == sum(s.num_tokens for s in steps if s.source == "target") > 0
    assert m.committed_tokens == sum(s.num_tokens for s in steps) <= SETTINGS["max_new_tokens"]
    assert m.nonfinite_verdicts == 0
    assert result.text == "".join(s.text for s in steps)
    # after each step both models hold the committed text, each in its own tokens (the draft caught up on
    # the target's steps through re-tokenization, and the target on the draft's)
    t_prompt, d_prompt = len(seen[0][0]) - len(real.target.encode_text(steps[0].text)), None
    for i, (t_ids, d_ids) in enumerate(seen):
        text = "".join(s.text for s in steps[:i + 1])
        assert real.target.tokenizer.decode(t_ids[t_prompt:]) == text
        assert real.draft.tokenizer.decode(d_ids)[-len(text):] == text
    data = json.loads(json.dumps(result.to_dict()))
    assert [s["rejected_text"] for s in data["steps"]] == [s.rejected_text for s in steps]


def test_deterministic_with_fixed_seed(real):
    prompt = gsm8k_prompt(0)
    a = real.generate(prompt)  # greedy, the same request twice in one process
    b = real.generate(prompt)
    assert [(s.text, s.source, s.cpn, s.num_tokens) for s in a.steps] == \
           [(s.text, s.source, s.cpn, s.num_tokens) for s in b.steps]
    kw = dict(temperature=0.7, top_p=0.9, seed=123)  # sampled: the seed fixes both models' draws
    a, b = real.generate(prompt, **kw), real.generate(prompt, **kw)
    assert len(a.steps) >= 2
    assert [(s.text, s.source, s.cpn, s.num_tokens) for s in a.steps] == \
           [(s.text, s.source, s.cpn, s.num_tokens) for s in b.steps]


def test_alpha_ends_reproduce_single_model_texts_and_steps(real):
    prompt = gsm8k_prompt(0)
    # alpha 0: every step the draft's; six steps, the last ending at the blank-line delimiter
    drafted, draft_only = real.generate(prompt, alpha=0.0, max_new_tokens=144), \
        real.generate(prompt, mode="draft", max_new_tokens=144)
    assert len(drafted.steps) >= 3 and structure(drafted) == structure(draft_only)
    assert drafted.text == draft_only.text and all(s.accepted for s in drafted.steps)
    assert any(s.text.endswith("\n\n") for s in drafted.steps)  # a step ended at the delimiter
    # alpha 1: every step the target's (each drafted step verified, then rejected)
    written, target_only = real.generate(prompt, alpha=1.0), real.generate(prompt, mode="target")
    assert len(written.steps) >= 3 and structure(written) == structure(target_only)
    assert written.text == target_only.text and not any(s.accepted for s in written.steps)
    assert all(math.isfinite(s.cpn) for s in written.steps)


def test_self_draft_pair_shares_weights_and_keeps_alpha_ends():
    """The second default pair: SmolLM2-135M-Instruct drafted by its own first layers."""
    from dreamr.reasoner import SpeculativeReasoner

    r = SpeculativeReasoner.from_pretrained(draft="self", dtype="float32", progress=False, **SETTINGS)
    assert r.same_tokenizer  # steps pass as token ids, no re-tokenization
    target_ptrs = {p.data_ptr() for p in r.target.model.parameters()}
    assert {p.data_ptr() for p in r.draft.model.parameters()} <= target_ptrs  # no second copy
    prompt = gsm8k_prompt(3)
    drafted, draft_only = r.generate(prompt, alpha=0.0), r.generate(prompt, mode="draft")
    assert len(drafted.steps) >= 3 and structure(drafted) == structure(draft_only)
    written, target_only = r.generate(prompt, alpha=1.0), r.generate(prompt, mode="target")
    assert len(written.steps) >= 3 and structure(written) == structure(target_only)
    result = r.generate(prompt)
    assert all(s.cpn is not None and math.isfinite(s.cpn) for s in result.steps)
