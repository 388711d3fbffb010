#!/usr/bin/env python
"""Train a draft model with SAPO (GRPO with CPN-acceptance rewards from the target).

    python training/train_sapo.py --target gemma-3-270m --draft smollm2-135m-instruct \\
        --data ../shared/data/gsm8k/train.jsonl --out runs/sapo --steps 50 --group-size 4

    torchrun --nproc_per_node 2 training/train_sapo.py ...     # data parallel (DDP; gloo on CPU)
    torchrun --nproc_per_node 2 training/train_sapo.py ... --fsdp   # sharded data parallel (FSDP2)

``--resume`` continues from the latest ``checkpoint-*`` in ``--out`` (or a given checkpoint folder) to
the identical state. The output folder loads with ``dreamr.models.load(out)`` and
``SpeculativeReasoner.from_pretrained(draft=out)``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from dreamr.prompts import SYSTEM_PROMPT
from training.data import load_jsonl
from training.scoring import add_judge_args, judge_config
from training.trainer import SAPOConfig, SAPOTrainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="gemma-3-270m", help="target (judge): built-in name or local folder")
    p.add_argument("--draft", default="smollm2-135m-instruct", help="draft (policy): built-in name or local folder")
    p.add_argument("--data", required=True, help="JSONL with question/answer rows")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.jsonl, final model)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in --out, or from the folder given")
    p.add_argument("--steps", type=int, default=50, dest="total_steps")
    p.add_argument("--group-size", "-G", type=int, default=4)
    p.add_argument("--batch-prompts", type=int, default=1, help="prompts per optimizer step (global)")
    p.add_argument("--micro-batch-prompts", type=int, default=1, help="prompts per forward/backward")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=None)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (k3 estimator); 0 = no reference")
    p.add_argument("--num-iterations", "--ppo-epochs", type=int, default=1, dest="num_iterations",
                   help="optimizer steps per batch of rollouts (TRL's num_iterations); > 1 lets the ratio clip")
    p.add_argument("--loss-type", choices=["token", "sequence"], default="token")
    p.add_argument("--no-scale-advantages", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("W_OUT", "W_DRAFT", "W_LEN"))
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--draft-reward", choices=["fraction", "mean"], default="fraction", dest="draft_reward_mode")
    p.add_argument("--length-max-steps", type=int, default=8)
    p.add_argument("--length-max-tokens", type=int, default=192)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rollout-dtype", choices=["float32", "bfloat16"], default=None,
                   help="sample from a copy of the policy in this dtype (bfloat16: faster CPU decoding)")
    p.add_argument("--target-dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype of the target (judge); default: bfloat16 with --dtype bfloat16, else float32")
    p.add_argument("--lora-r", type=int, default=0, help="> 0: train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT,
                   help="the system message of the conversation both models read (evaluation's and the CLI's)")
    add_judge_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda:<local rank> if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the draft (and the KL reference) over the processes with FSDP2 "
                        "instead of DDP, for drafts whose weights + gradients + AdamW state do not fit one device; "
                        "not with --lora-r")
    return p.parse_args(argv)


def config_from_args(a) -> SAPOConfig:
    """The run's settings; the sampling and judging ones go into the reasoner's config, which SAPO embeds."""
    reasoner = judge_config(a, a.target, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                            alpha=a.alpha)
    return SAPOConfig(
        reasoner=reasoner, group_size=a.group_size, batch_prompts=a.batch_prompts, micro_batch_prompts=a.micro_batch_prompts,
        total_steps=a.total_steps, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        max_grad_norm=a.max_grad_norm, epsilon=a.epsilon, epsilon_high=a.epsilon_high, beta=a.beta,
        num_iterations=a.num_iterations, loss_type=a.loss_type, scale_advantages=not a.no_scale_advantages,
        weights=tuple(a.weights), draft_reward_mode=a.draft_reward_mode, length_max_steps=a.length_max_steps,
        length_max_tokens=a.length_max_tokens, dtype=a.dtype, rollout_dtype=a.rollout_dtype, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout, system_prompt=a.system_prompt or None, seed=a.seed, shuffle=not a.no_shuffle,
        save_every=a.save_every, log_every=a.log_every, fsdp=a.fsdp,
    )


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = a.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    config = config_from_args(a)
    config.validate(world)  # bad flags fail before any model is loaded
    data = load_jsonl(a.data, a.limit)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    from dreamr.models import load

    draft = load(a.draft, dtype="float32", device=device, progress=False)
    target = None
    if config.weights[1] > 0:
        target = load(a.target, dtype=a.target_dtype or ("bfloat16" if a.dtype == "bfloat16" else "float32"),
                      device=device,
                      progress=False)
    trainer = SAPOTrainer(draft.model, draft.processor or draft.tokenizer, target.model if target else None,
                          (target.processor or target.tokenizer) if target else None, data=data, config=config,
                          out_dir=a.out)
    if trainer.rank == 0:
        print(f"SAPO: {len(data)} prompts from {a.data}, G={config.group_size}, {config.batch_prompts} prompts/step, "
              f"{world} process(es){' (FSDP)' if trainer.fsdp else ''}, device {device}"
              + (" (--fsdp has no effect in one process)" if a.fsdp and not trainer.fsdp else "")
              + (f"; {trainer.vision.unseen_image_rows} rows' images ignored (neither model sees images)"
                 if trainer.vision.unseen_image_rows else ""),
              flush=True)
    if a.resume:
        trainer.load_checkpoint(a.out if a.resume == "auto" else a.resume)
        if trainer.rank == 0:
            print(f"resumed at step {trainer.step}", flush=True)
    trainer.train()
    if trainer.rank == 0:
        print(f"saved the trained draft to {a.out}", flush=True)
    if dist.is_initialized():
        # Leave together: a rank that tears gloo down while another still has work queued aborts
        # ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
