"""SAPO trainer: GRPO for the draft model with rewards from the target (docs/method.md, SAPO).

One optimizer step:

1. take ``batch_prompts`` prompts (global, over all processes; each process takes its contiguous share);
2. sample ``group_size`` completions per prompt from the draft (step-structured: the system prompt asks
   for steps separated by blank lines; completions are split into steps at the delimiter);
3. score them: ``R = w1 * R_outcome + w2 * R_draft + w3 * R_length`` (:mod:`training.rewards`), the
   draft reward from the target's CPN verdicts on every step;
4. group-normalised advantages, then the clipped GRPO objective with optional k3 KL to a frozen
   reference (:mod:`training.grpo`), averaged over all completion tokens of the global batch, with
   gradient accumulation over micro-batches of ``micro_batch_prompts`` prompts, gradient clipping, and
   AdamW; ``num_iterations`` > 1 reuses the rollouts for several optimizer steps (as TRL's GRPO).

Log-probabilities are those of the sampling distribution (temperature and top-p applied as
``generate`` applies them, :func:`training.grpo.sampling_logits`); ``old_logp`` is recorded at rollout
time from the model that sampled, so the clipped ratio measures how far the policy has moved from the
sampler (1 on the first optimizer step of a batch, unless a bf16 copy sampled).

Determinism: the prompts of a step and the sampling seed of each prompt depend only on
``(seed, step, global prompt index)``, so a resumed run and a data-parallel run sample the same
completions as an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from dreamr.config import ReasonerConfig
from dreamr.lm import LM, decoder_of, eos_ids, split_processor
from dreamr.reference import accepts_value
from training import grpo
from dreamr.prompts import SYSTEM_PROMPT, format_answer
from dreamr.steps import split_steps
from training.data import Dataset, draft_messages, global_indices, validate_rows
from training.rewards import DraftReward, LengthReward, OutcomeReward, SAPOReward, check_weights
from training.scoring import StepScorer, verifier_for
from training.vision import VisionData

__all__ = ["SAPOConfig", "Rollout", "SAPOTrainer", "check_text_exchange"]


def _default_reasoner() -> ReasonerConfig:
    """The reasoner settings SAPO samples and judges with by default: the reasoner's own defaults
    (verdict prompt and words, alpha 0.7, a blank line between steps), sampled at temperature 1 with a
    budget of 256 tokens (GRPO needs samples; the reasoner defaults to greedy)."""
    return ReasonerConfig(temperature=1.0, max_new_tokens=256)


@dataclass
class SAPOConfig:
    """Settings of a SAPO run (the script's flags have the same names).

    Attributes
    ----------
    reasoner : dreamr.config.ReasonerConfig
        How the trained draft is sampled and judged, in the reasoner's own terms, so training and
        inference read one set of settings: ``temperature``, ``top_p`` (the sampling distribution of the
        rollouts, and the one the update's log-probabilities are taken under), ``max_new_tokens`` (the
        completion budget in draft tokens), ``alpha`` (the acceptance threshold of the draft reward; a
        number, not "auto"), ``step_delimiter``, ``verdict_template``, ``positive_words`` /
        ``negative_words``, ``calibrate`` and ``verdict_head`` (the target's verifier, as the reasoner
        builds it). ``mode``, ``window``, ``seed``, ``answer_marker`` and ``max_step_tokens`` are not used
        by training.
    group_size : G, completions per prompt (>= 2).
    batch_prompts : prompts per optimizer step, over all processes (the global batch is
        ``batch_prompts * group_size`` completions); must be a multiple of ``world_size *
        micro_batch_prompts``.
    micro_batch_prompts : prompts per forward/backward; gradient accumulation steps per process =
        ``batch_prompts / (world_size * micro_batch_prompts)``.
    total_steps : training steps (each samples one batch and makes ``num_iterations`` optimizer steps).
    lr, weight_decay, adam_betas, adam_eps, warmup_steps : AdamW and a linear warm-up, then constant.
    max_grad_norm : gradient clipping (global L2 norm); 0 disables.
    epsilon, epsilon_high : the ratio clip range ``[1 - epsilon, 1 + epsilon_high]`` (epsilon_high
        defaults to epsilon).
    beta : KL coefficient (k3 estimator against a frozen copy of the initial draft, both under the
        sampling distribution); 0 disables and loads no reference. Not with ``top_p < 1``: two nuclei
        differ in support, where the KL is infinite.
    num_iterations : optimizer steps per batch of rollouts (TRL's ``num_iterations``, PPO's epochs). The
        ratio is taken against the log-probabilities recorded when the batch was sampled, so it is 1 on
        the first step (up to the sampler's precision: a bf16 ``rollout_dtype`` copy differs) and the clip
        acts from the second on.
    loss_type : "token" (token-level averaging over the global batch) or "sequence".
    scale_advantages : divide by the group's std (False: Dr. GRPO centring only).
    weights : (w_outcome, w_draft, w_length).
    draft_reward_mode : "fraction" of accepted steps or "mean" cpn.
    length_max_steps, length_max_tokens : the budget of the length penalty.
    dtype : "float32" or "bfloat16" (bf16 autocast of forward passes, fp32 master weights and AdamW
        state), or "float64" (tests).
    rollout_dtype : None (sample from the policy as is) or "bfloat16": sample from a bf16 copy of the
        policy, refreshed every step (about 2x faster decoding on CPUs with bf16 units). The copy's own
        log-probabilities are recorded as ``old_logp``, so the ratio corrects for it (importance sampling).
    lora_r, lora_alpha, lora_dropout, lora_target_modules : LoRA via peft when ``lora_r > 0``.
    system_prompt : the system message of the conversation the draft samples from and the target judges
        in (default :data:`dreamr.prompts.SYSTEM_PROMPT`, evaluation's and the CLI's; None: no system message).
    seed, shuffle : data order and sampling seeds.
    save_every : checkpoint every N steps (0: only at the end); log_every : console log cadence.
    fsdp : with several processes, shard the policy (and the KL reference) with FSDP2 (``fully_shard``
        per decoder layer and at the root) instead of replicating it with DDP; no effect in one process.
        Not with LoRA (the adapters are small: use DDP).
    """

    reasoner: ReasonerConfig = field(default_factory=_default_reasoner)
    group_size: int = 4
    batch_prompts: int = 1
    micro_batch_prompts: int = 1
    total_steps: int = 50
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    beta: float = 0.0
    num_iterations: int = 1
    loss_type: str = "token"
    scale_advantages: bool = True
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    draft_reward_mode: str = "fraction"
    length_max_steps: int = 8
    length_max_tokens: int = 192
    dtype: str = "float32"
    rollout_dtype: Optional[str] = None
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"
    system_prompt: Optional[str] = SYSTEM_PROMPT
    seed: int = 0
    shuffle: bool = True
    save_every: int = 0
    log_every: int = 1
    fsdp: bool = False

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError naming the first bad setting (all checks run before any model work)."""
        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        rc = self.reasoner
        if not isinstance(rc, ReasonerConfig):
            raise ValueError(f"reasoner must be a dreamr.config.ReasonerConfig, got {type(rc).__name__}; build one "
                             "with ReasonerConfig(temperature=..., top_p=..., alpha=...)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size (G) must be an integer >= 2: GRPO compares completions within a group "
                             f"(a group of one has zero advantage), got {self.group_size!r}")
        for name in ("batch_prompts", "micro_batch_prompts", "total_steps", "num_iterations",
                     "length_max_steps", "length_max_tokens", "log_every"):
            integer(name, 1)
        for name in ("save_every", "warmup_steps", "lora_r", "seed"):
            integer(name, 0)
        if self.batch_prompts % (world_size * self.micro_batch_prompts):
            raise ValueError(f"batch_prompts={self.batch_prompts} must be a multiple of world_size * "
                             f"micro_batch_prompts = {world_size} * {self.micro_batch_prompts}")
        for name, lo in (("lr", 0.0), ("weight_decay", 0.0), ("max_grad_norm", 0.0), ("beta", 0.0),
                         ("epsilon", 0.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < lo:
                raise ValueError(f"{name} must be a finite number >= {lo}, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if rc.temperature <= 0:
            raise ValueError(f"reasoner.temperature must be > 0 (GRPO samples its completions), got {rc.temperature!r}")
        if rc.auto_alpha:
            raise ValueError("reasoner.alpha='auto' cannot train: the draft reward must be a fixed function of the "
                             "cpns; give the alpha the draft will be judged at (e.g. 0.7)")
        if self.beta > 0 and rc.top_p < 1:
            raise ValueError(f"beta={self.beta} with reasoner.top_p={rc.top_p}: the k3 KL between the policy's and the "
                             "reference's nucleus-truncated distributions is infinite wherever their nuclei differ; "
                             "use top_p=1 with a KL term, or beta=0")
        if self.epsilon_high is not None and (not isinstance(self.epsilon_high, (int, float)) or self.epsilon_high < 0):
            raise ValueError(f"epsilon_high must be a number >= 0 or None, got {self.epsilon_high!r}")
        if self.loss_type not in ("token", "sequence"):
            raise ValueError(f"loss_type must be 'token' or 'sequence', got {self.loss_type!r}")
        if self.draft_reward_mode not in ("fraction", "mean"):
            raise ValueError(f"draft_reward_mode must be 'fraction' or 'mean', got {self.draft_reward_mode!r}")
        if self.rollout_dtype not in (None, "bfloat16", "float32"):
            raise ValueError(f"rollout_dtype must be None, 'float32' or 'bfloat16', got {self.rollout_dtype!r}")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float64', got {self.dtype!r}")
        self.weights = check_weights(self.weights)
        if self.fsdp and self.lora_r > 0:
            raise ValueError("fsdp with LoRA (lora_r > 0) is not supported: the adapters are small and the frozen "
                             "base needs no optimizer state, so use DDP (drop fsdp), or train all weights with fsdp")


@dataclass
class Rollout:
    """One prompt's group: the prompt's draft tokens, G completions, rewards and their components."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    cpns: list[list[float]] = field(default_factory=list)  # per completion, per step
    texts: list[str] = field(default_factory=list)
    vision_inputs: Optional[dict] = None  # a vision-language draft's processor inputs for an image row
    # per completion, the log-probability ``[len(completion)]`` of each of its tokens under the sampling
    # distribution of the model that sampled it, recorded at rollout time (the ratio's denominator)
    old_logps: Optional[list[torch.Tensor]] = None


# --------------------------------------------------------------------------------------------------
# Checks before training
# --------------------------------------------------------------------------------------------------

_PROBE = "Step 1: 48 / 2 = 24 clips.\n\n" + format_answer(72)


def check_text_exchange(draft_tokenizer, target_tokenizer) -> None:
    """Raise ValueError unless the draft's text can reach the target: the draft tokenizer decodes, the
    target tokenizer encodes, and a probe step survives draft encode -> decode -> target encode."""
    for name, tok, attrs in (("draft_tokenizer", draft_tokenizer, ("encode", "decode")),
                             ("target_tokenizer", target_tokenizer, ("encode",))):
        if tok is None:
            raise ValueError(f"{name} is missing: the draft's steps are exchanged with the target as text")
        for attr in attrs:
            if not callable(getattr(tok, attr, None)):
                raise ValueError(f"{name} ({type(tok).__name__}) has no {attr}(): the draft's steps are "
                                 "exchanged with the target as text, so the draft must decode and the target encode")
    try:
        text = draft_tokenizer.decode(draft_tokenizer.encode(_PROBE, add_special_tokens=False),
                                      skip_special_tokens=True)
        ids = target_tokenizer.encode(text, add_special_tokens=False)
    except Exception as e:  # noqa: BLE001 - any failure here means no text exchange
        raise ValueError(f"draft_tokenizer/target_tokenizer cannot exchange text: {type(e).__name__}: {e}") from e
    if not isinstance(text, str) or "72" not in text or not ids:
        raise ValueError(f"draft_tokenizer/target_tokenizer cannot exchange text: the probe {_PROBE!r} came back "
                         f"as {text!r} from the draft and {len(ids) if ids else 0} target tokens")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fully_shard(model, mesh) -> None:
    """FSDP2: one shard group per decoder layer (the classes in ``_no_split_modules``), then the root
    (embeddings, final norm, LM head; a tied head shares the root's group)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:  # fall back to the decoder's layer list (the decoder as dreamr.lm finds it)
        layers = list(getattr(decoder_of(model), "layers", []) or [])
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full_tensor(t):
    """A DTensor (FSDP2) as a plain tensor; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class SAPOTrainer:
    """GRPO for the draft with SAPO rewards.

    Parameters
    ----------
    draft, draft_tokenizer : the policy (a transformers causal LM) and its tokenizer.
    target, target_tokenizer : the judge, or None when the draft weight is 0. Its verifier is built from
        ``config.reasoner`` as the reasoner builds it (:func:`training.scoring.verifier_for`); a
        :class:`dreamr.verify.StepVerifier` may be given as ``verifier`` instead.
    data : a :class:`training.data.Dataset` or a list of ``{"question", "answer"}`` rows.
    config : :class:`SAPOConfig`.
    out_dir : where logs, checkpoints and the final model go (None: nothing written).
    reward : a :class:`training.rewards.SAPOReward` to use instead of the one built from the config.

    The target judges each step as the reasoner does (:class:`training.scoring.StepScorer`: the
    question in the chat framing of evaluation and ``python -m dreamr``, with ``config.system_prompt``).

    All checks (data, G, weights, text exchange, verdict words) run in the constructor, before any
    training.
    """

    def __init__(self, draft, draft_tokenizer, target=None, target_tokenizer=None, *, data, config: SAPOConfig,
                 out_dir=None, verifier=None, reward: Optional[SAPOReward] = None,
                 progress: bool = True):
        self.rank, self.world_size = _rank_world()
        self.config = config
        config.validate(self.world_size)
        self.data = data if isinstance(data, Dataset) else validate_rows(list(data) if data is not None else [],
                                                                         source="data")
        if draft is None or not hasattr(draft, "parameters"):
            raise ValueError("draft must be a transformers causal LM (the policy to train)")
        # a vision-language model's processor (training.vision): text goes through its tokenizer
        draft_processor, draft_tokenizer = split_processor(draft_tokenizer)
        target_processor, target_tokenizer = split_processor(target_tokenizer)
        if config.weights[1] > 0 and reward is None:
            if verifier is None:
                if target is None:
                    raise ValueError("target is missing: the draft reward (weights[1] > 0) needs the target model "
                                     "(or a verifier); set the draft weight to 0 to train without it")
                check_text_exchange(draft_tokenizer, target_tokenizer)
                verifier = verifier_for(target, target_tokenizer, config.reasoner, processor=target_processor)
            else:
                check_text_exchange(draft_tokenizer, getattr(verifier, "tokenizer", draft_tokenizer))
        elif not callable(getattr(draft_tokenizer, "decode", None)):
            raise ValueError(f"draft_tokenizer ({type(draft_tokenizer).__name__}) has no decode(): completions "
                             "must be turned into text for the rewards")
        self.verifier = verifier
        self.tokenizer = draft_tokenizer
        self.draft_lm = LM(draft, draft_tokenizer, "draft", draft_processor)  # its prompt encoding
        self.vision = VisionData(self.data, draft, draft_processor, getattr(verifier, "model", target),
                                 target_processor or getattr(verifier, "processor", None))
        self.reward = reward or SAPOReward(
            OutcomeReward(),
            DraftReward(StepScorer(verifier, config.system_prompt), alpha=config.reasoner.alpha,
                        mode=config.draft_reward_mode, delimiter=config.reasoner.step_delimiter)
            if verifier is not None else None,
            LengthReward(config.length_max_steps, config.length_max_tokens, delimiter=config.reasoner.step_delimiter),
            config.weights,
        )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.device = next(draft.parameters()).device
        # the top-level config: a vision-language draft's generate stops at the ids it names
        self.eos_ids = eos_ids(draft, draft_tokenizer, draft.config)
        pad = getattr(draft_tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))

        # Precision: fp32 master weights (float64 for tests), bf16 autocast where asked.
        master = torch.float64 if config.dtype == "float64" else torch.float32
        draft.to(master)
        self.autocast = config.dtype == "bfloat16"

        # LoRA
        self.lora = config.lora_r > 0
        if self.lora:
            from peft import LoraConfig, get_peft_model

            draft = get_peft_model(draft, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                     lora_dropout=config.lora_dropout,
                                                     target_modules=config.lora_target_modules,
                                                     task_type="CAUSAL_LM"))
        self.model = draft  # unwrapped policy (a PeftModel with LoRA)
        self.model.eval()  # dropout off: rollouts and updates see the same function

        # Frozen reference for the KL term (LoRA: the base model with adapters disabled).
        self.ref_model = None
        if config.beta > 0 and not self.lora:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

        self.ddp_model = self.model
        # FSDP2: the policy and the reference are sharded over the processes (each keeps 1/world of the
        # weights, gradients and AdamW state); forwards all-gather one layer at a time. A bf16 rollout
        # copy (rollout_dtype) is a full replica on each process, refreshed from the gathered weights.
        self.fsdp = bool(config.fsdp) and self.world_size > 1
        self._rollout_skeleton = None
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            if config.rollout_dtype == "bfloat16":
                self._rollout_skeleton = copy.deepcopy(self.model).to(torch.bfloat16).eval()
            _fully_shard(self.model, mesh)
            if self.ref_model is not None:
                _fully_shard(self.ref_model, mesh)
        elif self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model, device_ids=None if self.device.type == "cpu" else [self.device])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.adam_betas),
                                           eps=config.adam_eps, weight_decay=config.weight_decay)
        self.step = 0
        self._rollout_model = None
        self.history: list[dict] = []
        self._tb = None

    # -- helpers ----------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr_at(self, step: int) -> float:
        if self.config.warmup_steps and step < self.config.warmup_steps:
            return self.config.lr * (step + 1) / self.config.warmup_steps
        return self.config.lr

    def prompt_ids(self, question: str) -> list[int]:
        """The draft's prompt for ``question``, as the reasoner encodes it (:meth:`dreamr.lm.LM.encode_prompt`):
        the conversation of :func:`training.data.draft_messages` through the draft's chat template, or,
        for a tokenizer without one, the plain question (as ``python -m dreamr --no-chat`` sends it)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.draft_lm.encode_prompt(draft_messages(question, self.config.system_prompt))
        return self.draft_lm.encode_prompt(question)

    def sample_seed(self, step: int, index: int) -> int:
        return (self.config.seed * 1_000_003 + step * 10_007 + index * 101 + 17) % (2 ** 62)

    # -- rollouts ---------------------------------------------------------------------------------

    @property
    def _sampler(self):
        """The model that samples the rollouts: the bf16 copy where ``rollout_dtype`` asks for one, else
        the policy."""
        return self._rollout_model if self._rollout_model is not None else self.model

    @torch.no_grad()
    def sample(self, prompt_ids: list[int], seed: int, vision_inputs: Optional[dict] = None) -> list[list[int]]:
        """G completions of one prompt (token ids, cut after the first EOS, which is kept); ``vision_inputs``:
        a vision-language draft's processor inputs for an image prompt (training.vision).

        Sampled at ``reasoner.temperature`` and ``reasoner.top_p`` with no top-k, the distribution that
        :func:`training.grpo.sampling_logits` reproduces for the update. Other warpers a draft's own
        ``generation_config`` may name (a repetition penalty, min-p) would make the two differ; the built-in
        drafts name none (tested: the update's log-probabilities equal ``generate``'s scores)."""
        cfg, rc = self.config, self.config.reasoner
        torch.manual_seed(seed)
        x = torch.tensor([prompt_ids] * cfg.group_size, dtype=torch.long, device=self.device)
        model = self._sampler
        # A sharded policy all-gathers in every forward: all processes must run as many forwards as the
        # longest generation (synced_gpus; a finished process samples nothing more, so no RNG drifts).
        synced = {"synced_gpus": True} if self.fsdp and model is self.model else {}
        with self._autocast():
            out = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=float(rc.temperature),
                top_p=float(rc.top_p), top_k=0, max_new_tokens=rc.max_new_tokens, pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None, **synced,
                **VisionData.generate_kwargs(vision_inputs, cfg.group_size, self.device),
            )
        completions = []
        for row in out[:, len(prompt_ids):].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row))
            completions.append(row[:cut])
        return completions

    def score(self, question: str, answer: str, completion_ids: list[list[int]], images=None) -> Rollout:
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        prompts = [question] * len(texts)
        seen = {"images": [images] * len(texts)} if images else {}  # what the target's verification sees
        comps = self.reward.components(prompts, texts, answer=[answer] * len(texts), completion_ids=completion_ids,
                                       **seen)
        rewards = self.reward.combine(comps)
        cpns = list(self.reward.draft.last_cpns) if self.reward.draft is not None and self.config.weights[1] > 0 \
            else [[] for _ in texts]
        return Rollout([], completion_ids, rewards, comps, cpns, texts)

    @property
    def records_old_logps(self) -> bool:
        """Whether rollouts record the sampler's log-probabilities. Not needed (and skipped, as TRL does)
        where one optimizer step follows each batch and the policy itself sampled: then the sampler's
        values are the policy's own, which the loss takes, detached, in the same forward."""
        return self.config.num_iterations > 1 or self.config.rollout_dtype == "bfloat16"

    @torch.no_grad()
    def record_old_logps(self, rollout: Rollout, model=None) -> Rollout:
        """Set ``rollout.old_logps``: each completion token's log-probability under the sampling
        distribution of ``model`` (default: the model that samples now, :attr:`_sampler`). Call it before
        the policy changes; :meth:`rollout` calls it where :attr:`records_old_logps`."""
        logp = self._logps(self._sampler if model is None else model, self._batch([rollout]))
        rollout.old_logps = [logp[i, :len(c)].detach().clone() for i, c in enumerate(rollout.completion_ids)]
        return rollout

    def rollout(self, example, step: int, index: int) -> Rollout:
        # an image row: a vision-language draft reads its processor's inputs, a text-only one the question
        mm, target_images = self.vision.row_inputs(
            example, draft_messages(example.question, self.config.system_prompt, len(example.images)))
        pids = self.prompt_ids(example.question) if mm is None else mm["input_ids"][0].tolist()
        completions = self.sample(pids, self.sample_seed(step, index), mm)
        r = self.score(example.question, example.answer, completions, target_images)
        r.prompt_ids, r.vision_inputs = pids, mm
        if self.records_old_logps:
            self.record_old_logps(r)
        return r

    # -- the update -------------------------------------------------------------------------------

    def _batch(self, rollouts: Sequence[Rollout]):
        rows, masks, starts = [], [], []
        for r in rollouts:
            for c in r.completion_ids:
                rows.append(list(r.prompt_ids) + list(c))
                starts.append(len(r.prompt_ids))
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, x in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            attn[i, :len(x)] = 1
        # Completion tokens are predicted from positions start-1 .. len-2.
        tmax = max(len(x) - s for x, s in zip(rows, starts))
        targets = torch.full((len(rows), tmax), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), tmax))
        gather_pos = torch.zeros((len(rows), tmax), dtype=torch.long)
        for i, (x, s) in enumerate(zip(rows, starts)):
            n = len(x) - s
            targets[i, :n] = torch.tensor(x[s:])
            mask[i, :n] = 1
            gather_pos[i, :n] = torch.arange(s - 1, s - 1 + n)
        dev = self.device
        # image rows of a vision-language draft: pixel values and per-token inputs, in row order
        vision = VisionData.batch_kwargs([(r.vision_inputs, len(r.completion_ids), len(r.prompt_ids))
                                          for r in rollouts], width, dev)
        return ids.to(dev), attn.to(dev), targets.to(dev), mask.to(dev), gather_pos.to(dev), vision

    def _logps(self, model, batch) -> torch.Tensor:
        """Completion tokens' log-probabilities ``[N, T]`` under ``model``'s sampling distribution (the
        reasoner config's temperature and top-p, :func:`training.grpo.token_logprobs`); 0 at padding."""
        ids, attn, targets, mask, pos = batch[:5]
        vision = batch[5] if len(batch) > 5 else {}
        rc = self.config.reasoner
        with self._autocast():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False, **vision).logits
        idx = pos.unsqueeze(-1).expand(-1, -1, logits.size(-1))
        sel = logits.gather(1, idx)
        lp = grpo.token_logprobs(sel, targets, temperature=float(rc.temperature), top_p=float(rc.top_p))
        # where, not a product: a padded target outside the nucleus is -inf, and -inf * 0 is NaN
        return torch.where(mask > 0, lp, torch.zeros_like(lp))

    def _ref_logps(self, batch) -> Optional[torch.Tensor]:
        if self.config.beta <= 0:
            return None
        with torch.no_grad():
            if self.lora:
                with self.model.disable_adapter():
                    return self._logps(self.model, batch)
            return self._logps(self.ref_model, batch)

    def _old_logps(self, rollouts: Sequence[Rollout], mask: torch.Tensor) -> Optional[torch.Tensor]:
        """The rollouts' recorded log-probabilities as ``[N, T]`` (0 at padding), or None where none are
        recorded because none are needed (:attr:`records_old_logps`)."""
        if not self.records_old_logps:
            return None
        old = torch.zeros(mask.shape, dtype=torch.float64 if self.config.dtype == "float64" else torch.float32)
        row = 0
        for k, r in enumerate(rollouts):
            if r.old_logps is None or len(r.old_logps) != len(r.completion_ids):
                raise ValueError(f"rollouts[{k}] has no recorded old_logps for its {len(r.completion_ids)} completions; "
                                 f"num_iterations={self.config.num_iterations} and rollout_dtype="
                                 f"{self.config.rollout_dtype!r} take the ratio against the sampler's "
                                 "log-probabilities: build rollouts with trainer.rollout(...) or call "
                                 "trainer.record_old_logps(rollout) before the policy changes")
            for lp in r.old_logps:
                old[row, :lp.numel()] = lp.to(old.dtype).cpu()
                row += 1
        return old.to(mask.device)

    def prepare(self, rollouts: Sequence[Rollout]) -> tuple[list[tuple], float]:
        """This process's micro-batches of ``rollouts`` for the update, and the global batch's token count.

        Each micro-batch is ``(batch, advantages [N], old_logp [N, T] or None, ref_logp [N, T] or None)``
        (``batch`` as :meth:`_batch` returns it); the KL reference is evaluated once here, not per
        iteration (it does not change)."""
        cfg = self.config
        mb = cfg.micro_batch_prompts
        micro = []
        local_tokens = 0.0
        for i in range(0, len(rollouts), mb):
            m = list(rollouts[i:i + mb])
            b = self._batch(m)
            rewards = torch.tensor([x for r in m for x in r.rewards], dtype=torch.float64)
            adv = grpo.group_advantages(rewards, cfg.group_size, scale=cfg.scale_advantages).to(self.device)
            local_tokens += float(b[3].sum())
            micro.append((b, adv, self._old_logps(m, b[3]), self._ref_logps(b)))
        total_tokens = self._all_reduce_sum(torch.tensor([local_tokens], dtype=torch.float64))[0].item()
        return micro, total_tokens

    def micro_loss(self, micro_batch: tuple, total_tokens: float, model=None) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch from :meth:`prepare` under the current policy (its share of the
        global-batch loss) and its statistics (:func:`training.grpo.grpo_loss`). Without recorded
        log-probabilities the ratio is taken against this forward's own detached values (1 by construction,
        which is exact for one step on a batch the policy itself sampled)."""
        cfg = self.config
        b, adv, old, ref = micro_batch
        logp = self._logps(self.ddp_model if model is None else model, b)
        # num_tokens (the global batch's) makes "token" averaging exact; "sequence" ignores it
        loss, st = grpo.grpo_loss(logp, logp.detach() if old is None else old, adv, b[3], epsilon=cfg.epsilon,
                                  epsilon_high=cfg.epsilon_high, beta=cfg.beta, ref_logp=ref,
                                  loss_type=cfg.loss_type, num_tokens=total_tokens)
        if cfg.loss_type == "sequence":  # the micro-batch's share of the global mean
            loss = loss * (adv.numel() / (cfg.batch_prompts * cfg.group_size))
        return loss, st

    def optimize(self, rollouts: Sequence[Rollout]) -> dict[str, float]:
        """Update the draft on this process's rollouts (its share of the global batch):
        ``num_iterations`` optimizer steps, each accumulating the gradient over the micro-batches.

        Returns statistics over the global batch: of the last iteration (loss, KL, clip fraction, mean
        ratio, grad norm), and ``ratio_dev_first``, the largest ``|ratio - 1|`` of the first iteration
        (0 where the policy sampled the batch; a bf16 sampler shows its distance here).
        """
        cfg = self.config
        micro, total_tokens = self.prepare(rollouts)
        keys = ["loss", "kl_sum", "clipped_sum", "ratio_sum", "tokens"]
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dev_first, norm = 0.0, torch.zeros(())
        for it in range(cfg.num_iterations):
            sums = dict.fromkeys(keys, 0.0)
            self.optimizer.zero_grad(set_to_none=True)
            for k, mbatch in enumerate(micro):
                last = k == len(micro) - 1
                if self.fsdp:  # accumulate unsharded gradients locally; reduce-scatter on the last one
                    self.model.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext()
                else:
                    sync = contextlib.nullcontext() if (last or self.world_size == 1) else self.ddp_model.no_sync()
                with sync:
                    loss, st = self.micro_loss(mbatch, total_tokens)
                    # DDP averages gradients over processes; scale so the result is the global-batch loss.
                    (loss * self.world_size).backward()
                sums["loss"] += float(loss.detach())
                for key in keys[1:]:
                    sums[key] += float(st[key])
                if it == 0:
                    dev_first = max(dev_first, float(st["ratio_dev_max"]))
            if cfg.max_grad_norm > 0:  # sharded (DTensor) gradients: the norm is global, a replicated DTensor
                norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            elif self.fsdp:
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            else:
                norm = torch.sqrt(sum((p.grad.detach().double() ** 2).sum() for p in self.params if p.grad is not None))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        red = self._all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()
        dev = torch.tensor([dev_first], dtype=torch.float64)
        if self.world_size > 1:
            dev = dev.to(self.device)
            dist.all_reduce(dev, op=dist.ReduceOp.MAX)
        out = dict(zip(keys, red))
        tokens = max(out["tokens"], 1.0)
        return {"loss": out["loss"], "kl": out["kl_sum"] / tokens, "clip_frac": out["clipped_sum"] / tokens,
                "ratio": out["ratio_sum"] / tokens, "ratio_dev_first": float(dev.cpu()[0]),
                "grad_norm": float(_full_tensor(norm)), "lr": lr, "tokens": out["tokens"]}

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t.cpu()
        return t

    # -- one step, the loop -----------------------------------------------------------------------

    def local_indices(self, step: int) -> list[tuple[int, int]]:
        """(position in the global batch, dataset index) of this process's prompts at ``step``."""
        cfg = self.config
        idx = global_indices(len(self.data), step, cfg.batch_prompts, cfg.seed, cfg.shuffle)
        per = cfg.batch_prompts // self.world_size
        return [(self.rank * per + j, idx[self.rank * per + j]) for j in range(per)]

    def _refresh_rollout_model(self) -> None:
        self._rollout_model = None
        if self.config.rollout_dtype == "bfloat16":
            if self.fsdp:  # gather the full weights on every process into the bf16 replica
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
                self._rollout_skeleton.load_state_dict(full, strict=False)
                self._rollout_model = self._rollout_skeleton
            else:
                self._rollout_model = copy.deepcopy(self.model).to(torch.bfloat16).eval()

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self._refresh_rollout_model()
        rollouts = [self.rollout(self.data[di], self.step, self.step * self.config.batch_prompts + gi)
                    for gi, di in self.local_indices(self.step)]
        self._rollout_model = None
        t1 = time.perf_counter()
        stats = self.optimize(rollouts)
        self.step += 1
        record = {"step": self.step, **self._rollout_stats(rollouts), **stats,
                  "rollout_s": t1 - t0, "update_s": time.perf_counter() - t1}
        return record

    def _rollout_stats(self, rollouts: Sequence[Rollout]) -> dict:
        comps = ("outcome", "draft", "length")
        vals = [0.0] * 10
        for r in rollouts:
            for i in range(len(r.rewards)):
                vals[0] += 1
                vals[1] += r.rewards[i]
                vals[2] += r.rewards[i] ** 2
                for j, c in enumerate(comps):
                    vals[3 + j] += r.components.get(c, [0.0] * len(r.rewards))[i]
                cp = r.cpns[i] if i < len(r.cpns) else []
                vals[6] += len(cp)
                vals[7] += sum(1 for c in cp if accepts_value(c, self.config.reasoner.alpha))
                vals[8] += len(split_steps(r.texts[i], self.config.reasoner.step_delimiter)) if r.texts else 0
                vals[9] += len(r.completion_ids[i])
        v = self._all_reduce_sum(torch.tensor(vals, dtype=torch.float64)).tolist()
        n = max(v[0], 1.0)
        mean = v[1] / n
        return {"reward": mean, "reward_std": math.sqrt(max(v[2] / n - mean * mean, 0.0)),
                "r_outcome": v[3] / n, "r_draft": v[4] / n, "r_length": v[5] / n,
                "acceptance": (v[7] / v[6]) if v[6] else float("nan"),
                "steps_mean": v[8] / n, "tokens_mean": v[9] / n}

    def train(self, total_steps: Optional[int] = None) -> list[dict]:
        """Train until ``total_steps`` (default ``config.total_steps``); checkpoints, logs, final save."""
        total = self.config.total_steps if total_steps is None else total_steps
        bar = None
        if self.rank == 0 and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="SAPO", dynamic_ncols=True)
        while self.step < total:
            record = self.train_step()
            self.history.append(record)
            self._log(record, bar)
            if self.config.save_every and self.step % self.config.save_every == 0 and self.step < total:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.out_dir is not None:
            self.save_checkpoint()
            self.save_model(self.out_dir)
        return self.history

    def _log(self, record: dict, bar) -> None:
        if self.rank != 0:
            return
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in record.items()}) + "\n")
            self._tensorboard(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(R=f"{record['reward']:.3f}", acc=f"{record['acceptance']:.2f}",
                            out=f"{record['r_outcome']:.2f}", len=f"{record['tokens_mean']:.0f}",
                            kl=f"{record['kl']:.4f}", refresh=False)
            if record["step"] % self.config.log_every == 0:
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def _tensorboard(self, record: dict) -> None:
        if self._tb is False:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard not installed: JSONL and console only
                self._tb = False
                return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                self._tb.add_scalar(f"sapo/{k}", v, record["step"])

    # -- saving -----------------------------------------------------------------------------------

    @property
    def trainable_names(self) -> list[str]:
        """Names of the trainable parameters, in the model's (and the optimizer's) order."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name, on the CPU. With FSDP a collective (every process must call it):
        the full tensors are gathered to rank 0, the other ranks get ``{}``."""
        names = self.trainable_names
        if self.fsdp:
            full = self._full_model_state()
            return {n: full[n].contiguous() for n in names} if self.rank == 0 else {}
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().cpu().contiguous() for n in names}

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """FSDP: the full state dict on rank 0's CPU (collective; empty on the other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self) -> dict:
        """The optimizer's state dict: as ``torch.optim`` keys it (parameter indices), or with FSDP the full
        state keyed by parameter name, gathered to rank 0 (collective; empty on the other ranks)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, opt: dict) -> None:
        """Load either form of :meth:`optimizer_state` (a checkpoint from DDP/one process resumes under
        FSDP and the other way round)."""
        names = self.trainable_names
        by_name = any(isinstance(k, str) for k in opt.get("state", {})) or any(
            isinstance(k, str) for g in opt.get("param_groups", []) for k in g.get("params", []))
        if not self.fsdp and not by_name:
            self.optimizer.load_state_dict(opt)
            return
        if not by_name:  # parameter indices -> names (the optimizer holds the trainable parameters in order)
            opt = {"state": {names[i]: v for i, v in opt["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt["param_groups"]]}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, opt, options=StateDictOptions(full_state_dict=True))

    def save_checkpoint(self, path=None) -> Optional[Path]:
        """Write ``out_dir/checkpoint-<step>/``: trainable weights (safetensors), optimizer, RNG, step."""
        if path is None:
            if self.out_dir is None:
                return None
            path = self.out_dir / f"checkpoint-{self.step:06d}"
        path = Path(path)
        weights, opt = self.trainable_state(), self.optimizer_state()  # FSDP: gathered to rank 0 (collective)
        if self.rank == 0:
            from safetensors.torch import save_file

            tmp = path.with_name(path.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save(opt, tmp / "optimizer.pt")
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
            state = {"step": self.step, "config": _jsonable(dataclasses.asdict(self.config)),
                     "world_size": self.world_size, "fsdp": self.fsdp}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if path.exists():
                import shutil

                shutil.rmtree(path)
            tmp.rename(path)
        if self.world_size > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path) -> None:
        """Restore weights, optimizer, RNG and the step counter from a checkpoint folder (or the latest
        ``checkpoint-*`` inside ``path``)."""
        from safetensors.torch import load_file

        path = latest_checkpoint(path)
        state = json.loads((path / "trainer_state.json").read_text())
        weights = load_file(str(path / "weights.safetensors"))
        named = dict(self.model.named_parameters())
        missing = [n for n in self.trainable_names if n not in weights]
        if missing:
            raise ValueError(f"resume={str(path)!r}: checkpoint lacks {len(missing)} trainable tensors "
                             f"(first: {missing[0]}); was it written with the same draft and LoRA settings?")
        if self.fsdp:  # every process reads the full tensors and keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, {n: t.to(named[n].dtype) for n, t in weights.items() if n in named},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            with torch.no_grad():
                for n, t in weights.items():
                    named[n].copy_(t.to(named[n].device))
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        self._load_optimizer_state(opt)
        rng = torch.load(path / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.step = int(state["step"])

    def save_model(self, out_dir) -> None:
        """Save the trained draft (merged LoRA) and its tokenizer with ``save_pretrained``: the folder
        loads with ``dreamr.models.load(out_dir)`` and ``SpeculativeReasoner.from_pretrained(draft=out_dir)``.
        With FSDP a collective: the full weights are gathered to rank 0, which writes them."""
        full = self._full_model_state() if self.fsdp else None
        if self.rank != 0:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.lora:
            model = copy.deepcopy(self.model).merge_and_unload()
        if full is not None:
            model.save_pretrained(str(out_dir), state_dict=full)
        else:
            model.save_pretrained(str(out_dir))
        self.tokenizer.save_pretrained(str(out_dir))
        if self.vision.draft_processor is not None:  # a vision-language draft loads with its processor
            self.vision.draft_processor.save_pretrained(str(out_dir))


def latest_checkpoint(path) -> Path:
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = sorted(p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    if not found:
        raise ValueError(f"resume={str(path)!r}: no checkpoint (a folder with trainer_state.json, or "
                         "checkpoint-* folders inside it)")
    return found[-1]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)
