"""A problem with a checkable answer, the train/held-out split, and reading a run's problems back."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Problem:
    """One problem: the bare question (no instructions) and its gold answer as text."""

    id: str
    prompt: str
    answer: str
    kind: str = ""
    difficulty: int = 0


def shuffled_indices(n: int, seed: int) -> list[int]:
    """0..n-1 in an order fixed by ``seed`` (``data.shuffle``: which rows a run takes)."""
    return random.Random(f"reasonmaxxer-shuffle:{seed}").sample(range(n), n)


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
