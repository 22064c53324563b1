"""Which rollouts to train on, and their advantages."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ..config import SelectionConfig
from ..core.advantages import group_advantages
from ..errors import DataError


def select_rollouts(rollouts: list[dict[str, Any]], cfg: SelectionConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Mixed-success problems, nearest pass rate 0.5 first, with per-rollout advantages.

    The pass rate (which problems are mixed, and their order) always uses every sampled
    rollout. With ``advantages_over: all``, advantages use every rollout of a problem
    (the whole sampled group), then truncated and the globally longest rollouts are
    dropped from what is trained on. With ``kept`` (the paper's recipe), each problem
    first drops its truncated rollouts (``drop_truncated``) and keeps its shortest
    round((1 - trim_longest) * n) of the n left, and advantages are z-scored over that
    kept pool; a problem whose kept pool is all correct or all wrong has zero advantages.

    Returns:
        rows ``{"rollout_index", "problem_id", "reward", "advantage", "pass_rate"}`` and a
        summary. Raises DataError when no problem has mixed success.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rollouts):
        groups[r["problem_id"]].append(i)
    pass_rate = {pid: sum(rollouts[i]["reward"] for i in idx) / len(idx) for pid, idx in groups.items()}
    mixed = [pid for pid, p in pass_rate.items() if 0.0 < p < 1.0]
    if not mixed:
        mean = sum(pass_rate.values()) / max(len(pass_rate), 1)
        direction = "easier" if mean < 0.5 else "harder"
        raise DataError(
            f"selection: no problem has both a correct and a wrong rollout among {len(pass_rate)} problems "
            f"(mean pass rate {mean:.2f}); try {direction} problems (data.kinds), more samples per problem "
            f"(rollout.num_samples) or more problems (data.num_train)"
        )
    mixed.sort(key=lambda pid: (abs(pass_rate[pid] - 0.5), pid))
    if cfg.max_problems is not None:
        mixed = mixed[: cfg.max_problems]

    if cfg.advantages_over == "kept":
        rows = _rows_over_kept_pool(rollouts, groups, mixed, pass_rate, cfg)
    else:
        rows = _rows_over_all(rollouts, groups, mixed, pass_rate, cfg)
    if not rows:
        raise DataError("selection: every selected rollout was trimmed; lower selection.trim_longest "
                        "or set selection.drop_truncated: false")
    summary = {
        "problems_total": len(pass_rate),
        "problems_mixed": sum(1 for p in pass_rate.values() if 0.0 < p < 1.0),
        "problems_kept": len(mixed),
        "rollouts_kept": len(rows),
        "positive": sum(1 for r in rows if r["advantage"] > 0),
        "negative": sum(1 for r in rows if r["advantage"] < 0),
        "mean_pass_rate_all": sum(pass_rate.values()) / len(pass_rate),
    }
    return rows, summary


def _row(rollouts: list[dict[str, Any]], i: int, pid: str, advantage: float, pass_rate: float) -> dict[str, Any]:
    return {"rollout_index": i, "problem_id": pid, "reward": rollouts[i]["reward"], "advantage": advantage,
            "pass_rate": pass_rate}


def _completion_length(rollouts: list[dict[str, Any]], i: int) -> tuple[int, int]:
    """Sort key: shortest first, ties by rollout index (a fixed order)."""
    return len(rollouts[i]["completion_ids"]), i


def _rows_over_all(rollouts: list[dict[str, Any]], groups: dict[str, list[int]], mixed: list[str],
                   pass_rate: dict[str, float], cfg: SelectionConfig) -> list[dict[str, Any]]:
    """Advantages over each problem's whole group; then drop truncated and the globally longest."""
    rows = []
    for pid in mixed:
        idx = groups[pid]
        adv = group_advantages(torch.tensor([rollouts[i]["reward"] for i in idx]), cfg.advantage_clip)
        for i, a in zip(idx, adv.tolist()):
            if cfg.drop_truncated and rollouts[i]["finish"] != "eos":
                continue
            rows.append(_row(rollouts, i, pid, a, pass_rate[pid]))
    n_trim = int(len(rows) * cfg.trim_longest)
    if n_trim:
        by_length = sorted(rows, key=lambda row: _completion_length(rollouts, row["rollout_index"]))
        keep = {row["rollout_index"] for row in by_length[: len(rows) - n_trim]}
        rows = [row for row in rows if row["rollout_index"] in keep]
    return rows


def _rows_over_kept_pool(rollouts: list[dict[str, Any]], groups: dict[str, list[int]], mixed: list[str],
                         pass_rate: dict[str, float], cfg: SelectionConfig) -> list[dict[str, Any]]:
    """Per problem: drop truncated, keep the shortest round((1 - trim) n), advantages over those."""
    rows = []
    for pid in mixed:
        idx = [i for i in groups[pid] if not (cfg.drop_truncated and rollouts[i]["finish"] != "eos")]
        if not idx:
            continue
        n_keep = max(1, round((1.0 - cfg.trim_longest) * len(idx)))
        kept = set(sorted(idx, key=lambda i: _completion_length(rollouts, i))[:n_keep])
        idx = [i for i in idx if i in kept]  # file order, as the whole-group rows
        adv = group_advantages(torch.tensor([rollouts[i]["reward"] for i in idx]), cfg.advantage_clip)
        rows.extend(_row(rollouts, i, pid, a, pass_rate[pid]) for i, a in zip(idx, adv.tolist()))
    return rows
