"""The real default pair (gemma-3-270m judges, SmolLM2-135M-Instruct drafts) on GSM8K problems.

Slow (model loading, then CPU decoding): run with ``pytest --runslow`` or ``DREAMR_RUN_SLOW=1``. The
first run converts the GGUF weights into the cache (minutes); later runs load in about a second each.

The step cap is small (24 tokens) so that a modest budget spans several steps. The runs below were
picked from measured verdicts (float32, greedy): on problem 0 the gemma judge gives SmolLM2's steps
cpn 0.73-0.77, so alpha 0.755 accepts the first drafted step and rejects the next ones, and the target
writes those steps (a fallback across two tokenizers, the draft catching up on re-tokenized text). These
small models do not finish a problem within an affordable CPU budget (both keep writing past the answer),
so the runs end by length; the draft-only run reaches a step that ends at the blank-line delimiter.
Those measured verdicts are the target's own Yes/No verdict, so the ``real`` pair states its judge
(``verdict_head=None``); the pair loaded with the defaults judges with the head dreamr ships for
gemma-3-270m (``dreamr/heads/gemma-3-270m/``), tested on its own below.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent.parent / "examples" / "gsm8k_dev_sample.jsonl"
SYSTEM = ("Solve the problem step by step. Write each step as one short paragraph and leave a blank line "
          "between steps. End with 'The answer is N.'")
# every step drafted and judged (mode "speculative"'s adaptive drafting would write some alone, and at a
# fixed alpha = 1 all of them); the main job below runs with its default
SETTINGS = dict(max_new_tokens=72, max_step_tokens=24, answer_marker="The answer is", draft_policy="always")
MAIN_JOB = dict(max_new_tokens=256, max_step_tokens=64, alpha=0.7, draft_policy=None)  # None: the mode's default
"""The settings of ``python -m dreamr --gsm8k 0`` (its defaults)."""


def gsm8k_prompt(index: int = 0):
    item = json.loads(DATA.read_text().splitlines()[index])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["question"]}]


@pytest.fixture(scope="module")
def real():
    from dreamr.reasoner import SpeculativeReasoner

    # the raw judge (the target's Yes/No verdict): the verdicts the runs below were picked from
    return SpeculativeReasoner.from_pretrained(dtype="float32", progress=False, verdict_head=None, **SETTINGS)


@pytest.fixture(scope="module")
def headed():
    """The default pair as the CLI loads it: the built-in target judges with its shipped verdict head."""
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner.from_pretrained(dtype="float32", progress=False, **SETTINGS)


def structure(result):
    return [(s.text, s.num_tokens) for s in result.steps]


def loops(text: str) -> bool:
    """A repetition loop, as SmolLM2 writes once it degenerates: some run of four words occurs three
    times or more ("the amount of money she makes from the amount of money she makes from ...")."""
    words = re.findall(r"[a-z']+", text.lower())
    runs = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    return bool(runs) and max(runs.values()) >= 3


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
    head = r.verdict_head(r.config)  # the built-in target judges with the head dreamr ships for it
    assert head is not None and head.meta["target"]["name"] == "smollm2-135m-instruct"
    assert r.verifier_for(r.config).calibrate == head.calibrated
    target_ptrs = {p.data_ptr() for p in r.target.model.parameters()}
    assert {p.data_ptr() for p in r.draft.model.parameters()} <= target_ptrs  # no second copy
    prompt = gsm8k_prompt(3)
    drafted, draft_only = r.generate(prompt, alpha=0.0), r.generate(prompt, mode="draft")
    assert len(drafted.steps) >= 3 and structure(drafted) == structure(draft_only)
    written, target_only = r.generate(prompt, alpha=1.0), r.generate(prompt, mode="target")
    assert len(written.steps) >= 3 and structure(written) == structure(target_only)
    result = r.generate(prompt)
    assert all(s.cpn is not None and math.isfinite(s.cpn) for s in result.steps)


def test_main_job_with_the_shipped_head(headed, real):
    """``python -m dreamr --gsm8k 0`` as the CLI runs it: the shipped, calibrated head judges each drafted
    step by the target's hidden state at the verdict position minus the null step's at the same prefix
    (checked against a plain-PyTorch recomputation from fresh prefills), and accepts no repetition loop."""
    from dreamr.cache import CachedSequence

    head = headed.verdict_head(headed.config)
    assert head is not None and head.calibrated and head.meta["target"]["name"] == "gemma-3-270m"
    assert real.verdict_head(real.config) is None  # verdict_head=None: the raw judge
    verifier = headed.verifier_for(headed.config)
    assert verifier.head is head and verifier.calibrate
    engine = headed.engine("speculative")
    seen = []
    engine.observer = lambda t_seq, d_seq: seen.append(list(t_seq.ids))
    prompt = gsm8k_prompt(0)
    try:
        result = headed.generate(prompt, **MAIN_JOB)
    finally:
        engine.observer = None
    steps = result.steps
    assert steps and len(seen) == len(steps) and result.metrics.nonfinite_verdicts == 0
    assert result.metrics.verified_steps >= 1  # adaptive drafting (the default) may write some steps alone
    model, prefix = headed.target.model, headed.target.encode_prompt(prompt)
    for step, after in zip(steps, seen):
        if step.accepted is None:  # written by the target alone: nothing was judged
            assert step.source == "target" and step.cpn is None
            prefix = after
            continue
        drafted = step.text if step.accepted else step.rejected_text  # the step the head judged
        ids = headed.target.encode_text(drafted)
        hidden = CachedSequence(model, prefix).last_hidden(ids + verifier.suffix_ids(drafted))
        null = CachedSequence(model, prefix).last_hidden(verifier.null_ids())
        assert step.cpn == pytest.approx(float(head.reference_cpn(hidden, null)[0]), abs=1e-4)
        assert step.accepted == (step.cpn > MAIN_JOB["alpha"]) and step.alpha == MAIN_JOB["alpha"]
        assert not (step.accepted and loops(step.text))
        prefix = after
    assert result.metrics.accepted_steps < result.metrics.verified_steps  # the head rejects some drafted steps


def test_shipped_head_rejects_the_repetition_loops_the_raw_judge_accepts(real, headed):
    """The main job with the raw judge, drafting every step, accepts SmolLM2's repetition loops (cpn about
    0.75 > 0.7); the shipped head, judging those same steps after the same committed text, rejects every
    one. (Adaptive drafting, the default, may have the target write those steps alone instead.)"""
    from dreamr.cache import CachedSequence

    prompt = gsm8k_prompt(0)
    raw = real.generate(prompt, **dict(MAIN_JOB, draft_policy="always"))
    looped = [s for s in raw.steps if s.accepted and loops(s.text)]
    assert looped  # the failure the head is there for
    verifier = headed.verifier_for(headed.config)
    seq = CachedSequence(headed.target.model, headed.target.encode_prompt(prompt))
    verdicts = []
    for step in raw.steps:  # the raw run's committed text, step by step, judged by the head
        cpn, accepted = verifier.verify(seq, headed.target.encode_text(step.text), step.text,
                                        alpha=MAIN_JOB["alpha"], commit=True)
        verdicts.append((step, cpn, accepted))
    assert all(not accepted for step, _, accepted in verdicts if step in looped), \
        [(s.text[:60], cpn) for s, cpn, _ in verdicts]
