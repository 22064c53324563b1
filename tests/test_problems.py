"""Tests for reasonmaxxer.data (builtin, loaders, problem): the arithmetic generator and the dataset loaders."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from reasonmaxxer.config.schema import DataConfig
from reasonmaxxer.data.builtin import KIND_DIFFICULTY, builtin_arithmetic
from reasonmaxxer.data.loaders import load_hf_dataset, load_local_file, normalize_answer
from reasonmaxxer.data.problem import Problem, split_heldout
from reasonmaxxer.data.sources import load_problems
from reasonmaxxer.errors import ConfigError, DataError

ALL_KINDS = ("add", "mul", "sub", "word")


def _numbers(prompt: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", prompt)]


def _recompute(problem: Problem) -> int:
    """The answer worked out again from the prompt text alone."""
    nums = _numbers(problem.prompt)
    if problem.kind == "add":
        a, b = nums
        assert "+" in problem.prompt or "sum" in problem.prompt or "Add" in problem.prompt
        return a + b
    if problem.kind == "mul":
        a, b = nums
        return a * b
    if problem.kind == "sub":
        a, b, c = nums
        return a + b - c
    assert problem.kind == "word"
    a, b, c = nums
    if "buys" in problem.prompt or "baked" in problem.prompt:
        return a + b * c
    if "gave" in problem.prompt:
        return a - b * c
    if "sells" in problem.prompt:
        b, c, a = nums  # the shop template names the boxes first
        return b * c - a
    raise AssertionError(f"unrecognised word problem: {problem.prompt}")


def _operands(problem: Problem) -> tuple:
    nums = _numbers(problem.prompt)
    if problem.kind in ("add", "mul"):
        nums = sorted(nums)
    return (problem.kind, *nums)


# --------------------------------------------------------------------------------------
# builtin_arithmetic
# --------------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed():
    first = builtin_arithmetic(40, seed=7, kinds=ALL_KINDS)
    again = builtin_arithmetic(40, seed=7, kinds=ALL_KINDS)
    other = builtin_arithmetic(40, seed=8, kinds=ALL_KINDS)
    assert first == again
    assert [p.prompt for p in first] != [p.prompt for p in other]


def test_answers_are_correct_by_construction():
    problems = builtin_arithmetic(400, seed=3, kinds=ALL_KINDS)
    for problem in problems:
        assert problem.answer == str(_recompute(problem)), problem
        assert int(problem.answer) > 0


def test_operand_ranges():
    for problem in builtin_arithmetic(400, seed=1, kinds=ALL_KINDS):
        nums = _numbers(problem.prompt)
        if problem.kind == "add":
            assert all(1 <= x <= 99 for x in nums)
        elif problem.kind == "mul":
            assert all(2 <= x <= 12 for x in nums)
        elif problem.kind == "sub":
            assert all(10 <= x <= 99 for x in nums)


def test_kinds_round_robin_ids_and_difficulty():
    problems = builtin_arithmetic(8, seed=0, kinds=ALL_KINDS)
    assert [p.kind for p in problems] == list(ALL_KINDS) * 2
    assert [p.id for p in problems[:4]] == ["train-add-0", "train-mul-1", "train-sub-2", "train-word-3"]
    assert len({p.id for p in builtin_arithmetic(200, seed=0, kinds=ALL_KINDS)}) == 200
    assert [p.difficulty for p in problems[:4]] == [1, 2, 3, 4]
    assert KIND_DIFFICULTY == {"add": 1, "mul": 2, "sub": 3, "word": 4}


def test_default_kinds_are_add_and_mul():
    problems = builtin_arithmetic(10, seed=0)
    assert {p.kind for p in problems} == {"add", "mul"}
    assert problems[0].kind == "add"


def test_phrasing_varies_and_prompts_are_bare_questions():
    problems = builtin_arithmetic(200, seed=2, kinds=ALL_KINDS)
    for kind in ALL_KINDS:
        shapes = {re.sub(r"\d+", "N", p.prompt) for p in problems if p.kind == kind}
        assert len(shapes) >= 2, kind
    for problem in problems:
        assert problem.prompt[0].isupper() and problem.prompt.rstrip()[-1] in "?."
        assert "Answer" not in problem.prompt


def test_each_kind_stream_is_independent_of_the_others():
    alone = [p.prompt for p in builtin_arithmetic(10, seed=5, kinds=("mul",))]
    mixed = [p.prompt for p in builtin_arithmetic(20, seed=5, kinds=("add", "mul")) if p.kind == "mul"]
    assert alone == mixed


def test_problems_distinct_within_a_split_until_pool_exhausted():
    problems = builtin_arithmetic(60, seed=4, kinds=("mul",))
    assert len({_numbers(p.prompt).__repr__() for p in problems}) == 60
    # mul's train pool holds 84 ordered pairs: asking for more repeats, never fails
    many = builtin_arithmetic(200, seed=4, kinds=("mul",))
    assert len(many) == 200
    assert len({tuple(_numbers(p.prompt)) for p in many}) == 84


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1), (11, 3)])
def test_train_and_heldout_are_disjoint(seeds):
    train_seed, heldout_seed = seeds
    train = builtin_arithmetic(300, seed=train_seed, kinds=ALL_KINDS)
    heldout = builtin_arithmetic(100, seed=heldout_seed, kinds=ALL_KINDS, split="heldout")
    assert {_operands(p) for p in train}.isdisjoint({_operands(p) for p in heldout})
    assert all(p.id.startswith("heldout-") for p in heldout)
    for problem in heldout:
        assert problem.answer == str(_recompute(problem))


def test_heldout_mul_pool_is_large_enough_for_an_eval():
    heldout = builtin_arithmetic(40, seed=0, kinds=("add", "mul"), split="heldout")
    mul = {tuple(_numbers(p.prompt)) for p in heldout if p.kind == "mul"}
    assert len(mul) == 20


def test_generator_argument_errors():
    with pytest.raises(ConfigError, match="'div'"):
        builtin_arithmetic(4, seed=0, kinds=("add", "div"))
    with pytest.raises(ConfigError, match="'test'"):
        builtin_arithmetic(4, seed=0, split="test")
    with pytest.raises(ConfigError):
        builtin_arithmetic(-1, seed=0)
    assert builtin_arithmetic(0, seed=0) == []


# --------------------------------------------------------------------------------------
# load_local_file
# --------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_basic_blank_lines_numbers_and_ids(tmp_path):
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"prompt": "What is 2 + 2?", "answer": 4},
            "",
            "   ",
            {"prompt": "Half of 1?", "answer": 0.5},
            {"prompt": "Big?", "answer": "It is #### 1,234"},
        ],
    )
    problems = load_local_file(path)
    assert problems == [
        Problem(id="mine-0", prompt="What is 2 + 2?", answer="4"),
        Problem(id="mine-1", prompt="Half of 1?", answer="0.5"),
        Problem(id="mine-2", prompt="Big?", answer="1234"),
    ]
    assert [p.id for p in load_local_file(path, limit=2)] == ["mine-0", "mine-1"]


def test_jsonl_custom_columns_and_id_column(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "Q1?", "gold": "7", "uid": 17}])
    (problem,) = load_local_file(path, prompt_column="question", answer_column="gold", id_column="uid")
    assert problem == Problem(id="17", prompt="Q1?", answer="7")


def test_json_array_file(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"prompt": "A?", "answer": "1"}, {"prompt": "B?", "answer": "2"}]))
    assert [p.answer for p in load_local_file(path)] == ["1", "2"]


def test_chat_message_prompt_takes_last_user_turn(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "answer": "7"}])
    assert load_local_file(path)[0].prompt == "What is 3 + 4?"


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_local_file(tmp_path / "nope.jsonl")
    message = _one_line_error(excinfo)
    assert "nope.jsonl" in message and "no such file" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\nA,1\n")
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    message = _one_line_error(excinfo)
    assert "data.csv" in message and "'.csv'" in message and ".jsonl" in message


def test_malformed_jsonl_row_names_line_and_json_error(tmp_path):
    path = _write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "A?", "answer": "1"}, "", '{"prompt": "B?", "answer": ']
    )
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    message = _one_line_error(excinfo)
    assert "bad.jsonl" in message and "line 3" in message and "invalid JSON" in message
    assert "Expecting value" in message


def test_row_that_is_not_an_object(tmp_path):
    path = _write_jsonl(tmp_path / "list.jsonl", [{"prompt": "A?", "answer": "1"}, [1, 2]])
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    message = _one_line_error(excinfo)
    assert "list.jsonl" in message and "line 2" in message and "JSON object" in message and "array" in message


def test_missing_column_names_line_and_column(tmp_path):
    path = _write_jsonl(
        tmp_path / "cols.jsonl", [{"prompt": "A?", "answer": "1"}, {"prompt": "B?", "solution": "2"}]
    )
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    message = _one_line_error(excinfo)
    assert "cols.jsonl" in message and "line 2" in message and "'answer'" in message and "solution" in message


def test_missing_id_column(tmp_path):
    path = _write_jsonl(tmp_path / "ids.jsonl", [{"prompt": "A?", "answer": "1"}])
    with pytest.raises(DataError, match=r"line 1.*'uid'"):
        load_local_file(path, id_column="uid")


@pytest.mark.parametrize("answer", ["", "   ", None, "reasoning only ####  "])
def test_empty_answer(tmp_path, answer):
    rows = [{"prompt": "A?", "answer": "1"}, {"prompt": "B?", "answer": answer}]
    path = _write_jsonl(tmp_path / "empty_answer.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    message = _one_line_error(excinfo)
    assert "empty_answer.jsonl" in message and "line 2" in message and "empty answer" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "void.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    message = _one_line_error(excinfo)
    assert "void.jsonl" in message and "no rows" in message


def test_duplicate_ids(tmp_path):
    rows = [{"prompt": "A?", "answer": "1", "id": "x"}, {"prompt": "B?", "answer": "2", "id": "x"}]
    path = _write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2: duplicate id 'x' \(first at .*line 1\)"):
        load_local_file(path, id_column="id")


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "question": ["What is 2 × 3?", "What is 10 + 5?", "Big one?"],
            "gold": [6.0, 15.0, 1234.0],
            "extra": ["a", "b", "c"],
        }
    )
    path = tmp_path / "set.parquet"
    pq.write_table(table, path)
    problems = load_local_file(path, prompt_column="question", answer_column="gold")
    assert problems == [
        Problem(id="set-0", prompt="What is 2 × 3?", answer="6"),
        Problem(id="set-1", prompt="What is 10 + 5?", answer="15"),
        Problem(id="set-2", prompt="Big one?", answer="1234"),
    ]
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    message = _one_line_error(excinfo)
    assert "set.parquet" in message and "'prompt'" in message and "question" in message


def test_parquet_null_answer_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"prompt": ["A?", "B?"], "answer": ["1", None]}), path)
    with pytest.raises(DataError, match=r"nulls\.parquet, row 2: empty answer"):
        load_local_file(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as excinfo:
        load_local_file(path)
    assert "corrupt.parquet" in _one_line_error(excinfo)


def test_normalize_answer():
    assert normalize_answer(72) == "72"
    assert normalize_answer(72.0) == "72"
    assert normalize_answer(2.5) == "2.5"
    assert normalize_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert normalize_answer("a #### b #### 1,234,567") == "1234567"
    assert normalize_answer("  \\frac{1}{2} ") == "\\frac{1}{2}"
    assert normalize_answer(None) == ""


# --------------------------------------------------------------------------------------
# load_hf_dataset (local packaged builders; never the hub)
# --------------------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 friends, then half as many. How many?",
        "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n48+24 = <<48+24=72>>72\n#### 72",
    },
    {"question": "A big number?", "answer": "Lots of steps\n#### 1,234"},
    {"question": "Third?", "answer": "#### 3"},
]


def test_load_hf_dataset_from_local_json_with_gsm8k_answers(hf_cache):
    path = _write_jsonl(hf_cache / "gsm.jsonl", GSM8K_ROWS)
    problems = load_hf_dataset(
        "json",
        config=None,
        split="train",
        prompt_column="question",
        answer_column="answer",
        data_files=str(path),
    )
    assert [p.answer for p in problems] == ["72", "1234", "3"]
    assert problems[0].prompt.startswith("Natalia sold clips")
    assert [p.id for p in problems] == ["json-train-0", "json-train-1", "json-train-2"]
    limited = load_hf_dataset(
        "json",
        config=None,
        split="train",
        prompt_column="question",
        answer_column="answer",
        data_files=str(path),
        limit=2,
    )
    assert len(limited) == 2


def test_load_hf_dataset_id_column(hf_cache):
    rows = [dict(r, idx=f"g{i}") for i, r in enumerate(GSM8K_ROWS)]
    path = _write_jsonl(hf_cache / "gsm_ids.jsonl", rows)
    problems = load_hf_dataset(
        "json",
        config=None,
        split="train",
        prompt_column="question",
        answer_column="answer",
        id_column="idx",
        data_files=str(path),
    )
    assert [p.id for p in problems] == ["g0", "g1", "g2"]


def test_load_hf_dataset_missing_column(hf_cache):
    path = _write_jsonl(hf_cache / "gsm2.jsonl", GSM8K_ROWS)
    with pytest.raises(DataError) as excinfo:
        load_hf_dataset(
            "json",
            config=None,
            split="train",
            prompt_column="problem",
            answer_column="answer",
            data_files=str(path),
        )
    message = _one_line_error(excinfo)
    assert "'problem'" in message and "'json'" in message and "question, answer" in message


def test_load_hf_dataset_unknown_split(hf_cache):
    path = _write_jsonl(hf_cache / "gsm3.jsonl", GSM8K_ROWS)
    with pytest.raises(DataError) as excinfo:
        load_hf_dataset(
            "json",
            config=None,
            split="test",
            prompt_column="question",
            answer_column="answer",
            data_files=str(path),
        )
    message = _one_line_error(excinfo)
    assert "'test'" in message and "HF_HUB_OFFLINE=1" in message


def test_load_hf_dataset_not_found_is_one_line(hf_cache):
    missing = hf_cache / "no" / "such" / "dataset"
    with pytest.raises(DataError) as excinfo:
        load_hf_dataset(str(missing), config=None, split="train", prompt_column="q", answer_column="a")
    message = _one_line_error(excinfo)
    assert str(missing) in message
    assert "HF_HUB_OFFLINE=1 only cached datasets or local files (data.path) work" in message


def test_load_hf_dataset_hub_id_offline(hf_cache):
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 so that no network is tried")
    with pytest.raises(DataError) as excinfo:
        load_hf_dataset(
            "no-such-org/no-such-dataset",
            config="main",
            split="train",
            prompt_column="question",
            answer_column="answer",
        )
    message = _one_line_error(excinfo)
    assert "no-such-org/no-such-dataset" in message and "HF_HUB_OFFLINE=1" in message


# --------------------------------------------------------------------------------------
# split_heldout
# --------------------------------------------------------------------------------------


def _pool(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"Question {i}?", answer=str(i)) for i in range(n)]


def test_split_heldout_is_seeded_disjoint_and_complete():
    problems = _pool(50)
    train, held = split_heldout(problems, heldout=10, seed=1)
    assert len(held) == 10 and len(train) == 40
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert {p.id for p in train} | {p.id for p in held} == {p.id for p in problems}
    assert split_heldout(problems, heldout=10, seed=1) == (train, held)
    assert split_heldout(problems, heldout=10, seed=2)[1] != held
    assert held == sorted(held, key=lambda p: int(p.id[1:]))  # keeps input order


def test_split_heldout_drops_train_duplicates_of_heldout_prompts():
    problems = _pool(20) + [Problem(id=f"dup{i}", prompt=f"Question {i}?", answer=str(i)) for i in range(20)]
    train, held = split_heldout(problems, heldout=5, seed=0)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})


def test_split_heldout_too_many():
    with pytest.raises(DataError, match="10 of 10"):
        split_heldout(_pool(10), heldout=10, seed=0)
    train, held = split_heldout(_pool(3), heldout=0, seed=0)
    assert len(train) == 3 and held == []


# --------------------------------------------------------------------------------------
# load_problems: data_files, shuffle, a held-out source of its own
# --------------------------------------------------------------------------------------


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"question": f"{prefix} question {i}?", "answer": str(i)} for i in range(n)]


def _data(**overrides) -> DataConfig:
    data = DataConfig(**{"prompt_column": "question", "num_train": 5, "num_heldout": 3, **overrides})
    data.validate()
    return data


def test_hf_json_data_files_with_a_heldout_split(hf_cache):
    train_file = _write_jsonl(hf_cache / "train.jsonl", _rows("train", 10))
    test_rows = _rows("test", 6)
    test_rows[1] = {"question": "train question 2?", "answer": "2"}  # also a training prompt
    test_file = _write_jsonl(hf_cache / "test.jsonl", test_rows)
    data = _data(source="hf", name="json", data_files={"train": str(train_file), "test": str(test_file)},
                 heldout_split="test")
    train, held = load_problems(data, seed=0)
    # Held-out: the first 3 test rows; train: the first 5 train rows less the one a test row repeats.
    assert [p.prompt for p in held] == ["test question 0?", "train question 2?", "test question 2?"]
    assert [p.prompt for p in train] == [f"train question {i}?" for i in (0, 1, 3, 4)]
    assert [p.id for p in held] == ["json-test-0", "json-test-1", "json-test-2"]
    # Without a held-out source the held-out problems are a share of the train split.
    train2, held2 = load_problems(_data(source="hf", name="json", data_files=str(train_file)), seed=0)
    assert {p.prompt for p in train2 + held2} == {f"train question {i}?" for i in range(8)}


def test_hf_shuffle_takes_seeded_rows_from_the_whole_split(hf_cache):
    path = _write_jsonl(hf_cache / "many.jsonl", _rows("q", 60))
    data = _data(source="hf", name="json", data_files=str(path), shuffle=True, num_heldout=0)
    first, _ = load_problems(data, seed=0)
    again, _ = load_problems(data, seed=0)
    other, _ = load_problems(data, seed=1)
    assert first == again and first != other
    top = [f"q question {i}?" for i in range(5)]
    assert [p.prompt for p in first] != top and len(first) == 5
    for p in first:  # each row keeps its own id and answer, wherever it was shuffled to
        i = int(p.answer)
        assert p.prompt == f"q question {i}?" and p.id == f"json-train-{i}"
    unshuffled, _ = load_problems(dataclasses.replace(data, shuffle=False), seed=0)
    assert [p.prompt for p in unshuffled] == top


def test_file_source_with_heldout_path_and_shuffle(tmp_path):
    train_file = _write_jsonl(tmp_path / "train.jsonl", _rows("train", 40))
    held_rows = _rows("held", 5) + [{"question": "train question 7?", "answer": "7"}]
    held_file = _write_jsonl(tmp_path / "held.jsonl", held_rows)
    data = _data(source="file", path=str(train_file), heldout_path=str(held_file), num_heldout=6, num_train=40)
    train, held = load_problems(data, seed=0)
    assert [p.prompt for p in held] == [r["question"] for r in held_rows]
    assert [p.prompt for p in train] == [f"train question {i}?" for i in range(40) if i != 7]
    shuffled = _data(source="file", path=str(train_file), heldout_path=str(held_file), num_train=5, shuffle=True)
    train_s, held_s = load_problems(shuffled, seed=3)
    assert len(held_s) == 3 and {p.prompt for p in held_s} <= {r["question"] for r in held_rows}
    assert [p.prompt for p in train_s] != [f"train question {i}?" for i in range(5)]
    assert train_s == load_problems(shuffled, seed=3)[0]


def test_heldout_source_that_repeats_every_training_prompt(tmp_path):
    rows = _rows("same", 3)
    data = _data(source="file", path=str(_write_jsonl(tmp_path / "a.jsonl", rows)),
                 heldout_path=str(_write_jsonl(tmp_path / "b.jsonl", rows)), num_train=3)
    with pytest.raises(DataError) as excinfo:
        load_problems(data, seed=0)
    assert "every training problem's prompt is also a held-out prompt" in _one_line_error(excinfo)


def test_missing_heldout_split_is_one_line(hf_cache):
    path = _write_jsonl(hf_cache / "only_train.jsonl", _rows("q", 10))
    data = _data(source="hf", name="json", data_files=str(path), heldout_split="test")
    with pytest.raises(DataError) as excinfo:
        load_problems(data, seed=0)
    message = _one_line_error(excinfo)
    assert "split 'test'" in message and "'json'" in message
