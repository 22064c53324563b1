"""The problems of a run: training and held-out, disjoint, as its ``data`` section describes."""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .builtin import builtin_arithmetic
from .loaders import load_hf_dataset, load_local_file
from .problem import Problem, shuffled_indices, split_heldout


def load_problems(data: Any, *, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems.

    Without a held-out source of its own (``data.heldout_split`` / ``data.heldout_path``),
    the held-out problems are a seeded share of the ``num_train + num_heldout`` rows taken
    from the source; with one, training problems come from the source and held-out ones
    from it. Either way a training problem whose prompt equals a held-out prompt is dropped.

    Args:
        data: the ``data`` config section (source, kinds, counts, dataset or file, columns).
        seed: the run's seed (built-in draws, ``data.shuffle`` and the held-out split).
    """
    if data.source == "builtin":
        train = builtin_arithmetic(data.num_train, seed=seed, kinds=tuple(data.kinds), split="train")
        heldout = builtin_arithmetic(data.num_heldout, seed=seed, kinds=tuple(data.kinds), split="heldout")
        return train, heldout
    own_heldout = data.heldout_split is not None or data.heldout_path is not None
    limit = data.num_train if own_heldout else data.num_train + data.num_heldout
    if data.source == "hf":
        rows = _hf_rows(data, data.split, limit=limit, seed=seed)
    else:
        rows = _file_rows(data, data.path, limit=limit, seed=seed)
    if not rows:
        raise DataError(f"data: the dataset has no rows ({data.source}: {data.name or data.path})")
    if own_heldout:
        return _drop_heldout_prompts(rows, _own_heldout(data, seed=seed), data)
    if data.num_heldout == 0:
        return rows[: data.num_train], []
    return split_heldout(rows, heldout=min(data.num_heldout, len(rows) - 1), seed=seed)


def _hf_rows(data: Any, split: str, *, limit: int, seed: int) -> list[Problem]:
    return load_hf_dataset(data.name, config=data.config_name, split=split, prompt_column=data.prompt_column,
                           answer_column=data.answer_column, id_column=data.id_column, limit=limit,
                           data_files=data.data_files, shuffle_seed=seed if data.shuffle else None)


def _file_rows(data: Any, path: str, *, limit: int, seed: int) -> list[Problem]:
    columns = {"prompt_column": data.prompt_column, "answer_column": data.answer_column, "id_column": data.id_column}
    if not data.shuffle:
        return load_local_file(path, **columns, limit=limit)
    rows = load_local_file(path, **columns)
    return [rows[i] for i in shuffled_indices(len(rows), seed)][:limit]


def _own_heldout(data: Any, *, seed: int) -> list[Problem]:
    """``num_heldout`` problems from ``data.heldout_split`` or ``data.heldout_path``."""
    if data.num_heldout == 0:
        return []
    if data.heldout_split is not None:
        return _hf_rows(data, data.heldout_split, limit=data.num_heldout, seed=seed)
    return _file_rows(data, data.heldout_path, limit=data.num_heldout, seed=seed)


def _drop_heldout_prompts(train: list[Problem], heldout: list[Problem], data: Any) -> tuple[list[Problem],
                                                                                              list[Problem]]:
    """Training problems whose prompt is also a held-out one leave train, so nothing leaks."""
    held_prompts = {p.prompt.strip() for p in heldout}
    kept = [p for p in train if p.prompt.strip() not in held_prompts]
    if not kept:
        where = data.heldout_split if data.heldout_split is not None else data.heldout_path
        raise DataError(f"data: every training problem's prompt is also a held-out prompt (from {where!r}); "
                        f"nothing is left to train on")
    return kept, heldout
