"""Evaluate reasoning modes side by side on a JSONL dataset (a thin command line over dreamr.eval).

    python bench/eval.py --data ../shared/data/gsm8k/test_dev.jsonl --limit 20 \
        --modes target draft speculative --alphas 0.5 0.7 0.9 auto --out runs/gsm8k20
    python bench/eval.py --limit 20 --modes target speculative --alphas 0.7 auto \
        --verifiers default calibrate verdict_head=none --out runs/judges   # verifiers side by side

Per mode (and per alpha and verifier): accuracy (over finished problems) and accuracy_all (errors count as
wrong), accuracy difference to the target alone, wall time, speedup over the target alone (same run, modes
interleaved per problem), tokens/s, step acceptance, accepted steps per window, mean_accepted_length
(committed steps per verification window), target passes per token, token counts, the ideal bound
1/(c + 1/L), the mean threshold and the verifier each variant used; see dreamr/eval/metrics.py for the
definitions and dreamr/eval/variants.py for the variant specs (speculative@0.7, speculative@auto,
speculative@0.7+calibrate, speculative@0.7+verdict_head=DIR|none). Bad arguments exit with status 2 before
any model is loaded; the exit status is 1 when a variant finished no problem. Writes OUT/records.jsonl (one
line per problem and variant; an interrupted run resumes from it; --retry-failed reruns failed ones),
OUT/results.json, OUT/sweep.json and OUT/sweep.png, and with alpha=auto variants OUT/alpha.json and
OUT/alpha.png (the threshold at every verified step and the running acceptance against its target).
``python bench/eval.py --help`` lists the options; ``python -m dreamr.eval`` is the same.
"""

import sys

from dreamr.eval import main

if __name__ == "__main__":
    sys.exit(main())
