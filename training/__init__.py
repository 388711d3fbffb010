"""SAPO (Speculative Alignment Policy Optimization): train a draft model with GRPO so that the target
accepts its reasoning steps (METHOD.md, section 3).

* :mod:`training.rewards` - outcome, draft (CPN acceptance) and length rewards, each a TRL-style
  ``reward(prompts, completions, **kwargs) -> list[float]`` callable; :func:`extract_answer` and
  :func:`answers_match`, the one answer extractor shared with evaluation.
* :mod:`training.grpo` - group advantages, the clipped objective, the k3 KL.
* :mod:`training.data` - JSONL loading and validation.
* :mod:`training.trainer` - :class:`SAPOConfig` and :class:`SAPOTrainer`.
* ``training/train_sapo.py`` - the command line (``torchrun`` for data parallelism).
"""

from training.rewards import (DraftReward, LengthReward, OutcomeReward, SAPOReward, answers_match,  # noqa: F401
                              extract_answer, split_steps)
from training.grpo import grpo_loss, group_advantages, kl_k3, token_logprobs  # noqa: F401
from training.data import Dataset, Example, load_jsonl, validate_rows  # noqa: F401
from training.trainer import Rollout, SAPOConfig, SAPOTrainer, check_text_exchange  # noqa: F401
