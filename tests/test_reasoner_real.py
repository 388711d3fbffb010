"""The real default pair (gemma-3-270m judges, SmolLM2-135M-Instruct drafts) on a GSM8K problem.

Slow (model loading, then CPU decoding): run with ``pytest --runslow`` or ``DREAMR_RUN_SLOW=1``. The
first run converts the GGUF weights into the cache (minutes); later runs load in about a second each.
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
SETTINGS = dict(max_new_tokens=96, max_step_tokens=48, answer_marker="The answer is")


def gsm8k_prompt(index: int = 0):
    item = json.loads(DATA.read_text().splitlines()[index])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["question"]}]


@pytest.fixture(scope="module")
def real():
    from dreamr.reasoner import SpeculativeReasoner

    return SpeculativeReasoner.from_pretrained(dtype="float32", progress=False, **SETTINGS)


def test_gsm8k_problem_end_to_end(real):
    result = real.generate(gsm8k_prompt(0))
    assert result.steps and result.finish_reason in ("eos", "answer", "length")
    assert not real.same_tokenizer  # gemma and SmolLM2 tokenizers differ: steps re-tokenized
    for step in result.steps:  # every step was verified and its cpn recorded
        assert step.cpn is not None and (math.isnan(step.cpn) or 0.0 <= step.cpn <= 1.0)
        assert step.accepted == (step.source == "draft")
    m = result.metrics
    assert m.verified_steps == m.num_steps == len(result.steps)
    assert m.committed_tokens <= SETTINGS["max_new_tokens"]
    assert result.text == "".join(s.text for s in result.steps)
    json.dumps(result.to_dict())


def test_deterministic_with_fixed_seed(real):
    kw = dict(temperature=0.7, top_p=0.9, seed=123, max_new_tokens=48)
    a = real.generate(gsm8k_prompt(1), **kw)
    b = real.generate(gsm8k_prompt(1), **kw)
    assert [(s.text, s.source, s.cpn) for s in a.steps] == [(s.text, s.source, s.cpn) for s in b.steps]


def test_alpha_ends_reproduce_single_model_texts(real):
    prompt = gsm8k_prompt(2)
    kw = dict(max_new_tokens=48)
    assert real.generate(prompt, alpha=0.0, **kw).text == real.generate(prompt, mode="draft", **kw).text
    assert real.generate(prompt, alpha=1.0, **kw).text == real.generate(prompt, mode="target", **kw).text


def test_self_draft_pair_shares_weights_and_keeps_alpha_ends():
    """The second default pair: SmolLM2-135M-Instruct drafted by its own first layers."""
    from dreamr.reasoner import SpeculativeReasoner

    r = SpeculativeReasoner.from_pretrained(draft="self", dtype="float32", progress=False, **SETTINGS)
    assert r.same_tokenizer  # steps pass as token ids, no re-tokenization
    target_ptrs = {p.data_ptr() for p in r.target.model.parameters()}
    assert {p.data_ptr() for p in r.draft.model.parameters()} <= target_ptrs  # no second copy
    prompt, kw = gsm8k_prompt(3), dict(max_new_tokens=32)
    assert r.generate(prompt, alpha=0.0, **kw).text == r.generate(prompt, mode="draft", **kw).text
    assert r.generate(prompt, alpha=1.0, **kw).text == r.generate(prompt, mode="target", **kw).text
    result = r.generate(prompt, **kw)
    assert all(s.cpn is not None for s in result.steps)
