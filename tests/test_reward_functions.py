"""Tests for reasonmaxxer.data.reward_functions: a user's "module:callable" reward, TRL style.

The functions under test are written into tmp_path as real modules and imported by name.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from reasonmaxxer.data.reward_functions import call_reward_function, load_reward_function
from reasonmaxxer.errors import ConfigError

MODULE = '''
import numpy as np

calls = []

def exact_choice(prompts, completions, completion_ids, answer, **kwargs):
    """Multiple choice: the last capital letter A-D of the completion against the answer."""
    calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                      answer=answer, **kwargs))
    out = []
    for text, gold in zip(completions, answer):
        letters = [c for c in text if c in "ABCD"]
        out.append(None if not letters else float(letters[-1] == gold))
    return out

def as_numpy(completions, **kwargs):
    return np.array([0.5] * len(completions))

def too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)

def words(completions, **kwargs):
    return ["yes" for _ in completions]

def too_big(completions, **kwargs):
    return [2.0 for _ in completions]

def not_a_list(completions, **kwargs):
    return 1.0

def no_kwargs(prompts, completions, completion_ids, answer):
    return [0.0 for _ in completions]

def broken(completions, **kwargs):
    raise KeyError("missing_field")

async def async_reward(completions, **kwargs):
    return [1.0 for _ in completions]

class Scorer:
    def __call__(self, completions, **kwargs):
        return [0.25 for _ in completions]

scorer = Scorer()
threshold = 0.5
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module named my_rewards_<test> in tmp_path, on sys.path."""
    name = f"my_rewards_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _batch():
    completions = ["I think B", "Surely the answer is C. Final: D", "no idea", "A"]
    return dict(prompts=["Q1"] * 2 + ["Q2"] * 2, completions=completions,
                completion_ids=[[1, 2], [3], [4, 5, 6], [7]],
                answer=["B", "C", "A", "A"], kind=["mc", "mc", "mc", "mc"], problem_id=["q1", "q1", "q2", "q2"])


def test_function_gets_trl_keywords_and_none_counts_as_zero(user_module):
    fn = load_reward_function(f"{user_module}:exact_choice")
    batch = _batch()
    rewards = call_reward_function(fn, f"{user_module}:exact_choice", **batch)
    # By hand: B == B; last letter D != C; no letter -> None -> 0; A == A.
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    (call,) = sys.modules[user_module].calls
    assert call == batch  # every column by keyword, one entry per completion


@pytest.mark.parametrize(("attr", "want"), [("as_numpy", 0.5), ("scorer", 0.25), ("async_reward", 1.0)])
def test_numpy_results_callable_objects_and_async_functions(user_module, attr, want):
    spec = f"{user_module}:{attr}"
    assert call_reward_function(load_reward_function(spec), spec, **_batch()) == [want] * 4


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("too_few", "reward.function '{m}:too_few' returned 3 rewards for 4 completions"),
        ("words", "reward.function '{m}:words' returned 'yes' for completion 0; rewards must be numbers in [0, 1]"),
        ("too_big", "reward.function '{m}:too_big' returned 2.0 for completion 0; rewards must be numbers in [0, 1]"),
        ("not_a_list", "reward.function '{m}:not_a_list' returned a float; expected a list of 4 floats"),
        ("no_kwargs", "reward.function '{m}:no_kwargs' raised TypeError: "),
        ("broken", "reward.function '{m}:broken' raised KeyError: 'missing_field'"),
    ],
)
def test_bad_results_are_one_line_errors_naming_the_function(user_module, attr, message):
    spec = f"{user_module}:{attr}"
    fn = load_reward_function(spec)
    with pytest.raises(ConfigError) as err:
        call_reward_function(fn, spec, **_batch())
    text = str(err.value)
    assert text.startswith(message.format(m=user_module)) and "\n" not in text, text
    if attr == "no_kwargs":
        assert "kind" in text and "**kwargs" in text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "reward.function: cannot import module 'no_such_module_xyz'"),
        ("{m}:missing", "reward.function: module '{m}' has no attribute 'missing'"),
        ("{m}:threshold", "reward.function: '{m}:threshold' is a float, not callable"),
        ("{m}", "reward.function: must be 'module:callable'"),
        ("{m}:", "reward.function: must be 'module:callable'"),
    ],
)
def test_load_errors_are_one_line(user_module, spec, message):
    with pytest.raises(ConfigError) as err:
        load_reward_function(spec.format(m=user_module))
    text = str(err.value)
    assert text.startswith(message.format(m=user_module)) and "\n" not in text, text


def test_module_that_fails_on_import(tmp_path, monkeypatch):
    (tmp_path / "crashy_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^reward.function: cannot import module 'crashy_rewards' "
                                          r"\(no module named 'no_such_dependency_xyz'\)"):
        load_reward_function("crashy_rewards:f")
    (tmp_path / "syntax_rewards.py").write_text("def f(:\n")
    with pytest.raises(ConfigError, match=r"^reward.function: importing module 'syntax_rewards' failed: SyntaxError"):
        load_reward_function("syntax_rewards:f")
    sys.modules.pop("crashy_rewards", None)


def test_a_module_in_the_current_folder_is_found_and_sys_path_is_restored(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards.py").write_text("def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    try:
        fn = load_reward_function("cwd_rewards:f")
    finally:
        sys.modules.pop("cwd_rewards", None)
    assert fn(completions=["a", "b"]) == [1.0, 1.0]
    assert sys.path == before
