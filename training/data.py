"""SAPO training data: JSONL rows with ``question`` and ``answer`` (GSM8K format).

Each line is a JSON object with a non-empty string ``question`` and a reference ``answer`` (a GSM8K
worked solution ending ``#### N``, or a bare number). An ``image``/``images`` field is accepted and
ignored for now: the trainer is text-only until the step engines take vision-language models (a row with
an image is trained on its text alone; :func:`load_jsonl` counts such rows in ``ignored_images``).

The order of prompts is a function of ``(seed, epoch)`` only, so a resumed run and a data-parallel run
see the same global sequence of prompts as a fresh single-process run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

__all__ = ["Example", "Dataset", "load_jsonl", "validate_rows", "DEFAULT_SYSTEM_PROMPT", "draft_messages",
           "global_indices"]

DEFAULT_SYSTEM_PROMPT = (
    "Solve the math problem step by step. Write each step as a short paragraph and separate steps with a "
    "blank line. End with the final answer on its own line as '#### <number>'."
)


@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    has_image: bool = False


@dataclass
class Dataset:
    examples: list[Example]
    source: str = "<memory>"
    ignored_images: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def validate_rows(rows: Iterable[dict], source: str = "data") -> Dataset:
    """Check rows and turn them into a :class:`Dataset`; ValueError names the first bad row."""
    examples, images = [], 0
    for i, row in enumerate(rows):
        where = f"{source}: row {i + 1}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object with 'question' and 'answer' (got {type(row).__name__})")
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise ValueError(f"{where} has no {' and no '.join(repr(k) for k in missing)} field "
                             f"(keys: {sorted(row)}); every row needs 'question' and 'answer'")
        q, a = row["question"], row["answer"]
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string, got {q!r}")
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            raise ValueError(f"{where}: 'answer' must be a non-empty string or a number, got {a!r}")
        has_image = bool(row.get("image") or row.get("images"))
        images += has_image
        examples.append(Example(q, a, has_image))
    if not examples:
        raise ValueError(f"{source}: the dataset is empty (no rows with 'question' and 'answer')")
    return Dataset(examples, source, images)


def load_jsonl(path: Union[str, Path], limit: Optional[int] = None) -> Dataset:
    """Read a JSONL file of ``{"question", "answer"}`` rows (blank lines skipped); ``limit`` keeps the first n."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data={str(path)!r} is not a file (expected JSONL with 'question' and 'answer')")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"data={str(path)!r}: line {lineno} is not valid JSON ({e.msg})") from None
            if limit is not None and len(rows) >= limit:
                break
    return validate_rows(rows, source=f"data={str(path)!r}")


def draft_messages(question: str, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for the draft: an optional system instruction and the question."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}]


def global_indices(n_examples: int, step: int, batch_prompts: int, seed: int, shuffle: bool = True) -> list[int]:
    """Dataset indices of the ``batch_prompts`` prompts of optimizer step ``step`` (0-based).

    The stream of prompts is the concatenation of per-epoch permutations (``torch.randperm`` seeded with
    ``seed + epoch``), so it depends only on the arguments.
    """
    out = []
    start = step * batch_prompts
    cache: dict[int, list[int]] = {}
    for k in range(start, start + batch_prompts):
        epoch, pos = divmod(k, n_examples)
        if epoch not in cache:
            if shuffle:
                g = torch.Generator().manual_seed(int(seed) * 1000003 + epoch)
                cache[epoch] = torch.randperm(n_examples, generator=g).tolist()
            else:
                cache[epoch] = list(range(n_examples))
        out.append(cache[epoch][pos])
    return out
