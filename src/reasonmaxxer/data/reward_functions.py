"""A user's reward function, named ``"module:callable"``, called the way TRL calls its reward functions.

TRL's GRPOTrainer calls ``reward_func(prompts=..., completions=..., completion_ids=...,
**columns)`` with one list entry per completion and takes back a list of floats, None
meaning "not applicable" (TRL 1.16 leaves a completion that every function scored None
out of its group's baseline and gives it advantage 0). Here the columns are the
problem's ``answer``, ``kind`` and ``problem_id``, and a None reward counts as 0.0 (a
wrong answer): the offline recipe's pass rates, selection and pass@k stay defined for
every rollout. Rewards must lie in [0, 1]: problems are selected by their pass rate
(mixed success is 0 < mean reward < 1) and pass@k counts a reward of 1 as correct.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
import os
import sys
from typing import Any, Callable, Sequence

from ..errors import ConfigError

RewardFunction = Callable[..., Any]


def _first_line(error: BaseException, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _import_module(name: str) -> Any:
    """Import ``name``; the current folder is searched too (after sys.path), as `python -m` would."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_reward_function(spec: str) -> RewardFunction:
    """The callable that ``spec`` (``"package.module:name"``, ``name`` may be dotted) names.

    Raises a one-line ConfigError naming ``reward.function`` when the module cannot be
    imported, the attribute is missing or the object is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward.function: must be 'module:callable', e.g. 'my_rewards:exact_match', got {spec!r}")
    try:
        module = _import_module(module_name)
    except ModuleNotFoundError as error:
        missing = f" (no module named {error.name!r})" if error.name and error.name != module_name else ""
        raise ConfigError(
            f"reward.function: cannot import module {module_name!r}{missing}; put it on PYTHONPATH or in the "
            f"current folder"
        ) from None
    except Exception as error:  # the user's module failed while importing
        raise ConfigError(
            f"reward.function: importing module {module_name!r} failed: {type(error).__name__}: {_first_line(error)}"
        ) from error
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward.function: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward.function: {spec!r} is a {type(obj).__name__}, not callable")
    return obj


def _as_reward(value: Any, spec: str, index: int) -> float:
    """One returned reward as a float in [0, 1] (None -> 0.0); a one-line error otherwise."""
    if value is None:
        return 0.0
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise ConfigError(
        f"reward.function {spec!r} returned {value!r} for completion {index}; rewards must be numbers in "
        f"[0, 1] or None"
    )


def call_reward_function(
    function: RewardFunction,
    spec: str,
    *,
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    **columns: Sequence[Any],
) -> list[float]:
    """``function``'s rewards for a batch of completions, checked: one float in [0, 1] per completion.

    Args:
        prompts, completions, completion_ids: one entry per completion (a problem's
            prompt repeated for each of its samples), as TRL passes them.
        columns: further per-completion lists passed as keywords (``answer``, ...).
    """
    n = len(completions)
    try:
        out = function(prompts=list(prompts), completions=list(completions),
                       completion_ids=[list(c) for c in completion_ids], **{k: list(v) for k, v in columns.items()})
        if inspect.isawaitable(out):  # TRL also takes async reward functions
            out = asyncio.run(_awaited(out))
    except ConfigError:
        raise
    except Exception as error:
        hint = " (a TRL-style reward function takes **kwargs)" if isinstance(error, TypeError) else ""
        raise ConfigError(
            f"reward.function {spec!r} raised {type(error).__name__}: {_first_line(error)}{hint}"
        ) from error
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
        raise ConfigError(
            f"reward.function {spec!r} returned a {type(out).__name__}; expected a list of {n} floats "
            f"(one per completion)"
        )
    if len(out) != n:
        raise ConfigError(f"reward.function {spec!r} returned {len(out)} rewards for {n} completions")
    return [_as_reward(value, spec, i) for i, value in enumerate(out)]


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
