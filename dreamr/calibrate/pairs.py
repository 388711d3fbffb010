"""Labelled step pairs for fitting and scoring a judge, built from GSM8K-format worked solutions.

A GSM8K record holds a ``question`` and an ``answer`` whose lines are the worked solution, one step a
line, ending with ``#### N``. Each step position of a solution gives one *group*: the question, the
reference's earlier steps (the context), the reference's next step (good) and corrupted versions of it
(bad), all judged after the same prefix (see ``docs/method.md``, calibrating the verdict):

* ``number``: the same step with its result number changed (the last number after ``=``, else the
  last number of the step), the mistake a weak draft makes most;
* ``copy``: a step copied from another problem;
* ``loop``: a repetition loop of the kind a small draft writes once it degenerates ("the amount of
  money she makes from the amount of money she makes ...").

The final ``#### N`` line becomes the step "The answer is N." (the answer format dreamr's prompts ask
for), and the calculator annotations ``<<48/2=24>>`` are dropped (a draft writes none).

A pair file holds one JSON object a line::

    {"question": str, "context_steps": [str, ...], "good_step": str, "bad_step": str}

(extra fields, such as ``"kind"``, are kept and ignored by the scorer).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from dreamr.jsonl import read_jsonl

__all__ = [
    "KINDS",
    "PAIR_FIELDS",
    "Problem",
    "Group",
    "Pair",
    "read_problems",
    "solution_steps",
    "change_result_number",
    "repetition_loop",
    "build_groups",
    "groups_to_pairs",
    "pairs_to_groups",
    "read_pairs",
    "write_pairs",
]

KINDS = ("number", "copy", "loop")
"""The kinds of bad step, in the order a group lists them."""

PAIR_FIELDS = ("question", "context_steps", "good_step", "bad_step")
"""The fields every line of a pair file must have."""

_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019]*")


@dataclass(frozen=True)
class Problem:
    """A GSM8K problem: its question, its solution's steps (the answer step last) and final answer."""

    question: str
    steps: tuple[str, ...]
    answer: str


@dataclass
class Group:
    """The steps judged after one prefix: ``question`` + ``context_steps``.

    ``good`` is the reference's next step; ``bad`` maps each kind of corruption to its step (kinds
    whose corruption does not apply, e.g. a step with no number, are left out). ``problem`` indexes the
    source problem (for splits by problem); ``position`` is the step's index in the solution.
    """

    question: str
    context_steps: list[str]
    good: str
    bad: dict[str, str] = field(default_factory=dict)
    problem: int = 0
    position: int = 0


@dataclass(frozen=True)
class Pair:
    """One line of a pair file."""

    question: str
    context_steps: tuple[str, ...]
    good_step: str
    bad_step: str
    kind: Optional[str] = None

    def to_json(self) -> dict:
        out = {"question": self.question, "context_steps": list(self.context_steps),
               "good_step": self.good_step, "bad_step": self.bad_step}
        if self.kind is not None:
            out["kind"] = self.kind
        return out


def solution_steps(answer: str) -> tuple[tuple[str, ...], str]:
    """The steps of a GSM8K ``answer`` (calculator annotations dropped) and its final answer.

    The ``#### N`` line becomes the last step, "The answer is N.". Raises ValueError where the answer
    has no ``####`` line.
    """
    if "####" not in answer:
        raise ValueError(f"answer: a GSM8K answer ends with a '#### N' line, got {answer[-80:]!r}")
    body, final = answer.rsplit("####", 1)
    final = final.strip()
    steps = [_CALC.sub("", line).strip() for line in body.splitlines()]
    steps = [s for s in steps if s]
    steps.append(f"The answer is {final}.")
    return tuple(steps), final


