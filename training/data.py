"""SAPO training data: JSONL rows with ``question`` and ``answer`` (GSM8K format).

Each line is a JSON object with a non-empty string ``question`` and a reference ``answer`` (a GSM8K
worked solution ending ``#### N``, or a bare number). A row may name images: ``image`` (a path) or
``images`` (a list of paths), relative paths taken from the JSONL file's folder. A vision-language draft
sees them before the question; a text-only draft reads the question alone while a vision-language
target sees them when it verifies the draft's steps; with two text-only models they are ignored (the
trainer says so). :attr:`Dataset.image_rows` counts the rows with images.

The order of prompts is a function of ``(seed, epoch)`` only, so a resumed run and a data-parallel run
see the same global sequence of prompts as a fresh single-process run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from dreamr.prompts import SYSTEM_PROMPT, chat_messages

__all__ = ["Example", "Dataset", "load_jsonl", "validate_rows", "draft_messages",
           "global_indices"]

@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    has_image: bool = False
    images: tuple[str, ...] = ()  # image paths (resolved), in order


@dataclass
class Dataset:
    examples: list[Example]
    source: str = "<memory>"
    image_rows: int = 0  # rows with images (whether a model sees them is the trainer's business)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def _row_images(row: dict, where: str, base_dir: Optional[Path]) -> tuple[str, ...]:
    """The row's image paths (``image``: a path; ``images``: a list of paths), relative ones from ``base_dir``."""
    paths = []
    for key in ("image", "images"):
        value = row.get(key)
        if value is None or value == "" or value == []:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
            raise ValueError(f"{where}: {key!r} must be an image path{' or a list of paths' if key == 'images' else ''}"
                             f", got {value!r}")
        for v in items:
            path = Path(v).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            paths.append(str(path))
    return tuple(paths)


def validate_rows(rows: Iterable[dict], source: str = "data", base_dir: Union[str, Path, None] = None) -> Dataset:
    """Check rows and turn them into a :class:`Dataset`; ValueError names the first bad row.

    Image paths are kept as given (relative ones joined to ``base_dir`` when given); whether each file
    is a readable image is checked by the trainer where a model sees the images."""
    base = Path(base_dir) if base_dir is not None else None
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
        paths = _row_images(row, where, base)
        images += bool(paths)
        examples.append(Example(q, a, bool(paths), paths))
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
    return validate_rows(rows, source=f"data={str(path)!r}", base_dir=p.parent)


def draft_messages(question: str, system_prompt: Optional[str] = SYSTEM_PROMPT, n_images: int = 0) -> list[dict]:
    """The conversation of one question, as evaluation and ``python -m dreamr`` send it to the reasoner
    (:func:`dreamr.prompts.chat_messages`: the system prompt asks for blank-line steps and "The answer is
    N."), so the draft is trained on the prompt it is used with, and the target judges in the same
    framing (:mod:`training.scoring`). With ``n_images``, the user message holds that many image parts
    ``{"type": "image"}`` before the question's text (a vision-language model's processor places them)."""
    messages = chat_messages(question, system_prompt)
    if n_images:
        messages[-1] = {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}
    return messages


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
