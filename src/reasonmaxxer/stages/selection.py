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

    Advantages use every rollout of a problem (the whole sampled group); trimming then
    drops truncated and the longest rollouts from what is trained on.

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

    rows = []
    for pid in mixed:
        idx = groups[pid]
        adv = group_advantages(torch.tensor([rollouts[i]["reward"] for i in idx]), cfg.advantage_clip)
        for i, a in zip(idx, adv.tolist()):
            if cfg.drop_truncated and rollouts[i]["finish"] != "eos":
                continue
            rows.append({"rollout_index": i, "problem_id": pid, "reward": rollouts[i]["reward"],
                         "advantage": a, "pass_rate": pass_rate[pid]})
    n_trim = int(len(rows) * cfg.trim_longest)
    if n_trim:
        by_length = sorted(rows, key=lambda row: (len(rollouts[row["rollout_index"]]["completion_ids"]),
                                                  row["rollout_index"]))
        keep = {row["rollout_index"] for row in by_length[: len(rows) - n_trim]}
        rows = [row for row in rows if row["rollout_index"] in keep]
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
