"""The TRL anchor: SAPO's rewards as ``reward_funcs`` of ``trl.GRPOTrainer``, one GRPO step on the tiny pair.

Skipped where TRL (and its ``datasets``) is not installed; dreamr does not depend on it. Checked with
trl 1.16.0 and datasets 4.7.0 beside transformers 5.24 (datasets 5.2.0 with pyarrow 24-26 fails to hash
any dataset here: "Can't pickle <class 'MonthDayNano'>").
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import build_tokenizer, tiny_llama, tiny_qwen2  # noqa: E402
from dreamr.verify import StepVerifier  # noqa: E402
from training.rewards import DraftReward, reward_funcs  # noqa: E402
from training.scoring import StepScorer  # noqa: E402


class Recorder:
    """A reward function that remembers what TRL passed it."""

    def __init__(self, func):
        self.func, self.__name__, self.calls = func, func.__name__, []

    def __call__(self, prompts, completions, **kwargs):
        out = self.func(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, kwargs, out))
        return out


def test_one_grpo_trainer_step_with_sapos_rewards(tmp_path):
    torch.manual_seed(0)
    tok_t, tok_d = build_tokenizer(400), build_tokenizer(330, reverse=True, bos=False)
    draft, target = tiny_qwen2(tok_d).float(), tiny_llama(tok_t).float()
    scorer = StepScorer(StepVerifier(target, tok_t))
    # mean cpn: random judges give each completion another reward, so the step has a gradient
    funcs, weights = reward_funcs(scorer, mode="mean", length_max_steps=1, length_max_tokens=6)
    funcs = [Recorder(f) for f in funcs]
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April."}], "answer": "72"}])
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
                          logging_steps=1, save_strategy="no", reward_weights=weights, temperature=0.9,
                          dataloader_num_workers=0)
    before = {n: p.detach().clone() for n, p in draft.named_parameters()}
    trainer = trl.GRPOTrainer(model=draft, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok_d)
    trainer.train()
    log = trainer.state.log_history[0]
    assert [f.__name__ for f in funcs] == ["outcome_reward", "draft_reward", "length_reward"]
    prompts, completions, kwargs, drafted = funcs[1].calls[0]
    assert len(completions) == 4 and kwargs["answer"] == ["72"] * 4 and len(kwargs["completion_ids"]) == 4
    # TRL's reward is SAPO's: the same draft reward recomputed on what TRL passed, in its log
    again = DraftReward(scorer, mode="mean")(prompts, completions)
    assert again == pytest.approx(drafted, abs=1e-12) and len(set(drafted)) > 1
    assert log["rewards/draft_reward/mean"] == pytest.approx(sum(drafted) / 4, abs=1e-6)
    assert any(not torch.equal(before[n], p) for n, p in draft.named_parameters())  # the step moved the draft
