"""Tests for reasonmaxxer.stages.selection and core.advantages against brute-force formulas and hand-built rollouts."""

from __future__ import annotations

import math
import random

import pytest
import torch

from reasonmaxxer.config.schema import SelectionConfig
from reasonmaxxer.core.advantages import group_advantages
from reasonmaxxer.errors import DataError
from reasonmaxxer.stages.selection import select_rollouts


def _brute_advantages(rewards, clip):
    """Population std, clip, all-equal -> zeros; a Python loop in float64."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    if std < 1e-6:
        return [0.0] * n
    return [max(-clip, min(clip, (r - mean) / std)) for r in rewards]


@pytest.mark.parametrize(
    "rewards",
    [
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [0, 1],
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # +3.0 before clipping
        [0, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # -3.0 before clipping
        [0.25, 0.5, 1.0, 0.0, 0.75],
        [2.0, -1.0, 0.5],
    ],
)
@pytest.mark.parametrize("clip", [2.5, 1.0, 100.0])
def test_group_advantages_brute_force(rewards, clip) -> None:
    got = group_advantages(torch.tensor(rewards), clip)
    assert got.dtype == torch.float32
    want = _brute_advantages([float(r) for r in rewards], clip)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=0)
    assert float(got.abs().max()) <= clip + 1e-6


def test_group_advantages_binary_closed_form() -> None:
    # Pass rate p: +sqrt((1-p)/p) for correct, -sqrt(p/(1-p)) for wrong.
    for n, k in [(4, 1), (8, 3), (5, 4), (20, 10)]:
        p = k / n
        rewards = torch.tensor([1] * k + [0] * (n - k))
        got = group_advantages(rewards, clip=1e9)
        torch.testing.assert_close(got[:k], torch.full((k,), math.sqrt((1 - p) / p)), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[k:], torch.full((n - k,), -math.sqrt(p / (1 - p))), atol=1e-5, rtol=0)
        assert abs(float(got.sum())) < 1e-4  # advantages are centred


@pytest.mark.parametrize("rewards", [[1, 1, 1], [0, 0, 0, 0], [0.5, 0.5], [1]])
def test_group_advantages_all_equal_is_zero(rewards) -> None:
    got = group_advantages(torch.tensor(rewards), 2.5)
    assert torch.equal(got, torch.zeros(len(rewards)))


# Problems by pass rate: A 2/4 (0.5), F 1/3 (|d| = 1/6), B 1/4 and C 3/4 (both |d| = 1/4,
# tie broken by id), G 1/5 (|d| = 0.3); D all wrong and E all right are not mixed.
PASS = {"A": [1, 0, 1, 0], "B": [0, 1, 0, 0], "C": [1, 1, 0, 1], "D": [0, 0, 0],
        "E": [1, 1], "F": [0, 0, 1], "G": [0, 0, 0, 1, 0]}
MIXED_ORDER = ["A", "F", "B", "C", "G"]


def _make_rollouts(seed: int = 0, truncated: set[int] | None = None):
    """Hand-built rollouts, problems interleaved in a shuffled order, distinct lengths."""
    items = [(pid, r) for pid, rs in PASS.items() for r in rs]
    random.Random(seed).shuffle(items)
    lengths = list(range(3, 3 + len(items)))
    random.Random(seed + 1).shuffle(lengths)
    truncated = truncated or set()
    return [
        {"problem_id": pid, "reward": r, "finish": "length" if i in truncated else "eos",
         "completion_ids": list(range(lengths[i]))}
        for i, (pid, r) in enumerate(items)
    ]


def _brute_select(rollouts, *, max_problems=None, drop_truncated=False, trim_longest=0.0, clip=2.5):
    pids = sorted({r["problem_id"] for r in rollouts})
    idx = {p: [i for i, r in enumerate(rollouts) if r["problem_id"] == p] for p in pids}
    rate = {p: sum(rollouts[i]["reward"] for i in idx[p]) / len(idx[p]) for p in pids}
    mixed = [p for p in pids if 0 < rate[p] < 1]
    mixed.sort(key=lambda p: (abs(rate[p] - 0.5), p))
    if max_problems is not None:
        mixed = mixed[:max_problems]
    rows = []
    for p in mixed:
        adv = _brute_advantages([float(rollouts[i]["reward"]) for i in idx[p]], clip)
        for i, a in zip(idx[p], adv):
            if drop_truncated and rollouts[i]["finish"] != "eos":
                continue
            rows.append({"rollout_index": i, "problem_id": p, "reward": rollouts[i]["reward"],
                         "advantage": a, "pass_rate": rate[p]})
    n_drop = math.floor(len(rows) * trim_longest)
    if n_drop:
        longest = sorted(rows, key=lambda row: -len(rollouts[row["rollout_index"]]["completion_ids"]))[:n_drop]
        dropped = {row["rollout_index"] for row in longest}
        rows = [row for row in rows if row["rollout_index"] not in dropped]
    return rows


def _assert_rows_equal(got, want) -> None:
    assert [(r["rollout_index"], r["problem_id"]) for r in got] == [
        (r["rollout_index"], r["problem_id"]) for r in want
    ]
    for g, w in zip(got, want):
        assert set(g) == {"rollout_index", "problem_id", "reward", "advantage", "pass_rate"}
        assert g["reward"] == w["reward"]
        assert g["advantage"] == pytest.approx(w["advantage"], abs=1e-5)
        assert g["pass_rate"] == pytest.approx(w["pass_rate"], abs=1e-12)


def test_select_keeps_mixed_problems_in_order() -> None:
    rollouts = _make_rollouts()
    rows, summary = select_rollouts(rollouts, SelectionConfig())
    want = _brute_select(rollouts)
    _assert_rows_equal(rows, want)
    # Problem order: nearest pass rate 0.5 first, ties by id.
    order = list(dict.fromkeys(r["problem_id"] for r in rows))
    assert order == MIXED_ORDER
    assert {r["problem_id"] for r in rows}.isdisjoint({"D", "E"})
    # Every rollout of every mixed problem is kept (nothing trimmed by default).
    assert len(rows) == sum(len(PASS[p]) for p in MIXED_ORDER)
    # Advantage signs follow the rewards.
    for r in rows:
        assert (r["advantage"] > 0) == (r["reward"] == 1)
    assert summary == {
        "problems_total": 7,
        "problems_mixed": 5,
        "problems_kept": 5,
        "rollouts_kept": len(rows),
        "positive": sum(1 for p in MIXED_ORDER for x in PASS[p] if x == 1),
        "negative": sum(1 for p in MIXED_ORDER for x in PASS[p] if x == 0),
        "mean_pass_rate_all": pytest.approx(sum(sum(v) / len(v) for v in PASS.values()) / 7),
    }


def test_select_max_problems() -> None:
    rollouts = _make_rollouts(seed=3)
    rows, summary = select_rollouts(rollouts, SelectionConfig(max_problems=2))
    _assert_rows_equal(rows, _brute_select(rollouts, max_problems=2))
    assert list(dict.fromkeys(r["problem_id"] for r in rows)) == ["A", "F"]
    assert summary["problems_kept"] == 2 and summary["problems_mixed"] == 5
    assert summary["rollouts_kept"] == 4 + 3


def test_select_drop_truncated_keeps_group_advantages() -> None:
    base = _make_rollouts(seed=5)
    truncated = {i for i, r in enumerate(base) if r["problem_id"] in ("A", "B")}
    truncated = set(sorted(truncated)[::2])  # some of A's and B's rollouts hit the length limit
    rollouts = _make_rollouts(seed=5, truncated=truncated)
    rows, summary = select_rollouts(rollouts, SelectionConfig(drop_truncated=True))
    want = _brute_select(rollouts, drop_truncated=True)
    _assert_rows_equal(rows, want)
    assert not {r["rollout_index"] for r in rows} & truncated
    assert summary["rollouts_kept"] == sum(len(PASS[p]) for p in MIXED_ORDER) - len(truncated)
    # Without drop_truncated they stay.
    rows_all, _ = select_rollouts(rollouts, SelectionConfig(drop_truncated=False))
    assert truncated <= {r["rollout_index"] for r in rows_all}
    # Advantages of the kept rollouts are those of the whole group.
    adv_all = {r["rollout_index"]: r["advantage"] for r in rows_all}
    for r in rows:
        assert r["advantage"] == pytest.approx(adv_all[r["rollout_index"]])


@pytest.mark.parametrize("trim", [0.1, 0.25, 0.5])
def test_select_trim_longest_drops_the_longest(trim: float) -> None:
    rollouts = _make_rollouts(seed=7)
    rows, summary = select_rollouts(rollouts, SelectionConfig(trim_longest=trim))
    want = _brute_select(rollouts, trim_longest=trim)
    _assert_rows_equal(rows, want)
    n_mixed = sum(len(PASS[p]) for p in MIXED_ORDER)
    n_drop = math.floor(n_mixed * trim)
    assert n_drop > 0
    assert summary["rollouts_kept"] == n_mixed - n_drop
    untrimmed, _ = select_rollouts(rollouts, SelectionConfig())
    dropped = {r["rollout_index"] for r in untrimmed} - {r["rollout_index"] for r in rows}
    assert len(dropped) == n_drop
    longest_kept = max(len(rollouts[r["rollout_index"]]["completion_ids"]) for r in rows)
    assert all(len(rollouts[i]["completion_ids"]) > longest_kept for i in dropped)
    # The order of the kept rows is unchanged.
    assert [r["rollout_index"] for r in rows] == [
        r["rollout_index"] for r in untrimmed if r["rollout_index"] not in dropped
    ]


def _no_mixed(reward: int, n_problems: int = 3, n: int = 4):
    return [{"problem_id": f"p{k}", "reward": reward, "finish": "eos", "completion_ids": [1, 2]}
            for k in range(n_problems) for _ in range(n)]


@pytest.mark.parametrize("reward", [0, 1], ids=["all-wrong", "all-right"])
def test_select_no_mixed_success_raises_with_advice(reward: int) -> None:
    with pytest.raises(DataError) as info:
        select_rollouts(_no_mixed(reward), SelectionConfig())
    message = str(info.value)
    assert "3 problems" in message
    # Says which settings to change: the problem kinds and the number of samples.
    assert "data.kinds" in message, message
    assert "rollout.num_samples" in message, message
    word = "easier" if reward == 0 else "harder"
    assert word in message, message


def test_select_everything_dropped_raises() -> None:
    rollouts = _make_rollouts(seed=1, truncated=set(range(len(_make_rollouts(seed=1)))))
    with pytest.raises(DataError, match="drop_truncated"):
        select_rollouts(rollouts, SelectionConfig(drop_truncated=True))


def _brute_kept_pool(rollouts, *, trim, drop_truncated=False, clip=2.5):
    """The paper's recipe per problem: drop truncated, keep the shortest round((1 - trim) n), z-score those."""
    out = {}
    for pid in MIXED_ORDER:
        idx = [i for i, r in enumerate(rollouts) if r["problem_id"] == pid
               and not (drop_truncated and r["finish"] != "eos")]
        idx.sort(key=lambda i: (len(rollouts[i]["completion_ids"]), i))
        kept = idx[: max(1, round((1 - trim) * len(idx)))]
        adv = _brute_advantages([float(rollouts[i]["reward"]) for i in kept], clip)
        out.update(dict(zip(kept, adv)))
    return out


