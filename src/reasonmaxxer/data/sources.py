"""The problems of a run: training and held-out, disjoint, as its ``data`` section describes."""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .builtin import builtin_arithmetic
from .loaders import load_hf_dataset, load_local_file
from .problem import Problem, split_heldout


def load_problems(data: Any, *, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems.

    Args:
        data: the ``data`` config section (source, kinds, counts, dataset or file, columns).
        seed: the run's seed (built-in draws and the held-out split).
    """
    if data.source == "builtin":
        train = builtin_arithmetic(data.num_train, seed=seed, kinds=tuple(data.kinds), split="train")
        heldout = builtin_arithmetic(data.num_heldout, seed=seed, kinds=tuple(data.kinds), split="heldout")
        return train, heldout
    limit = data.num_train + data.num_heldout
    if data.source == "hf":
        rows = load_hf_dataset(data.name, config=data.config_name, split=data.split, prompt_column=data.prompt_column,
                               answer_column=data.answer_column, id_column=data.id_column, limit=limit)
    else:
        rows = load_local_file(data.path, prompt_column=data.prompt_column, answer_column=data.answer_column,
                               id_column=data.id_column, limit=limit)
    if not rows:
        raise DataError(f"data: the dataset has no rows ({data.source}: {data.name or data.path})")
    if data.num_heldout == 0:
        return rows[: data.num_train], []
    return split_heldout(rows, heldout=min(data.num_heldout, len(rows) - 1), seed=seed)
