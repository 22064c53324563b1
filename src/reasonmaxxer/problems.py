"""Sources of problems with checkable answers.

Three sources, all returning :class:`Problem` lists:

* :func:`builtin_arithmetic` — a seeded generator of arithmetic word problems at graded
  difficulty (the embedded default; needs no download);
* :func:`load_hf_dataset` — a Hugging Face dataset by name (gsm8k, MATH, ...), or a
  packaged builder such as ``"json"``/``"parquet"`` with ``data_files``;
* :func:`load_local_file` — a local ``.jsonl``/``.json``/``.parquet`` file.

:func:`split_heldout` carves a seeded held-out set out of an external dataset.

Every user-fixable failure raises :class:`~reasonmaxxer.errors.DataError` (or
:class:`~reasonmaxxer.errors.ConfigError` for a bad argument) with a one-line message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonmaxxer.errors import ConfigError, DataError

__all__ = [
    "KIND_DIFFICULTY",
    "Problem",
    "builtin_arithmetic",
    "load_hf_dataset",
    "load_local_file",
    "normalize_answer",
    "split_heldout",
]


@dataclass(frozen=True)
class Problem:
    """One problem: the bare question (no instructions) and its gold answer as text."""

    id: str
    prompt: str
    answer: str
    kind: str = ""
    difficulty: int = 0


# --------------------------------------------------------------------------------------
# Built-in arithmetic generator
# --------------------------------------------------------------------------------------

KIND_DIFFICULTY: dict[str, int] = {"add": 1, "mul": 2, "sub": 3, "word": 4}
"""Difficulty of each built-in kind, 1 (easiest) to 4."""

SPLITS = ("train", "heldout")

# Share of each kind's operand space reserved for the "heldout" split. The partition is
# a fixed hash of the canonical operands, independent of seed and n, so no train set of
# any seed can contain a held-out problem. 30% holds out 37 of the 121 `a × b` pairs.
_HELDOUT_PERCENT = 30

# Consecutive rejected draws after which a kind's pool counts as exhausted for this call
# (then repeats are allowed). For the smallest pool (`mul`, 84 train pairs) missing
# a remaining pair this many times in a row has probability < e^-80.
_MAX_REJECTIONS = 10_000

_ADD_TEMPLATES = (
    "What is {a} + {b}?",
    "What is the sum of {a} and {b}?",
    "Add {a} and {b}. What number do you get?",
)
_MUL_TEMPLATES = (
    "What is {a} × {b}?",
    "What is {a} times {b}?",
    "What is the product of {a} and {b}?",
)
_SUB_TEMPLATES = (
    "What is {a} + {b} - {c}?",
    "Compute {a} plus {b} minus {c}.",
    "Start with {a}, add {b}, then subtract {c}. What number do you get?",
)
# Two-step word problems, by the form of their answer. Numbers appear in the prompt in
# the order a, b, c except for "b*c-a" (b, c, a).
_WORD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "a+b*c": (
        "{name} has {a} {items}. {pron} buys {b} bags with {c} {items} in each bag. "
        "How many {items} does {name} have now?",
        "A baker made {a} muffins in the morning. In the afternoon she baked {b} trays "
        "of {c} muffins each. How many muffins did she bake in total?",
    ),
    "a-b*c": (
        "{name} had {a} {items}. {pron} gave {b} {items} to each of {c} friends. "
        "How many {items} does {name} have left?",
    ),
    "b*c-a": (
        "A shop has {b} boxes with {c} {items} in each box. It sells {a} {items}. "
        "How many {items} are left in the shop?",
    ),
}
_NAMES = (("Sam", "He"), ("Mia", "She"), ("Omar", "He"), ("Lena", "She"), ("Ravi", "He"))
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards")

# A drawn problem: (operand key that identifies it, prompt, answer).
_Draw = tuple[tuple[Any, ...], str, int]


def _draw_add(rng: random.Random) -> _Draw:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return ("add", a, b), rng.choice(_ADD_TEMPLATES).format(a=a, b=b), a + b


def _draw_mul(rng: random.Random) -> _Draw:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return ("mul", a, b), rng.choice(_MUL_TEMPLATES).format(a=a, b=b), a * b


def _draw_sub(rng: random.Random) -> _Draw:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    c = rng.randint(10, min(99, a + b - 1))  # keeps the answer positive
    return ("sub", a, b, c), rng.choice(_SUB_TEMPLATES).format(a=a, b=b, c=c), a + b - c


def _draw_word(rng: random.Random) -> _Draw:
    form = rng.choice(sorted(_WORD_TEMPLATES))
    b, c = rng.randint(2, 9), rng.randint(2, 12)
    if form == "a+b*c":
        a = rng.randint(2, 60)
        answer = a + b * c
    elif form == "a-b*c":
        a = b * c + rng.randint(1, 40)
        answer = a - b * c
    else:
        a = rng.randint(1, b * c - 1)
        answer = b * c - a
    name, pron = rng.choice(_NAMES)
    template = rng.choice(_WORD_TEMPLATES[form])
    prompt = template.format(a=a, b=b, c=c, name=name, pron=pron, items=rng.choice(_ITEMS))
    return ("word", form, a, b, c), prompt, answer


_DRAWERS: dict[str, Callable[[random.Random], _Draw]] = {
    "add": _draw_add,
    "mul": _draw_mul,
    "sub": _draw_sub,
    "word": _draw_word,
}


def _canonical(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """The operand key with commutative operands sorted, so `3 × 4` and `4 × 3` (or
    `a + b − c` and `b + a − c`) always fall on the same side of the split."""
    kind = key[0]
    if kind in ("add", "mul"):
        return (kind, *sorted(key[1:]))
    if kind == "sub":
        return (kind, *sorted(key[1:3]), key[3])
    return key


def _split_of(key: tuple[Any, ...]) -> str:
    """Which split owns a problem: a stable hash (not Python's salted hash())."""
    digest = hashlib.blake2b(repr(_canonical(key)).encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "big") % 100 < _HELDOUT_PERCENT else "train"


def _kind_stream(kind: str, *, seed: int, split: str) -> Iterator[tuple[str, int]]:
    """Endless (prompt, answer) stream of one kind for one split.

    Problems are distinct (by operands) until the split's pool of the kind is
    exhausted; then a new pass starts and repeats are allowed.
    """
    rng = random.Random(f"reasonmaxxer:{seed}:{split}:{kind}")
    draw = _DRAWERS[kind]
    seen: set[tuple[Any, ...]] = set()
    while True:
        for _ in range(_MAX_REJECTIONS):
            key, prompt, answer = draw(rng)
            if key not in seen and _split_of(key) == split:
                break
        else:
            seen.clear()
            continue
        seen.add(key)
        yield prompt, answer


def builtin_arithmetic(
    n: int,
    *,
    seed: int,
    kinds: Sequence[str] = ("add", "mul"),
    split: str = "train",
) -> list[Problem]:
    """Generate ``n`` arithmetic problems whose answers are correct by construction.

    Kinds (difficulty): ``"add"`` a + b, a, b in 1..99 (1); ``"mul"`` a × b, a, b in
    2..12 (2); ``"sub"`` a + b − c, two-digit, positive result (3); ``"word"`` two-step
    word problems (4). Kinds are interleaved round-robin; each kind draws from its own
    RNG derived from (seed, split, kind), so adding a kind leaves the others unchanged.

    Train/held-out disjointness: every problem's operands (commutative ones sorted) are
    assigned to ``"train"`` or ``"heldout"`` by a fixed hash, and each split only draws
    from its own side. So the two splits never share a problem, whatever the seeds and
    sizes. Within one call problems are distinct until a kind's pool is used up (only
    ``"mul"`` is small: 84 train and 37 held-out ordered pairs), after which repeats
    are allowed. IDs are ``f"{split}-{kind}-{i}"`` with ``i`` the position in the list.
    """
    if n < 0:
        raise ConfigError(f"builtin_arithmetic: n must be >= 0, got {n}")
    if split not in SPLITS:
        raise ConfigError(f"builtin_arithmetic: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not kinds:
        raise ConfigError("builtin_arithmetic: kinds is empty; use some of add, mul, sub, word")
    unknown = [k for k in kinds if k not in _DRAWERS]
    if unknown:
        raise ConfigError(
            f"builtin_arithmetic: unknown kind {unknown[0]!r}; use some of {', '.join(_DRAWERS)}"
        )
    kinds = list(dict.fromkeys(kinds))  # a repeated kind would reuse its stream twice
    streams = {kind: _kind_stream(kind, seed=seed, split=split) for kind in kinds}
    problems = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        prompt, answer = next(streams[kind])
        problems.append(
            Problem(
                id=f"{split}-{kind}-{i}",
                prompt=prompt,
                answer=str(answer),
                kind=kind,
                difficulty=KIND_DIFFICULTY[kind],
            )
        )
    return problems


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
) -> list[Problem]:
    """Problems from ``(where, row)`` pairs, stopping after ``limit``; ids must be unique."""
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        problem = _make_problem(
            row,
            where=where,
            default_id=f"{id_prefix}-{index}",
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
    data_files: str | Sequence[str] | None = None,
) -> list[Problem]:
    """Load problems with ``datasets.load_dataset(name, config, split=split)``.

    ``name`` is a hub id (only cached ones work offline), a local dataset folder, or a
    packaged builder (``"json"``, ``"parquet"``, ``"csv"``) together with ``data_files``.
    gsm8k-style answers keep only what follows the last ``####``. IDs default to
    ``f"{basename(name)}-{split}-{row}"``. Failures raise a one-line DataError.
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
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    wanted = [c for c in dict.fromkeys((prompt_column, answer_column, id_column)) if c is not None]
    ds = ds.select_columns(wanted)

    label = name.rstrip("/").rsplit("/", 1)[-1] or name
    rows = ((f"dataset {name!r} split {split!r}, row {i}", row) for i, row in enumerate(ds))
    return _problems_from_rows(
        rows,
        id_prefix=f"{label}-{split}",
        prompt_column=prompt_column,
        answer_column=answer_column,
        id_column=id_column,
        limit=None,
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


# --------------------------------------------------------------------------------------
# Held-out split for external datasets
# --------------------------------------------------------------------------------------


def split_heldout(problems: list[Problem], *, heldout: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Split into ``(train, heldout)``: ``heldout`` problems drawn with ``seed``.

    Both lists keep the input order. Train problems whose prompt text equals a held-out
    prompt (duplicates in the source) are dropped from train so nothing leaks, which can
    leave train slightly smaller than ``len(problems) - heldout``.
    """
    if heldout < 0:
        raise ConfigError(f"split_heldout: heldout must be >= 0, got {heldout}")
    if heldout >= len(problems):
        raise DataError(
            f"cannot hold out {heldout} of {len(problems)} problems: nothing would be left to train on"
        )
    order = list(range(len(problems)))
    random.Random(f"reasonmaxxer-split:{seed}").shuffle(order)
    chosen = set(order[:heldout])
    held = [p for i, p in enumerate(problems) if i in chosen]
    held_prompts = {p.prompt.strip() for p in held}
    train = [p for i, p in enumerate(problems) if i not in chosen and p.prompt.strip() not in held_prompts]
    if not train:
        raise DataError(
            f"holding out {heldout} of {len(problems)} problems leaves no train problem "
            f"with a prompt different from the held-out ones"
        )
    return train, held


def read_split(path: str | Path, split: str) -> list[Problem]:
    """The problems of one split from a run's problems.jsonl (rows carry a "split" field)."""
    fields = {f.name for f in dataclasses.fields(Problem)}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Problem(**{k: v for k, v in r.items() if k in fields}) for r in rows if r.get("split") == split]