def read_problems(path: Union[str, Path], limit: Optional[int] = None, *, arg: str = "train") -> list[Problem]:
    """The problems of a GSM8K-format jsonl file (``question`` and ``answer`` on each line).

    Raises ValueError naming ``arg`` (the option the file came from), the file and line where a line is not
    JSON or lacks a field.
    """
    problems = []
    for n, item in read_jsonl(path, arg=arg):
        if not isinstance(item.get("question"), str) or not isinstance(item.get("answer"), str):
            raise ValueError(f"{arg}: {path}:{n}: a GSM8K line needs string fields 'question' and 'answer'")
        steps, final = solution_steps(item["answer"])
        problems.append(Problem(item["question"].strip(), steps, final))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _format_number(value: float, like: str) -> str:
    decimals = len(like.split(".", 1)[1]) if "." in like else 0
    text = f"{value:.{decimals}f}"
    if "," in like and decimals == 0:
        text = f"{int(value):,}"
    return text


def change_result_number(step: str, rng: random.Random) -> Optional[str]:
    """``step`` with its result number changed: the first number after the last ``=``, else the step's
    last number. Returns None where the step has no number."""
    matches = list(_NUMBER.finditer(step))
    if not matches:
        return None
    eq = step.rfind("=")
    after = [m for m in matches if m.start() > eq] if eq >= 0 else []
    m = after[0] if after else matches[-1]
    text = m.group(0)
    value = float(text.replace(",", ""))
    unit = 10 ** -(len(text.split(".", 1)[1])) if "." in text else 1
    candidates = []
    for d in range(1, 10):
        candidates.append(value + d * unit)
        if value - d * unit > 0:
            candidates.append(value - d * unit)
    candidates += [value * 2, value * 10]
    if value >= 4 * unit:
        candidates.append(value / 2)
    choices = [_format_number(c, text) for c in candidates]
    choices = [c for c in choices if c != text and float(c.replace(",", "")) >= 0]
    new = rng.choice(choices)
    return step[:m.start()] + new + step[m.end():]


_LINKS = (" from ", " of ", " and ", ", ", " ")


def repetition_loop(step: str, question: str, rng: random.Random) -> str:
    """A degenerate step that repeats itself, as a small draft writes once it loops.

    Either a phrase of 3-7 words (taken from the step, else the question) repeated 3-7 times with one
    connector ("the amount of money she makes from the amount of money she makes from ..."), after the
    step's first words, or the whole step repeated 3-4 times.
    """
    words = _WORD.findall(step)
    if len(words) < 4:
        words = _WORD.findall(question)
    if rng.random() < 0.25 and step:
        return " ".join([step] * rng.randint(3, 4))
    n = rng.randint(3, min(7, max(3, len(words))))
    start = rng.randint(0, max(0, len(words) - n))
    phrase = " ".join(words[start:start + n]).lower()
    link = rng.choice(_LINKS)
    lead = " ".join(words[:rng.randint(1, 3)])
    body = link.join([phrase] * rng.randint(3, 7))
    return f"{lead} {body}" if lead and not body.lower().startswith(lead.lower()) else body


