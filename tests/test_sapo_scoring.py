"""One judge context: SAPO's draft reward scores a step as the reasoner does (same chat framing, same
verdict prompt, same KV-cached verification), on the tiny random pair."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_SETTINGS
from dreamr.cache import CachedSequence
from dreamr.config import ReasonerConfig
from dreamr.prompts import SYSTEM_PROMPT, chat_messages
from dreamr.verify import StepVerifier
from training import SAPOConfig, SAPOTrainer
from training.scoring import StepScorer
from test_verify import naive_cpn

QUESTION = "Natalia sold clips to 48 of her friends in April."


def test_scorer_equals_full_forwards_after_the_chat_prompt(tok_a, target_model):
    """Each step's cpn is the target's verdict after the chat-framed question, the steps before it, the
    step and the verdict prompt (one cached sequence; here recomputed with a full forward per step)."""
    scorer = StepScorer(StepVerifier(target_model, tok_a))
    steps = ["Step 1: 48 in April.\n\n", "Step 2: 24 in May.\n\n", "The answer is 72."]
    scores = scorer.score(QUESTION, steps)
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)
    v = scorer.verifier
    pos, neg = v.verdict_ids
    text = tok_a.apply_chat_template(chat_messages(QUESTION, SYSTEM_PROMPT), tokenize=False, add_generation_prompt=True)
    ids = tok_a.encode(text, add_special_tokens=False)
    assert scorer.context(QUESTION)[0] == ids
    for step, got in zip(steps, scores):
        step_ids = tok_a.encode(step, add_special_tokens=False)
        want = naive_cpn(target_model, ids + step_ids + v.suffix_ids(step), pos, neg)
        assert got == pytest.approx(want, abs=1e-6)  # cpn_verify stores float32
        ids += step_ids
    assert scorer.score(QUESTION, []) == []
    with pytest.raises(ValueError, match="question"):
        scorer.score("", steps)
    with pytest.raises(ValueError, match="steps"):
        scorer.score(QUESTION, "one string")
    with pytest.raises(ValueError, match="verifier"):
        StepScorer(object())


def test_the_rewards_cpn_of_a_step_equals_the_reasoners(reasoner, target_model, tok_a, draft_model, tok_b):
    """The reasoner (mode speculative, alpha 0: every drafted step is committed) judges its draft's steps;
    SAPO's draft reward, built by the trainer from the same ReasonerConfig, gives each of those steps the
    same cpn after the same prefix. The old framing ("Question: ...\\nAnswer:") gives other values."""
    result = reasoner.generate(chat_messages(QUESTION), alpha=0.0)
    steps = [s.text for s in result.steps]
    want = [s.cpn for s in result.steps]
    assert len(steps) >= 2 and all(s.source == "draft" and s.accepted for s in result.steps)

    config = SAPOConfig(group_size=2, dtype="float64",
                        reasoner=ReasonerConfig(temperature=1.0, alpha=0.0, **TINY_SETTINGS))
    tr = SAPOTrainer(draft_model, tok_b, target_model, tok_a, data=[{"question": QUESTION, "answer": "72"}],
                     config=config, progress=False)
    got = tr.reward.draft.scores(QUESTION, steps)  # what the reward reduces (after split_steps in __call__)
    assert got == pytest.approx(want, abs=1e-12)
    # the plain prompt the reward used before reads another context, and judges otherwise
    v = tr.reward.draft.scorer.verifier
    seq = CachedSequence(target_model, tok_a.encode(f"Question: {QUESTION}\nAnswer:", add_special_tokens=True))
    old = [v.verify(seq, tok_a.encode(s, add_special_tokens=False), s, commit=True)[0] for s in steps]
    assert max(abs(a - b) for a, b in zip(old, want)) > 1e-4


def test_the_judge_flags_resolve_as_the_reasoners_from_pretrained():
    """--verdict-head auto is the head shipped for a built-in target (as from_pretrained's default), none
    for a local folder; 'none' turns it off; a folder is taken as given."""
    import argparse

    from dreamr.verify import shipped_head_dir
    from training.scoring import add_judge_args, judge_config, resolve_verdict_head

    assert resolve_verdict_head("auto", "gemma-3-270m") == shipped_head_dir("gemma-3-270m") is not None
    assert resolve_verdict_head("auto", "/some/local/target") is None
    assert resolve_verdict_head("none", "gemma-3-270m") is None and resolve_verdict_head(None, "x") is None
    assert resolve_verdict_head("/a/head", "gemma-3-270m") == "/a/head"
    p = argparse.ArgumentParser()
    add_judge_args(p)
    cfg = judge_config(p.parse_args(["--verdict-head", "none", "--calibrate"]), "gemma-3-270m", alpha=0.8)
    assert cfg.verdict_head is None and cfg.calibrate and cfg.alpha == 0.8
