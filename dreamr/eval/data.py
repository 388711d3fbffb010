"""The data of an evaluation: problems read from a JSONL dataset, their prompts, and the run's files.

A run folder holds ``records.jsonl`` (one JSON line per finished (problem, variant), appended and
flushed as each run ends, so an interrupted run resumes from it), ``meta.json`` (the resume
fingerprint), ``results.json`` (the report), ``sweep.json`` / ``sweep.png`` (accuracy and speedup per
alpha) and, where a variant runs with alpha="auto", ``alpha.json`` / ``alpha.png`` (its threshold step
by step). See ``docs/architecture.md`` (evaluation).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from dreamr.jsonl import read_jsonl
from dreamr.prompts import chat_messages

__all__ = ["RECORDS", "META", "RESULTS", "SWEEP_JSON", "SWEEP_PNG", "ALPHA_JSON", "ALPHA_PNG", "DEFAULT_FIELDS",
           "Problem", "load_problems", "select_problems", "prompt_for", "read_records", "sha256", "ends_mid_line"]

RECORDS = "records.jsonl"
META = "meta.json"
RESULTS = "results.json"
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
ALPHA_JSON = "alpha.json"
ALPHA_PNG = "alpha.png"

DEFAULT_FIELDS = {"question": "question", "answer": "answer", "id": None}
"""GSM8K's field names: the question, the reference answer (a worked solution ending ``#### N``), no id."""


@dataclass
class Problem:
    """One problem of the dataset.

    Attributes
    ----------
    index : int
        0-based line index among the dataset's non-blank lines.
    key : str
        The id field's value, or the index as text; records are keyed by it.
    question : str
        The problem text.
    reference : str
        The answer field as written (e.g. a GSM8K worked solution ending "#### 18").
    """

    index: int
    key: str
    question: str
    reference: str


def sha256(path: Union[str, Path]) -> str:
    """The hex SHA-256 of a file's bytes (the dataset's identity in the resume fingerprint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_problems(path: Union[str, Path], *, fields: Optional[dict] = None, limit: Optional[int] = None,
                  offset: int = 0) -> list[Problem]:
    """Read a JSONL dataset: one JSON object per line with a question and a reference answer.

    Parameters
    ----------
    path : str or Path
        The JSONL file; blank lines are skipped (and not counted in ``Problem.index``).
    fields : dict, optional
        Maps the roles "question", "answer" and optionally "id" to the dataset's field names (default
        :data:`DEFAULT_FIELDS`, GSM8K's).
    limit : int, optional
        At most this many problems (after ``offset``).
    offset : int
        Skip this many problems first.

    Returns
    -------
    list of Problem

    Raises
    ------
    ValueError
        Naming the file and line on a missing file, a malformed line, a missing field or duplicate ids.
    """
    path = Path(path)
    f = dict(DEFAULT_FIELDS)
    f.update(fields or {})
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}")
    problems: list[Problem] = []
    for index, (lineno, item) in enumerate(read_jsonl(path, arg="dataset")):
        if index < offset:
            continue
        if limit is not None and len(problems) >= limit:
            break
        for role in ("question", "answer"):
            if f[role] not in item:
                raise ValueError(f"dataset {path}: line {lineno} has no {role} field {f[role]!r} "
                                 f"(fields: {sorted(item)}; map it with fields={{'{role}': ...}})")
        key = str(item[f["id"]]) if f.get("id") and f["id"] in item else str(index)
        problems.append(Problem(index, key, str(item[f["question"]]), str(item[f["answer"]])))
    keys = [p.key for p in problems]
    if len(set(keys)) != len(keys):
        raise ValueError(f"dataset {path}: the id field {f.get('id')!r} has duplicate values")
    return problems


def select_problems(dataset: Union[str, Path], settings) -> list[Problem]:
    """The problems an :class:`~dreamr.eval.settings.EvalSettings` selects (its fields, limit, offset).

    Raises ValueError when none is selected or the file is bad (see :func:`load_problems`).
    """
    problems = load_problems(dataset, fields=settings.fields, limit=settings.limit, offset=settings.offset)
    if not problems:
        raise ValueError(f"dataset {dataset}: no problems selected (offset={settings.offset}, limit={settings.limit})")
    return problems


def prompt_for(problem: Problem, settings):
    """The prompt of ``problem`` under ``settings``: chat messages ``[system, user]`` (the system prompt
    of :mod:`dreamr.prompts` unless the settings give another or none), or the question as plain text
    with ``settings.chat`` False. The same framing as ``python -m dreamr``."""
    if not settings.chat:
        return problem.question
    return chat_messages(problem.question, settings.system_prompt)


def ends_mid_line(path: Union[str, Path]) -> bool:
    """True when a non-empty file does not end with a newline (a run killed while writing its last line)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def read_records(path: Union[str, Path]) -> list[dict]:
    """Records of a ``records.jsonl``, in the order they were written; a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
