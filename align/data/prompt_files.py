"""Prompt sets from a local file: ``.txt``, ``.jsonl``, ``.csv`` / ``.tsv`` and ``.parquet``.

* txt: one prompt per line (blank lines skipped).
* jsonl: one object per line with a ``prompt`` (or ``caption`` / ``text``) field,
  or a bare JSON string.
* csv / tsv: the ``Prompt`` column (PartiPrompts' ``PartiPrompts.tsv``),
  else ``prompt`` / ``caption`` / ``text``.
* parquet: the ``caption`` column (Pick-a-Pic), else ``prompt`` / ``text``; de-duplicated by
  default, keeping first occurrences in order, which is how Pick-a-Pic's ``test_unique`` split is
  made from ``test``.

``column=`` picks another column or field; ``dedupe=`` forces de-duplication on or off. An empty set
(after dropping empty prompts) is an error, raised before anything is loaded onto a device.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from align.extras import require

CANDIDATE_COLUMNS = ("Prompt", "prompt", "caption", "text", "Caption", "Text")
PARQUET_COLUMNS = ("caption", "prompt", "text", "Prompt")


class PromptSetError(ValueError):
    """A prompt set that cannot be used (missing, empty, no prompt column)."""


def _pick_column(
    available: list[str], column: str | None, candidates: tuple[str, ...], path: Path
) -> str:
    if column is not None:
        if column not in available:
            raise PromptSetError(
                f"prompt set {path}: no column {column!r} (columns: {', '.join(available)})"
            )
        return column
    for name in candidates:
        if name in available:
            return name
    raise PromptSetError(
        f"prompt set {path}: no prompt column among {', '.join(available)} "
        f"(expected one of {', '.join(candidates)}; pass --prompt-column)"
    )


def _read_jsonl(path: Path, column: str | None) -> list[str]:
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptSetError(f"prompt set {path}, line {lineno}: not JSON ({err})") from None
        if isinstance(row, str):
            prompts.append(row)
            continue
        if not isinstance(row, dict):
            raise PromptSetError(
                f"prompt set {path}, line {lineno}: expected an object or a string"
            )
        key = _pick_column(list(row), column, CANDIDATE_COLUMNS, path)
        prompts.append(str(row[key]))
    return prompts


def _read_delimited(path: Path, column: str | None) -> list[str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        key = _pick_column(list(reader.fieldnames or []), column, CANDIDATE_COLUMNS, path)
        return [row[key] or "" for row in reader]


def _read_parquet(path: Path, column: str | None) -> list[str]:
    pq = require("pyarrow.parquet", "data", "reading a .parquet prompt set")

    names = pq.ParquetFile(path).schema_arrow.names
    key = _pick_column(names, column, PARQUET_COLUMNS, path)
    # read only the prompt column: Pick-a-Pic's parquet files also hold the image bytes
    return [
        str(v) if v is not None else ""
        for v in pq.read_table(path, columns=[key]).column(key).to_pylist()
    ]


def read_prompts(
    path: str | Path,
    column: str | None = None,
    dedupe: bool | None = None,
    limit: int | None = None,
) -> list[str]:
    """The prompts of a local prompt-set file, in file order (see the module doc for formats)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptSetError(f"prompt set {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = path.read_text(encoding="utf-8").splitlines()
    elif suffix in (".jsonl", ".json"):
        prompts = _read_jsonl(path, column)
    elif suffix in (".csv", ".tsv"):
        prompts = _read_delimited(path, column)
    elif suffix == ".parquet":
        prompts = _read_parquet(path, column)
    else:
        raise PromptSetError(
            f"prompt set {path}: unknown format {suffix!r} (txt, jsonl, csv, tsv, parquet)"
        )
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if dedupe if dedupe is not None else suffix == ".parquet":
        prompts = list(dict.fromkeys(prompts))
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise PromptSetError(f"prompt set {path} is empty (no non-blank prompts)")
    return prompts
