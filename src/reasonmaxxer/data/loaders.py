"""Problems from a Hugging Face dataset by name or from a local JSONL/JSON/parquet file.

Every user-fixable failure raises :class:`~reasonmaxxer.errors.DataError` (or
:class:`~reasonmaxxer.errors.ConfigError` for a bad argument) with a one-line message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .problem import Problem, shuffled_indices

# --------------------------------------------------------------------------------------
# Answer and prompt normalisation shared by the loaders
# --------------------------------------------------------------------------------------

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize_answer(value: Any) -> str:
    """Gold answer as text: numbers become strings (``72.0`` -> ``"72"``); in a
    gsm8k-style answer (``"... #### 1,234"``) only the part after the last ``####`` is
    kept, with thousands separators removed. Returns ``""`` for a missing answer."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    if "####" in text:
        text = _THOUSANDS_COMMA.sub("", text.rsplit("####", 1)[1])
    return text.strip()


def _prompt_text(value: Any) -> str | None:
    """The question text of a prompt cell, or None if it is not text.

    A list of chat messages (``[{"role": "user", "content": ...}, ...]``, as in
    SimpleRL-Zoo style data) gives the content of its last user message.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1].strip()
    return None


def _first_line(error: BaseException, limit: int = 300) -> str:
    """First line of an exception's message (type name if empty), truncated."""
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of rows or None, got {limit}")


def _make_problem(
    row: dict[str, Any],
    *,
    where: str,
    default_id: str,
    prompt_column: str,
    answer_column: str,
    id_column: str | None,
) -> Problem:
    """Build one Problem from a row; ``where`` (e.g. ``"data.jsonl, line 3"``) prefixes
    every error message."""
    for column in (prompt_column, answer_column, id_column):
        if column is not None and column not in row:
            have = ", ".join(map(str, row)) or "nothing"
            raise DataError(f"{where}: no column {column!r} (the row has: {have})")
    prompt = _prompt_text(row[prompt_column])
    if prompt is None:
        kind = type(row[prompt_column]).__name__
        raise DataError(f"{where}: column {prompt_column!r} holds a {kind}, expected text")
    if not prompt:
        raise DataError(f"{where}: empty prompt in column {prompt_column!r}")
    raw_answer = row[answer_column]
    if isinstance(raw_answer, (list, dict)):
        kind = type(raw_answer).__name__
        raise DataError(f"{where}: column {answer_column!r} holds a {kind}, expected text or a number")
    answer = normalize_answer(raw_answer)
    if not answer:
        raise DataError(f"{where}: empty answer in column {answer_column!r}")
    if id_column is None:
        problem_id = default_id
    else:
        problem_id = str(row[id_column]).strip()
        if row[id_column] is None or not problem_id:
            raise DataError(f"{where}: empty id in column {id_column!r}")
    return Problem(id=problem_id, prompt=prompt, answer=answer)


def _problems_from_rows(
    rows: Iterable[tuple[str, dict[str, Any]]],
    *,
    id_prefix: str,
    prompt_column: str,
    answer_column: str,
    id_column: str | None,
    limit: int | None,
    row_numbers: Sequence[int] | None = None,
) -> list[Problem]:
    """Problems from ``(where, row)`` pairs, stopping after ``limit``; ids must be unique.

    A row's default id is ``f"{id_prefix}-{n}"``, n its position or ``row_numbers[position]``.
    """
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        problem = _make_problem(
            row,
            where=where,
            default_id=f"{id_prefix}-{index if row_numbers is None else row_numbers[index]}",
            prompt_column=prompt_column,
            answer_column=answer_column,
            id_column=id_column,
        )
        if problem.id in first_seen:
            raise DataError(f"{where}: duplicate id {problem.id!r} (first at {first_seen[problem.id]})")
        first_seen[problem.id] = where
        problems.append(problem)
    return problems


# --------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------


