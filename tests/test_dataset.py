"""training/dataset.py: a user's rollouts as the trainer's columns, against independent computations."""

from __future__ import annotations

import statistics

import datasets
import pytest
import torch

from reasonmaxxer.errors import DataError
from reasonmaxxer.training.dataset import ForkCollator, prepare_fork_dataset, rollouts_fingerprint

KW = dict(advantage_clip=2.5, drop_uniform_groups=True, needs_topk=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _rows():
    """Three prompts: one mixed (1, 0, 0, 1, 1), one all-correct, one with a half reward."""
    out = []
    for q, rewards in (("What is 2 + 3?", [1, 0, 0, 1, 1]), ("What is 7 * 8?", [1, 1]), ("What is 9 - 4?", [0.5, 0])):
        for j, r in enumerate(rewards):
            out.append({"prompt": q, "completion": f" The answer is {j + 3}.", "reward": float(r)})
    return out


def test_advantages_are_each_prompts_z_scores_and_uniform_prompts_are_dropped(tokenizer) -> None:
    rows = _rows()
    ds = prepare_fork_dataset(datasets.Dataset.from_list(rows), tokenizer, **KW)
    expected = []
    for q in dict.fromkeys(r["prompt"] for r in rows):
        rewards = [r["reward"] for r in rows if r["prompt"] == q]
        mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
        if std > 0:
            expected += [max(-2.5, min(2.5, (r - mean) / std)) for r in rewards]
    assert ds["advantage"] == pytest.approx(expected, abs=1e-6)
    assert len(ds) == 7  # the all-correct prompt's 2 completions are dropped
    assert ds["rollout_index"] == list(range(7))
    assert ds["length"] == [len(p) + len(c) for p, c in zip(ds["prompt_ids"], ds["completion_ids"])]

    kept = prepare_fork_dataset(datasets.Dataset.from_list(rows), tokenizer, **dict(KW, drop_uniform_groups=False))
    assert len(kept) == 9 and kept["advantage"][5:7] == [0.0, 0.0]


def test_text_rows_end_with_eos_and_chat_rows_with_the_template(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    text = prepare_fork_dataset(datasets.Dataset.from_list(
        [{"prompt": "What is 2 + 3?", "completion": " 5", "advantage": 1.0},
         {"prompt": "What is 2 + 3?", "completion": " 5<|im_end|>", "advantage": -1.0}]), tokenizer, **KW)
    assert text["prompt_ids"][0] == tokenizer("What is 2 + 3?").input_ids
    assert text["completion_ids"][0] == tokenizer(" 5", add_special_tokens=False).input_ids + [eos]
    assert text["completion_ids"][1] == text["completion_ids"][0]  # an EOS already there is not doubled

    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    chat = prepare_fork_dataset(datasets.Dataset.from_list(
        [{"prompt": prompt, "completion": [{"role": "assistant", "content": "5"}], "advantage": 1.0}]),
        tokenizer, **KW)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "5"}], tokenize=False)
    rendered = tokenizer.decode(chat["prompt_ids"][0] + chat["completion_ids"][0])
    assert rendered == full
    assert tokenizer.decode(chat["prompt_ids"][0]) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)


def test_pretokenized_rows_and_score_columns_are_taken_as_given(tokenizer) -> None:
    rows = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9], "advantage": 0.5,
             "base_entropy": [0.1, 2.0], "base_logp": [-0.2, -1.5], "topk_ids": [[8, 3], [9, 4]],
             "topk_logp": [[-0.2, -2.0], [-1.5, -1.6]]},
            {"prompt_ids": [5], "completion_ids": [10], "advantage": -0.5, "base_entropy": [1.0],
             "base_logp": [-3.0], "topk_ids": [[1, 10]], "topk_logp": [[-0.1, -3.0]]}]
    ds = prepare_fork_dataset(datasets.Dataset.from_list(rows), tokenizer, **dict(KW, needs_topk=True))
    batch = ForkCollator(pad_id=2)([ds[i] for i in range(2)])
    assert batch["completion_ids"].tolist() == [[8, 9], [10, 2]]
    assert batch["completion_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["advantages"].tolist() == [0.5, -0.5]
    assert torch.allclose(batch["base_entropy"], torch.tensor([[0.1, 2.0], [1.0, 0.0]]))
    assert batch["topk_ids"].dtype == torch.long and batch["topk_ids"][1, 0].tolist() == [1, 10]
    assert batch["topk_logp"].shape == (2, 2, 2)


@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": "x", "reward": 1.0}], "needs the columns 'prompt' and 'completion'"),
    ([{"prompt": "x", "completion": "y"}], "needs an 'advantage' or a 'reward' column"),
    ([{"prompt": "x", "completion": "y", "reward": float("nan")}], "row 0: 'reward' must be a finite number"),
    ([{"prompt_ids": [1], "completion_ids": [2], "advantage": 1.0},
      {"prompt_ids": [1], "completion_ids": [], "advantage": 1.0}], "row 1: the completion has no tokens"),
    ([{"prompt": "x", "completion": " y", "reward": 1.0}, {"prompt": "x", "completion": " z", "reward": 1.0}],
     "no prompt has completions with different rewards"),
    ([{"prompt_ids": [1], "completion_ids": [2, 3], "advantage": 1.0, "base_entropy": [0.5],
       "base_logp": [-1.0, -1.0]}], "row 0: 'base_entropy' has 1 values for 2 completion tokens"),
    ([{"prompt_ids": [1], "completion_ids": [2], "advantage": 1.0, "base_entropy": [0.5]}],
     "has ['base_entropy'] but not ['base_logp']"),
])
def test_bad_rows_name_the_column_or_row(tokenizer, rows, message) -> None:
    with pytest.raises(DataError) as err:
        prepare_fork_dataset(datasets.Dataset.from_list(rows), tokenizer, **KW)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cached_anchor_needs_the_topk_columns(tokenizer) -> None:
    rows = [{"prompt_ids": [1], "completion_ids": [2], "advantage": 1.0, "base_entropy": [0.5], "base_logp": [-1.0]}]
    with pytest.raises(DataError, match=r"not \['topk_ids', 'topk_logp'\]"):
        prepare_fork_dataset(datasets.Dataset.from_list(rows), tokenizer, **dict(KW, needs_topk=True))


def test_fingerprint_follows_tokens_and_options() -> None:
    a = datasets.Dataset.from_dict({"prompt_ids": [[1, 2]], "completion_ids": [[3]]})
    b = datasets.Dataset.from_dict({"prompt_ids": [[1, 2]], "completion_ids": [[4]]})
    assert rollouts_fingerprint(a, "m", 1.0) == rollouts_fingerprint(a, "m", 1.0)
    assert len({rollouts_fingerprint(a, "m", 1.0), rollouts_fingerprint(b, "m", 1.0),
                rollouts_fingerprint(a, "m", 0.6), rollouts_fingerprint(a, "other", 1.0)}) == 4
