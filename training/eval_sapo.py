#!/usr/bin/env python
"""Measure what SAPO trains for: the target's step acceptance of the draft's own reasoning.

For each problem the draft writes greedy reasoning (same prompt as in training, evaluation and the command
line); the reasoning is split into steps at the delimiter and the target scores each step with CPN in the
reasoner's judge context (:class:`training.scoring.StepScorer`: the question as chat messages, the previous
steps, the verdict prompt; the verdict head shipped for a built-in target unless ``--verdict-head none``). Reported: step acceptance rate at alpha (accepted steps /
all steps), mean cpn, mean steps and tokens per problem, and answer accuracy (:func:`answers_match`).

    python training/eval_sapo.py --draft smollm2-135m-instruct --target gemma-3-270m \\
        --data ../shared/data/gsm8k/test_dev.jsonl --n 30 --max-new-tokens 192 --alpha 0.7 0.85 0.9
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dreamr.answers import answers_match, extract_answer
from dreamr.lm import eos_ids
from dreamr.prompts import SYSTEM_PROMPT
from dreamr.reference import accepts_value
from dreamr.steps import split_steps
from training.data import draft_messages, load_jsonl
from training.scoring import StepScorer, add_judge_args, judge_config, verifier_for

__all__ = ["greedy_completions", "evaluate"]


@torch.no_grad()
def greedy_completions(model, tokenizer, questions, *, max_new_tokens=192, system_prompt=SYSTEM_PROMPT,
                       batch_size=8) -> list[tuple[str, int]]:
    """The draft's greedy reasoning for each question, as (text, token count); left-padded batches. The
    prompt is the training prompt (:func:`training.data.draft_messages` through the chat template)."""
    prompts = []
    for q in questions:
        text = tokenizer.apply_chat_template(draft_messages(q, system_prompt), tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(model, tokenizer, model.config)  # the ids the trainer stops its rollouts at
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            attn[j, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(eos) or None)
        for row in gen[:, width:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            out.append((tokenizer.decode(row[:cut], skip_special_tokens=True), cut))
    return out


def evaluate(draft_model, draft_tokenizer, scorer, rows, *, alpha=0.7, max_new_tokens=192,
             system_prompt=SYSTEM_PROMPT, delimiter="\n\n", batch_size=8, alphas=()) -> dict:
    """Greedy reasoning of the draft on ``rows``, each step judged by ``scorer`` (a
    :class:`training.scoring.StepScorer`: the reasoner's judge context) as training judges it.
    ``acceptance`` is at ``alpha``; ``acceptance_by_alpha`` adds each of ``alphas`` (the cpns do not depend
    on alpha: one pass). A step is accepted by :func:`dreamr.reference.accepts_value`, the kernels' rule."""
    comps = greedy_completions(draft_model, draft_tokenizer, [r.question for r in rows], max_new_tokens=max_new_tokens,
                               system_prompt=system_prompt, batch_size=batch_size)
    n_steps = n_acc = 0
    cpn_sum, correct, tokens, per = 0.0, 0, 0, []
    for r, (text, ntok) in zip(rows, comps):
        steps = split_steps(text, delimiter)
        cpns = scorer.score(r.question, steps)
        acc = sum(1 for c in cpns if accepts_value(c, alpha))
        n_steps += len(steps)
        n_acc += acc
        cpn_sum += sum(0.0 if math.isnan(c) else c for c in cpns)
        ok = answers_match(extract_answer(text), r.answer)
        correct += ok
        tokens += ntok
        per.append({"steps": len(steps), "accepted": acc, "cpns": cpns, "tokens": ntok, "correct": ok,
                    "pred": extract_answer(text), "text": text})
    n = len(rows)
    by_alpha = {f"{a:g}": sum(1 for q in per for c in q["cpns"] if accepts_value(c, a)) / max(n_steps, 1)
                for a in sorted({float(alpha), *map(float, alphas)})}
    return {"problems": n, "alpha": alpha, "acceptance": n_acc / max(n_steps, 1), "acceptance_by_alpha": by_alpha,
            "mean_cpn": cpn_sum / max(n_steps, 1), "mean_steps": n_steps / n, "mean_tokens": tokens / n,
            "accuracy": correct / n, "per_problem": per}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", default="smollm2-135m-instruct")
    p.add_argument("--target", default="gemma-3-270m")
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.7],
                   help="acceptance threshold(s); several are measured in one pass (the first is 'acceptance')")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    add_judge_args(p)
    p.add_argument("--json", default=None, help="write the full result (per problem) here")
    a = p.parse_args(argv)
    from dreamr.models import load

    t0 = time.perf_counter()
    rows = load_jsonl(a.data, a.n).examples
    d = load(a.draft, dtype="float32", progress=False)
    t = load(a.target, dtype="float32", progress=False)
    config = judge_config(a, a.target, alpha=a.alpha[0])
    scorer = StepScorer(verifier_for(t.model, t.processor or t.tokenizer, config, processor=t.processor),
                        a.system_prompt or None)
    res = evaluate(d.model, d.tokenizer, scorer, rows, alpha=a.alpha[0], max_new_tokens=a.max_new_tokens,
                   system_prompt=a.system_prompt or None, batch_size=a.batch_size, alphas=a.alpha[1:])
    res["draft"], res["seconds"] = str(a.draft), time.perf_counter() - t0
    res["verifier"] = {"verdict_head": None if config.verdict_head is None else str(config.verdict_head),
                       "calibrate": scorer.verifier.calibrate}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "per_problem"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
