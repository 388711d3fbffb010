"""Reading JSON-lines files (datasets, training problems, pair files) with errors that name the line.

One reader for :mod:`dreamr.eval.data`, :mod:`dreamr.calibrate.pairs` and their callers, so every file
format dreamr takes reports a missing file, a malformed line or a line that is no object the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Union

__all__ = ["read_jsonl"]


def read_jsonl(path: Union[str, Path], *, arg: str) -> Iterator[tuple[int, dict]]:
    """The JSON objects of a JSON-lines file, one per non-blank line, with their line numbers.

    Parameters
    ----------
    path : str or Path
        The file.
    arg : str
        The name of the argument the file was given as (``"dataset"``, ``"pairs"``, ...): errors start with it.

    Yields
    ------
    (int, dict)
        The 1-based line number and the object on that line; blank lines are skipped.

    Raises
    ------
    ValueError
        ``"<arg>: no such file ..."`` for a missing file; ``"<arg>: <path>:<line> is not a JSON object ..."``
        for a line that does not parse or holds no object.

    Example
    -------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl"); _ = open(p, "w").write('{"a": 1}\\n\\n{"a": 2}\\n')
    >>> [(n, o["a"]) for n, o in read_jsonl(p, arg="data")]
    [(1, 1), (3, 2)]
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{arg}: no such file {str(path)!r}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{arg}: {path}:{n} is not a JSON object ({exc})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{arg}: {path}:{n} is not a JSON object (got {type(item).__name__})")
            yield n, item
