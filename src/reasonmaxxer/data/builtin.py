"""The built-in task: a seeded generator of arithmetic word problems at graded difficulty.

It needs no download (the embedded default). Train and held-out problems come from
disjoint halves of each kind's operand space, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from ..errors import ConfigError
from .problem import SPLITS, Problem

ProblemKind = Literal["add", "mul", "sub", "word"]
"""add: a + b; mul: a * b; sub: a + b - c; word: two-step word problems."""
PROBLEM_KINDS: tuple[str, ...] = typing.get_args(ProblemKind)

KIND_DIFFICULTY: dict[str, int] = {"add": 1, "mul": 2, "sub": 3, "word": 4}
"""Difficulty of each built-in kind, 1 (easiest) to 4."""

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
        raise ConfigError(f"builtin_arithmetic: kinds is empty; use some of {', '.join(PROBLEM_KINDS)}")
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

