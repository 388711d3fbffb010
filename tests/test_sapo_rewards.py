"""SAPO rewards on constructed cases: answers, CPN acceptance from a controllable tiny target, length."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tokenizer
from dreamr.answers import answers_match, extract_answer
from dreamr.steps import split_steps
from training.rewards import DraftReward, LengthReward, OutcomeReward, SAPOReward, reward_funcs
from training.scoring import StepScorer

# -- answer extraction (the library's, dreamr.answers, which SAPO's outcome reward uses) ------------------


@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 18", "18"),
    ("The answer is 18.", "18"),
    ("So she paid $18.00 in total.", "18"),
    ("The total is 1,234 apples.", "1234"),
    ("#### $1,234.50", "1234.5"),
    ("The temperature fell to -5 degrees. The answer is -5", "-5"),
    ("answer: 0.25", "0.25"),
    ("The final answer is \\boxed{42}.", "42"),
    ("#### 7\nthen 12 more words and 99", "7"),  # the marker wins over later numbers
    ("first 3 then 4", "4"),  # plain-number fallback: the last number
    ("no number here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_match():
    assert answers_match("#### 18", "18")
    assert answers_match("The answer is 18.", "$18.00")
    assert answers_match("1,234", "Explanation...\n#### 1234")
    assert answers_match("-3.50", "-3.5")
    assert not answers_match("18", "19")
    assert not answers_match("-18", "18")
    assert not answers_match(None, "18")
    assert not answers_match("no answer", "18")


def test_split_steps():
    assert split_steps("a\n\nb\n\nc") == ["a\n\n", "b\n\n", "c"]
    assert split_steps("a\n\n\n\nb\n\n") == ["a\n\n\n\n", "b\n\n"]
    assert split_steps("  \n\n") == []
    assert split_steps("one step") == ["one step"]


# -- outcome ----------------------------------------------------------------------------------------------


def test_outcome_reward_correct_and_wrong_standard_and_conversational():
    r = OutcomeReward()
    completions = ["2 + 2 = 4.\n\n#### 4", "2 + 2 = 5.\n\n#### 5", "I do not know."]
    assert r(["q"] * 3, completions, answer=["... #### 4"] * 3) == [1.0, 0.0, 0.0]
    conv = [[{"role": "assistant", "content": c}] for c in completions]
    assert r([[{"role": "user", "content": "q"}]] * 3, conv, answer=["4"] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        r(["q"], ["#### 4"])


# -- length -----------------------------------------------------------------------------------------------


def test_length_reward_penalises_steps_and_tokens_beyond_budget():
    r = LengthReward(max_steps=2, max_tokens=10)
    short = "one two\n\nthree"  # 2 steps, 3 words
    long_steps = "a\n\nb\n\nc"  # 3 steps: 1 over a budget of 2 -> 0.5, tokens within
    long_both = "\n\n".join(["w w w w w"] * 4)  # 4 steps (1.0 over), 20 words (1.0 over)
    assert r(["q"] * 3, [short, long_steps, long_both]) == [0.0, -0.25, -1.0]
    # token counts from completion_ids (TRL passes them) win over words
    assert r(["q"], [short], completion_ids=[list(range(15))]) == [-0.25]
    assert r.penalty(100, 1000) == -1.0  # capped
    with pytest.raises(ValueError, match="max_steps"):
        LengthReward(max_steps=0)


# -- draft (CPN acceptance) with a controllable target -----------------------------------------------------

GOOD, BAD = " right", " wrong"


def controllable_target(tokenizer, strength: float = 60.0):
    """A 1-layer Llama whose verdict depends on how many "right" tokens the context holds.

    Queries and keys are zero, so attention is uniform over the context; values and output are the
    identity; the MLP is off. Every token embeds as e1 except "right" tokens, which add 10 * e0. The LM
    head rows of the positive verdict tokens are ``strength * e0`` and all other rows are zero, so a
    context without "right" has logit 0 for every verdict token (cpn = |P| / (|P| + |N|)) and a
    context with "right" pushes cpn to about 1.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from dreamr.verify import build_verdict_token_ids

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    pos, _neg = build_verdict_token_ids(tokenizer, ["Yes"], ["No"])
    good = set(tokenizer.encode(GOOD, add_special_tokens=False))
    with torch.no_grad():
        emb = torch.zeros_like(model.model.embed_tokens.weight)
        emb[:, 1] = 1.0
        for t in good:
            emb[t, 0] = 10.0
        model.model.embed_tokens.weight.copy_(emb)
        layer = model.model.layers[0]
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.k_proj.weight.zero_()
        layer.self_attn.v_proj.weight.copy_(torch.eye(8))
        layer.self_attn.o_proj.weight.copy_(torch.eye(8))
        layer.mlp.down_proj.weight.zero_()
        head = torch.zeros_like(model.lm_head.weight)
        for t in pos:
            head[t, 0] = strength
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def judge():
    """The controllable target's scorer, judging in the reasoner's context (chat framing, system prompt)."""
    from dreamr.verify import StepVerifier

    tok = build_tokenizer(400)
    # strength 200: attention is uniform, and the chat context (system prompt) dilutes the step's "right"s
    scorer = StepScorer(StepVerifier(controllable_target(tok, strength=200.0), tok, alpha=0.7))
    context = scorer.context("Q")[0] + scorer.verifier.suffix_ids(".\n\n")
    assert not set(tok.encode(GOOD, add_special_tokens=False)) & set(context)  # only the step says "right"
    return scorer


