"""SAPO (Speculative Alignment Policy Optimization): train a draft model with GRPO so that the target
accepts its reasoning steps (``docs/method.md``, SAPO).

* :mod:`training.rewards` - outcome, draft (CPN acceptance) and length rewards, each a TRL-style
  ``reward(prompts, completions, **kwargs) -> list[float]`` callable; :func:`reward_funcs` gives them with
  their weights for ``trl.GRPOTrainer``. Answers come from :mod:`dreamr.answers`, steps from
  :func:`dreamr.steps.split_steps`.
* :mod:`training.scoring` - the target's cpn of each step, judged in the reasoner's own context.
* :mod:`training.grpo` - group advantages, log-probabilities under the sampling distribution, the clipped
  objective, the k3 KL.
* :mod:`training.data` - JSONL loading and validation, the prompt (the one of evaluation and the CLI).
* :mod:`training.trainer` - :class:`SAPOConfig` (which embeds the reasoner's config) and :class:`SAPOTrainer`.
* ``training/train_sapo.py`` - the command line (``torchrun`` for data parallelism).
"""

from training.rewards import DraftReward, LengthReward, OutcomeReward, SAPOReward, reward_funcs  # noqa: F401
from training.grpo import grpo_loss, group_advantages, kl_k3, sampling_logits, token_logprobs  # noqa: F401
from training.data import Dataset, Example, load_jsonl, validate_rows  # noqa: F401
from training.scoring import StepScorer, verifier_for  # noqa: F401
from training.trainer import Rollout, SAPOConfig, SAPOTrainer, check_text_exchange  # noqa: F401