@pytest.mark.parametrize("trim, drop_truncated", [(0.2, False), (0.25, False), (0.4, True), (0.0, True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_over_the_kept_pool_per_problem(trim, drop_truncated, seed) -> None:
    rollouts = _make_rollouts(seed, truncated={1, 5, 8})
    cfg = SelectionConfig(trim_longest=trim, advantages_over="kept", drop_truncated=drop_truncated)
    rows, summary = select_rollouts(rollouts, cfg)
    want = _brute_kept_pool(rollouts, trim=trim, drop_truncated=drop_truncated)
    assert {r["rollout_index"] for r in rows} == set(want)
    for r in rows:
        assert r["advantage"] == pytest.approx(want[r["rollout_index"]], abs=1e-5)
    assert summary["rollouts_kept"] == len(want)


def test_kept_pool_advantages_differ_from_whole_group_ones() -> None:
    # Problem A [1, 0, 1, 0]: trimming its longest wrong rollout leaves [1, 1, 0] (or similar):
    # the advantages are z-scored over those three, not over the four.
    rollouts = [{"problem_id": "A", "reward": r, "finish": "eos", "completion_ids": [0] * n}
                for r, n in [(1, 3), (0, 4), (1, 5), (0, 9)]]
    kept, _ = select_rollouts(rollouts, SelectionConfig(trim_longest=0.25, advantages_over="kept"))
    over_all, _ = select_rollouts(rollouts, SelectionConfig(trim_longest=0.25, advantages_over="all"))
    assert [r["rollout_index"] for r in kept] == [r["rollout_index"] for r in over_all] == [0, 1, 2]
    assert [r["advantage"] for r in kept] == pytest.approx(_brute_advantages([1.0, 0.0, 1.0], 2.5), abs=1e-5)
    assert [r["advantage"] for r in over_all] == pytest.approx([1.0, -1.0, 1.0], abs=1e-5)