def test_controllable_target_scores_steps_above_and_below_alpha(judge):
    pos, neg = judge.verifier.verdict_ids
    neutral = len(pos) / (len(pos) + len(neg))
    assert neutral <= 0.7  # a step without "right" is rejected at alpha 0.7
    good, bad = judge.score("Q", [GOOD * 3 + ".\n\n"]), judge.score("Q", [BAD * 3 + ".\n\n"])
    assert good[0] > 0.99 and bad[0] == pytest.approx(neutral, abs=1e-6)


def test_draft_reward_fraction_and_mean(judge):
    accepted, rejected = GOOD * 3 + ".\n\n", BAD * 3 + ".\n\n"
    completions = [accepted + accepted, rejected + rejected, rejected + accepted, ""]
    r = DraftReward(judge, mode="fraction")
    out = r(["Q"] * 4, completions)
    assert out == [1.0, 0.0, 0.5, 0.0]
    assert [len(c) for c in r.last_cpns] == [2, 2, 2, 0]
    pos, neg = judge.verifier.verdict_ids
    neutral = len(pos) / (len(pos) + len(neg))
    mean = DraftReward(judge, mode="mean")(["Q"] * 2, completions[:2])
    assert mean[0] > 0.99 and mean[1] == pytest.approx(neutral, abs=1e-6)
    # alpha is the acceptance threshold: below the neutral score every step passes
    assert DraftReward(judge, alpha=neutral - 0.01)(["Q"], [rejected]) == [1.0]
    with pytest.raises(ValueError, match="mode"):
        DraftReward(judge, mode="max")


class FixedJudge:
    """A verifier stand-in: cpn of a step = the number it contains / 10."""

    alpha = 0.7

    def score(self, question, steps, images=None):
        return [float(extract_answer(s)) / 10 for s in steps]


def test_sapo_reward_weighted_sum_and_zero_weight_skips_component():
    judge = FixedJudge()
    comp = ["9\n\n8\n\n#### 4", "1\n\n#### 5"]
    reward = SAPOReward(OutcomeReward(), DraftReward(judge), LengthReward(max_steps=2, max_tokens=100), (1.0, 2.0, 4.0))
    parts = reward.components(["q", "q"], comp, answer=["4", "4"])
    assert parts["outcome"] == [1.0, 0.0]
    assert parts["draft"] == pytest.approx([2 / 3, 0.0])  # steps 0.9, 0.8 accepted; 0.4, 0.1, 0.5 not
    assert parts["length"] == [-0.25, 0.0]
    assert reward(["q", "q"], comp, answer=["4", "4"]) == pytest.approx([1 + 4 / 3 - 1.0, 0.0])
    no_draft = SAPOReward(OutcomeReward(), None, LengthReward(), (1.0, 0.0, 1.0))
    assert no_draft.components(["q"], ["#### 4"], answer=["4"])["draft"] == [0.0]
    with pytest.raises(ValueError, match="weights"):
        SAPOReward(OutcomeReward(), None, LengthReward(), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="draft weight"):
        SAPOReward(OutcomeReward(), None, LengthReward(), (1.0, 1.0, 1.0))


class Float32Judge:
    """A verifier stand-in whose every step gets the float32 cpn ``value`` (as the kernels store it)."""

    alpha = 0.85

    def __init__(self, value):
        self.value = float(torch.tensor(value, dtype=torch.float32))

    def score(self, question, steps, images=None):
        return [self.value] * len(steps)


def test_draft_reward_accepts_by_the_kernels_rule():
    """A float32 cpn of 0.85 is 0.8500000238 as a double, above 0.85; the kernels compare in float32 and
    reject it (dreamr.reference.accepts_value), and so does the reward."""
    at = Float32Judge(0.85)
    assert at.value > 0.85  # what `cpn > alpha` in double would accept
    assert DraftReward(at, alpha=0.85)(["q"], ["a step\n\n"]) == [0.0]
    assert DraftReward(Float32Judge(0.8501), alpha=0.85)(["q"], ["a step\n\n"]) == [1.0]
    assert DraftReward(Float32Judge(float("nan")), alpha=0.0)(["q"], ["a step\n\n"]) == [0.0]
    with pytest.raises(ValueError, match="scorer"):
        DraftReward(object())


def test_reward_funcs_for_trl_are_the_weighted_components():
    judge = FixedJudge()
    comp = ["9\n\n8\n\nThe answer is 4.", "1\n\nThe answer is 5."]
    funcs, weights = reward_funcs(judge, alpha=0.7, length_max_steps=2, length_max_tokens=100, weights=(1.0, 2.0, 4.0))
    assert [f.__name__ for f in funcs] == ["outcome_reward", "draft_reward", "length_reward"] and weights == [1.0, 2.0, 4.0]
    parts = [f(["q", "q"], comp, answer=["4", "4"], completion_ids=[[1] * 5, [1] * 3]) for f in funcs]
    sapo = SAPOReward(OutcomeReward(), DraftReward(judge), LengthReward(max_steps=2, max_tokens=100), (1.0, 2.0, 4.0))
    assert [sum(w * p[i] for w, p in zip(weights, parts)) for i in range(2)] == pytest.approx(
        sapo(["q", "q"], comp, answer=["4", "4"], completion_ids=[[1] * 5, [1] * 3]))
    no_draft, w = reward_funcs(None, weights=(1.0, 0.0, 1.0))
    assert [f.__name__ for f in no_draft] == ["outcome_reward", "length_reward"] and w == [1.0, 1.0]
    with pytest.raises(ValueError, match="scorer"):
        reward_funcs(None)
