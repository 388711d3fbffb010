"""Calibrating the judge: labelled step pairs, the target's verdict-position features, and verdict heads.

``python -m dreamr.calibrate fit`` fits a verdict head for a target (:mod:`.fit`) on pairs it builds from
GSM8K-format worked solutions (:mod:`.pairs`), with features extracted in batches on one cached prefix
per group (:mod:`.features`); ``python -m dreamr.calibrate score`` rates a judge on a pair file. The head
itself lives in :mod:`dreamr.verify.head` (the verifier imports it; it never imports this package).
See ``docs/method.md`` (calibrating the verdict).
"""

from dreamr.calibrate.pairs import (KINDS, PAIR_FIELDS, Group, Pair, Problem, build_groups, groups_to_pairs,
                                    pairs_to_groups, read_pairs, read_problems, write_pairs)

__all__ = ["KINDS", "PAIR_FIELDS", "Group", "Pair", "Problem", "build_groups", "groups_to_pairs",
           "pairs_to_groups", "read_pairs", "read_problems", "write_pairs"]
