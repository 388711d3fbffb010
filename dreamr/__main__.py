"""Command line: ``python -m dreamr "question"`` runs one question through speculative reasoning.

The default pair is gemma-3-270m (target, judge; the base model, not the instruction-tuned one) and
SmolLM2-135M-Instruct (draft), both from 4-bit GGUF weights dequantized to bf16. ``--target`` and ``--draft``
also take local folders and Hugging Face model ids (read from the local Hugging Face cache). Each committed step
is printed marked as accepted (written by the draft) or written by the target, with its cpn, then the
metrics. ``--json`` prints the result as JSON instead.

    python -m dreamr "What is 12 * 7 - 5?"
    python -m dreamr --gsm8k 0 --mode target --json
    python -m dreamr --draft self "Natalia sold 48 clips in April and half as many in May. How many in total?"

``--draft self`` runs the second default pair: SmolLM2-135M-Instruct drafted by its own first layers.
``--target-url`` (and ``--draft-url``) run the models behind vLLM servers instead (:class:`dreamr.remote.RemoteReasoner`;
start them with ``python -m dreamr.backends.vllm.launch``):

    python -m dreamr --target-url http://127.0.0.1:8001 --draft-url http://127.0.0.1:8002 --gsm8k 0 --mode fpsr

The judge: a built-in target uses the verdict head dreamr ships for it (``--verdict-head none`` turns it
off, ``--verdict-head DIR`` takes one made by ``python -m dreamr.calibrate fit``); ``--calibrate`` corrects
the target's own verdict by its verdict on a content-free step; ``--alpha auto --target-acceptance 0.5``
moves the threshold online to hold that acceptance rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreamr.answers import extract_answer
from dreamr.config import DRAFT_POLICIES, MODES
from dreamr.jsonl import read_jsonl
from dreamr.prompts import ANSWER_MARKER, chat_messages

WEAK_JUDGE_NOTE = (
    "Note: these small models are weak judges. Measured on this project's machine with the built-in weights "
    "(4-bit GGUF dequantized to bf16; gemma-3-270m is the base model, not the instruction-tuned -it), "
    "SmolLM2-135M-Instruct answers 'No' to nearly every step (cpn about 0.18) and gemma-3-270m answers 'Yes' "
    "(cpn about 0.85), and good and corrupted steps score alike: the run shows the mechanism (drafting, CPN "
    "verification, rollback, target fallback) working, not good judgement."
)

HEAD_NOTE = (
    "Judge: the verdict head {name} (a [2, H] head on the target's verdict-position hidden state, scored by the "
    "fused CPN op{cal}); held-out on GSM8K step pairs: pooled AUROC {auroc:.2f}, pair accuracy {acc:.2f}."
)


def _alpha(value: str):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {value!r}") from None

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "gsm8k_dev_sample.jsonl"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamr", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="the question (or use --gsm8k)")
    p.add_argument("--gsm8k", type=int, metavar="INDEX",
                   help="take the question from line INDEX of the GSM8K sample (see --gsm8k-file)")
    p.add_argument("--gsm8k-file", type=Path, default=_EXAMPLES,
                   help=f"JSONL file with question/answer fields (default {_EXAMPLES.name} in examples/)")
    p.add_argument("--mode", default="speculative", choices=list(MODES))
    p.add_argument("--window", type=int, default=4, help="mode fpsr: lookahead window W (steps open at once)")
    p.add_argument("--alpha", type=_alpha, default=0.7,
                   help="accept a drafted step iff cpn > alpha (0.7), or 'auto': an online threshold holding "
                        "--target-acceptance")
    p.add_argument("--target-acceptance", type=float, default=0.5,
                   help="--alpha auto: the share of drafted steps to accept (0.5)")
    p.add_argument("--alpha-gamma", type=float, default=0.05, help="--alpha auto: the update's step size (0.05)")
    p.add_argument("--verdict-head", default="auto",
                   help="the judge's verdict head: a folder from python -m dreamr.calibrate fit, 'none' (the "
                        "target's own Yes/No verdict) or 'auto' (default: the head shipped for a built-in target)")
    p.add_argument("--calibrate", action="store_true",
                   help="correct each verdict by the verdict on a content-free step at the same prefix")
    p.add_argument("--target", default=None,
                   help="target model: built-in name, local path or Hugging Face model id, read from the local "
                        "Hugging Face cache ($HF_HUB_CACHE) when it is there (gemma-3-270m)")
    p.add_argument("--draft", default=None,
                   help="draft model: built-in name, local path, Hugging Face model id, or 'self[:k]' for the "
                        "target's first k layers (smollm2-135m-instruct)")
    p.add_argument("--target-url", default=None,
                   help="run the target behind this vLLM server instead of in this process (then --draft-url for "
                        "the draft's; --target/--draft, --dtype, --device and --verdict-head do not apply)")
    p.add_argument("--draft-url", default=None, help="the draft's vLLM server (with --target-url)")
    p.add_argument("--target-model", default=None, help="with --target-url: the served model name (default: the one it serves)")
    p.add_argument("--draft-model", default=None, help="with --draft-url: the served model name")
    p.add_argument("--token-speculation", default="step+ngram",
                   help="token-level speculation inside written steps: sources best first joined by '+' "
                        "(step: the draft's rejected step; ngram: lookup in the context), or 'off'")
    p.add_argument("--draft-token-speculation", default=None,
                   help="the same inside the draft's steps: 'ngram' or 'off' (default: 'ngram' in-process, 'off' "
                        "over vLLM servers)")
    p.add_argument("--num-speculative-tokens", type=int, default=10, help="most tokens per proposal (10)")
    p.add_argument("--draft-policy", default=None, choices=list(DRAFT_POLICIES),
                   help="always draft, or stop drafting while it does not pay (default: adaptive in the "
                        "drafting modes, speculative and fpsr)")
    p.add_argument("--proposal-policy", default=None, choices=list(DRAFT_POLICIES),
                   help="check every token-level proposal, or stop checking while it does not pay (default: "
                        "adaptive in modes token, speculative and fpsr)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-step-tokens", type=int, default=64)
    p.add_argument("--answer-marker", default=ANSWER_MARKER,
                   help=f"stop after a step containing this ('' = none; default {ANSWER_MARKER!r}, the answer format "
                        "the system prompt asks for)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="send the question as plain text, not chat messages")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _question(args) -> tuple[str, str | None]:
    if args.gsm8k is not None:
        items = [item for _, item in read_jsonl(args.gsm8k_file, arg="--gsm8k-file")]
        if not 0 <= args.gsm8k < len(items):
            raise SystemExit(f"--gsm8k: index {args.gsm8k} outside [0, {len(items)}) of {args.gsm8k_file}")
        item = items[args.gsm8k]
        if not isinstance(item.get("question"), str) or not isinstance(item.get("answer"), str):
            raise SystemExit(f"--gsm8k-file: line {args.gsm8k} of {args.gsm8k_file} needs string fields "
                             "'question' and 'answer'")
        return item["question"], extract_answer(item["answer"])
    if not args.question:
        raise SystemExit("give a question, or --gsm8k INDEX")
    return args.question, None


def _print_result(result, reference: str | None, note: str = WEAK_JUDGE_NOTE, auto_alpha: bool = False) -> None:
    for i, step in enumerate(result.steps, 1):
        at = f" alpha {step.alpha:.3f}" if auto_alpha and step.alpha is not None else ""
        if step.accepted is None:
            tag = f"{step.source} (unverified)"
        elif step.accepted:
            tag = f"accepted  cpn {step.cpn:.3f}{at}"
        else:
            tag = f"target    cpn {step.cpn:.3f}{at} (draft rejected)"
        print(f"[{i:2d}] {tag}  {step.num_tokens} tokens")
        for line in step.text.strip("\n").splitlines() or [""]:
            print(f"     | {line}")
    m = result.metrics
    print("-" * 72)
    rate = "n/a" if m.step_acceptance_rate is None else f"{m.step_acceptance_rate:.2f}"
    print(f"mode {result.mode}  finish {result.finish_reason}  steps {m.num_steps}  acceptance {rate} "
          f"({m.accepted_steps}/{m.verified_steps})  nonfinite verdicts {m.nonfinite_verdicts}")
    print(f"draft tokens {m.draft_tokens}  target tokens {m.target_tokens}  committed {m.committed_tokens}  "
          f"target passes {m.target_forward_passes}  draft passes {m.draft_forward_passes}")
    if m.target_requests or m.draft_requests:
        print(f"server requests: target {m.target_requests}  draft {m.draft_requests}  aborted {m.cancelled_requests}")
    if m.target_step_forwards:
        print(token_speculation_line(m))
    print(f"wall {m.wall_time_s:.2f} s  {m.tokens_per_second:.1f} tokens/s")
    if auto_alpha and m.alpha_mean is not None:
        print(f"alpha auto: mean {m.alpha_mean:.3f}, final {m.alpha_final:.3f}")
    if reference is not None:
        print(f"reference answer: {reference}")
    print(note)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def token_speculation_line(m) -> str:
    """The token-level figures of a result's metrics, in vLLM's terms (one line)."""
    line = (f"target: {_fmt(m.tokens_per_target_forward)} tokens per forward in written steps, token "
            f"acceptance {_fmt(m.token_acceptance_rate)}, mean accepted length {_fmt(m.mean_accepted_length)} "
            f"({m.target_proposals} proposals)")
    if m.undrafted_steps:
        line += f"; {m.undrafted_steps} steps written without a draft (adaptive drafting)"
    return line


def _judge_note(reasoner) -> str:
    """What judged the steps: the verdict head with its held-out figures, or the weak-judge note."""
    head = reasoner.verdict_head(reasoner.config) if hasattr(reasoner, "verdict_head") else None  # remote: none
    if head is None:
        return WEAK_JUDGE_NOTE + (" Verdicts calibrated by a content-free step." if reasoner.config.calibrate else "")
    fig = (head.meta.get("fit") or {}).get("heldout") or {}
    name = (head.meta.get("target") or {}).get("name") or "given"
    cal = ", calibrated by a content-free step at each prefix" if head.calibrated or reasoner.config.calibrate else ""
    if fig.get("auroc") is None:
        return f"Judge: the verdict head {name}{cal}."
    return HEAD_NOTE.format(name=f"for {name}", cal=cal, auroc=fig["auroc"], acc=fig["pair_accuracy"])


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        question, reference = _question(args)
    except ValueError as exc:  # a missing or malformed --gsm8k-file
        parser.error(str(exc))
    # the system prompt of dreamr.prompts, the one evaluation and SAPO training use
    prompt = question if args.no_chat else chat_messages(question)
    settings = dict(mode=args.mode, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                    max_step_tokens=args.max_step_tokens, answer_marker=args.answer_marker or None,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, window=args.window,
                    target_acceptance=args.target_acceptance, alpha_gamma=args.alpha_gamma, calibrate=args.calibrate,
                    token_speculation=args.token_speculation, draft_token_speculation=args.draft_token_speculation,
                    num_speculative_tokens=args.num_speculative_tokens, draft_policy=args.draft_policy,
                    proposal_policy=args.proposal_policy)
    remote = args.target_url is not None
    if not remote and (args.draft_url or args.target_model or args.draft_model):
        parser.error("--draft-url, --target-model and --draft-model go with --target-url (the vLLM backend)")
    if remote and (args.target or args.draft or args.verdict_head not in ("auto", "none")):
        parser.error("--target-url runs the models behind vLLM servers: --target, --draft and --verdict-head are "
                     "for in-process models (a verdict head needs the target's hidden states)")
    try:  # bad input (a setting, dtype, device, model name, URL, the question) is a usage error: exit 2, no traceback
        if remote:
            from dreamr.backends.vllm import ServerError
            from dreamr.remote import RemoteReasoner

            reasoner = RemoteReasoner(args.target_url, args.draft_url, target_model=args.target_model,
                                      draft_model=args.draft_model, **settings)
            try:
                result = reasoner.generate(prompt)
            except ServerError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        else:
            from dreamr.reasoner import SpeculativeReasoner

            # settings, dtype and device are checked before the models load
            reasoner = SpeculativeReasoner.from_pretrained(
                target=args.target, draft=args.draft, dtype=args.dtype, device=args.device,
                verdict_head=None if args.verdict_head == "none" else args.verdict_head, **settings)
            result = reasoner.generate(prompt)
    except ValueError as exc:
        parser.error(str(exc))
    note = _judge_note(reasoner)
    if args.json:
        out = result.to_dict()
        head = None if remote else reasoner.verdict_head(reasoner.config)
        out.update(question=question, reference_answer=reference, note=note,
                   verifier={"verdict_head": None if head is None else head.describe(),
                             "calibrate": bool(reasoner.config.calibrate or (head is not None and head.calibrated)),
                             "alpha": reasoner.config.alpha, "target_acceptance": reasoner.config.target_acceptance})
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        _print_result(result, reference, note, auto_alpha=reasoner.config.auto_alpha)
    return 0


if __name__ == "__main__":
    sys.exit(main())