def build_groups(
    problems: Sequence[Problem],
    *,
    seed: int = 0,
    positions: Union[str, int] = "all",
    kinds: Sequence[str] = KINDS,
) -> list[Group]:
    """Groups of good and bad steps from ``problems``.

    Parameters
    ----------
    problems : sequence of Problem
    seed : int
        Seeds the corruptions and the choice of positions (the same seed gives the same groups).
    positions : "all" or int
        "all": one group per step of each solution; an int ``k``: ``k`` positions drawn per problem.
    kinds : sequence of str
        The kinds of bad step to make (a subset of :data:`KINDS`).

    Returns
    -------
    list of Group, problem by problem and, within a problem, in step order (so consecutive groups
    of one problem share their prefix up to the earlier one's context: :mod:`.features` reuses it).
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)!r}")
    if positions != "all" and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
        raise ValueError(f"positions must be 'all' or an integer >= 1, got {positions!r}")
    rng = random.Random(seed)
    groups = []
    for index, problem in enumerate(problems):
        where = list(range(len(problem.steps)))
        if positions != "all" and positions < len(where):
            where = sorted(rng.sample(where, positions))
        for k in where:
            good = problem.steps[k]
            bad = {}
            if "number" in kinds:
                changed = change_result_number(good, rng)
                if changed is not None:
                    bad["number"] = changed
            if "copy" in kinds and len(problems) > 1:
                other = rng.randrange(len(problems) - 1)
                other += other >= index
                donor = problems[other].steps
                # an answer step copied from elsewhere is the "number" kind again: take a working step
                bad["copy"] = rng.choice(donor[:-1] if len(donor) > 1 else donor)
            if "loop" in kinds:
                bad["loop"] = repetition_loop(good, problem.question, rng)
            bad = {kind: text for kind, text in bad.items() if text != good}
            if bad:
                groups.append(Group(problem.question, list(problem.steps[:k]), good, bad, index, k))
    return groups


def groups_to_pairs(groups: Iterable[Group]) -> list[Pair]:
    """One pair per bad step of each group."""
    return [Pair(g.question, tuple(g.context_steps), g.good, text, kind)
            for g in groups for kind, text in g.bad.items()]


def pairs_to_groups(pairs: Sequence[Pair]) -> tuple[list[Group], list[tuple[int, int, int]]]:
    """Groups of the pairs that share a prefix and a good step, and where each pair's steps are.

    Returns ``(groups, where)``: ``where[i] = (group, good_index, bad_index)`` with indices into the
    group's step list ``[good] + list(bad.values())`` (so a good step shared by several pairs is scored
    once). A group's ``bad`` keys are ``"0"``, ``"1"``, ... in order of first appearance.
    """
    groups: list[Group] = []
    index: dict[tuple, int] = {}
    where = []
    for pair in pairs:
        key = (pair.question, tuple(pair.context_steps), pair.good_step)
        g = index.get(key)
        if g is None:
            g = index[key] = len(groups)
            groups.append(Group(pair.question, list(pair.context_steps), pair.good_step, {}, problem=g))
        bad = groups[g].bad
        texts = list(bad.values())
        if pair.bad_step in texts:
            b = texts.index(pair.bad_step)
        else:
            b = len(texts)
            bad[str(b)] = pair.bad_step
        where.append((g, 0, 1 + b))
    return groups, where


def read_pairs(path: Union[str, Path], limit: Optional[int] = None) -> list[Pair]:
    """The pairs of a pair file (see the module docstring).

    Raises ValueError naming ``pairs``, the file and the line where a line is not a JSON object, lacks
    one of :data:`PAIR_FIELDS`, or holds a field of the wrong type.
    """
    pairs = []
    for n, item in read_jsonl(path, arg="pairs"):
        missing = [k for k in PAIR_FIELDS if k not in item]
        if missing:
            raise ValueError(f"pairs: {path}:{n} lacks field(s) {missing}; every line needs {list(PAIR_FIELDS)}")
        ctx = item["context_steps"]
        if not all(isinstance(item[k], str) for k in ("question", "good_step", "bad_step")) \
                or not isinstance(ctx, list) or not all(isinstance(s, str) for s in ctx):
            raise ValueError(f"pairs: {path}:{n}: question, good_step and bad_step must be strings and "
                             "context_steps a list of strings")
        if not item["question"].strip() or not item["good_step"].strip() or not item["bad_step"].strip():
            raise ValueError(f"pairs: {path}:{n}: question, good_step and bad_step must not be empty")
        pairs.append(Pair(item["question"], tuple(ctx), item["good_step"], item["bad_step"], item.get("kind")))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise ValueError(f"pairs: {path} holds no pairs")
    return pairs


def write_pairs(path: Union[str, Path], pairs: Iterable[Pair]) -> int:
    """Write ``pairs`` as a pair file; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_json()) + "\n")
            n += 1
    return n