def load_hf_dataset(
    name: str,
    *,
    config: str | None,
    split: str,
    prompt_column: str,
    answer_column: str,
    id_column: str | None = None,
    limit: int | None = None,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    shuffle_seed: int | None = None,
) -> list[Problem]:
    """Load problems with ``datasets.load_dataset(name, config, split=split, data_files=data_files)``.

    ``name`` is a hub id (only cached ones work offline), a local dataset folder, or a
    packaged builder (``"json"``, ``"parquet"``, ``"csv"``) together with ``data_files``.
    With ``shuffle_seed`` the rows are shuffled (seeded) before ``limit`` are taken. gsm8k-style answers keep only what follows the last ``####``. IDs default to
    ``f"{basename(name)}-{split}-{row}"`` (the row's index in the file, shuffled or not).
    Failures raise a one-line DataError.
    """
    _check_limit(limit)
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise DataError(
            f"loading dataset {name!r} needs the 'datasets' package: {_first_line(error)}"
        ) from error

    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as error:
        raise DataError(
            f"could not load dataset {name!r} (config {config!r}, split {split!r}): "
            f"{_first_line(error)}. With HF_HUB_OFFLINE=1 only cached datasets or local "
            f"files (data.path) work"
        ) from error
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"dataset {name!r} split {split!r} did not give a single table ({type(ds).__name__})")

    have = list(ds.column_names)
    for column in (prompt_column, answer_column, id_column):
        if column is not None and column not in have:
            raise DataError(f"dataset {name!r} has no column {column!r}; its columns are: {', '.join(have)}")
    if len(ds) == 0:
        raise DataError(f"dataset {name!r} split {split!r} has no rows")
    # The rows taken, by their index in the split (which also names them, shuffled or not).
    if shuffle_seed is None:
        row_numbers = list(range(len(ds)))
    else:
        row_numbers = shuffled_indices(len(ds), shuffle_seed)
    row_numbers = row_numbers[:limit] if limit is not None else row_numbers
    if shuffle_seed is not None or len(row_numbers) < len(ds):
        ds = ds.select(row_numbers)
    wanted = [c for c in dict.fromkeys((prompt_column, answer_column, id_column)) if c is not None]
    ds = ds.select_columns(wanted)

    label = name.rstrip("/").rsplit("/", 1)[-1] or name
    rows = ((f"dataset {name!r} split {split!r}, row {i}", row) for i, row in zip(row_numbers, ds))
    return _problems_from_rows(
        rows,
        id_prefix=f"{label}-{split}",
        prompt_column=prompt_column,
        answer_column=answer_column,
        id_column=id_column,
        limit=None,
        row_numbers=row_numbers,
    )


# --------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------

_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the file: {_first_line(error)}") from error


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each non-blank line of a JSON-lines text."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_json_type(row)}")
        yield where, row


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each element of a ``.json`` file holding one JSON array."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}, line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
        ) from error
    for index, row in enumerate(items):
        where = f"{path}, item {index}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_json_type(row)}")
        yield where, row


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` per row of a parquet file, reading only ``columns``."""
    import pyarrow.parquet as pq

    try:
        schema_names = pq.read_schema(path).names
    except Exception as error:
        raise DataError(f"{path}: cannot read as parquet: {_first_line(error)}") from error
    for column in columns:
        if column not in schema_names:
            raise DataError(f"{path}: no column {column!r}; its columns are: {', '.join(schema_names)}")
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as error:
        raise DataError(f"{path}: cannot read as parquet: {_first_line(error)}") from error
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}, row {index}", row


def load_local_file(
    path: str | Path,
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    id_column: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load problems from a ``.jsonl``/``.json`` (one JSON object per line; a ``.json``
    file holding a single array also works) or ``.parquet`` file.

    Blank lines are skipped; numeric answers become strings; gsm8k-style ``####``
    answers keep the final part. IDs default to ``f"{stem}-{row_index}"`` (0-based over
    data rows). Every problem (missing file, bad extension, malformed or non-object row,
    missing column, empty answer, empty file, duplicate id) raises a one-line DataError
    naming the file and, where it applies, the line or row.
    """
    _check_limit(limit)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        text = _read_text(path)
        is_array = suffix == ".json" and text.lstrip().startswith("[")
        rows = _json_array_rows(path, text) if is_array else _jsonl_rows(path, text)
    elif suffix in _PARQUET_SUFFIXES:
        columns = [c for c in dict.fromkeys((prompt_column, answer_column, id_column)) if c is not None]
        rows = _parquet_rows(path, columns)
    else:
        supported = ", ".join(_JSON_SUFFIXES + _PARQUET_SUFFIXES)
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use {supported}")

    problems = _problems_from_rows(
        rows,
        id_prefix=path.stem,
        prompt_column=prompt_column,
        answer_column=answer_column,
        id_column=id_column,
        limit=limit,
    )
    if not problems:
        raise DataError(f"{path}: no rows (the file is empty)")
    return problems

