"""Task accuracy of base and adapter on held-out problems: pass@1, pass@k, greedy, and
the paired bootstrap interval of the difference."""

from __future__ import annotations

from collections import defaultdict
from math import comb
from typing import Any, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def per_problem_rewards(rollouts: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Rewards of each problem's rollouts, keyed by problem id."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in rollouts:
        out[r["problem_id"]].append(float(r["reward"]))
    return dict(out)


def _correct(rewards: list[float]) -> int:
    """How many samples are correct: reward 1 (a reward function's partial credit is not)."""
    return sum(1 for r in rewards if r >= 1.0)


def accuracy_summary(sampled: list[dict[str, Any]], greedy: list[dict[str, Any]] | None, k: int) -> dict[str, Any]:
    """pass@1 (mean over samples, then problems), pass@k, greedy accuracy and n.

    ``pass_at_{k}`` is None when some problem has fewer than k samples (its pass@k cannot
    be estimated); ``pass_at_{n}`` is then added, n the fewest samples any problem has,
    and ``min_samples_per_problem`` says n. ``pass_at_1_by_kind`` averages per problem,
    then over the problems of each kind (as ``pass_at_1`` does over all problems).
    """
    rewards = per_problem_rewards(sampled)
    p1 = [pass_at_k(len(r), _correct(r), 1) for r in rewards.values()]
    fewest = min((len(r) for r in rewards.values()), default=0)
    out: dict[str, Any] = {
        "n": len(rewards),
        "samples_per_problem": k,
        "min_samples_per_problem": fewest,
        "pass_at_1": float(np.mean(p1)) if p1 else None,
        f"pass_at_{k}": _mean_pass_at(rewards, k) if fewest >= k else None,
    }
    if 1 < fewest < k:  # the largest pass@n every problem supports, under its own name
        out[f"pass_at_{fewest}"] = _mean_pass_at(rewards, fewest)
    if greedy is not None:
        g = per_problem_rewards(greedy)
        out["greedy_accuracy"] = float(np.mean([v[0] for v in g.values()])) if g else None
    kind_of = {r["problem_id"]: r.get("kind") or "all" for r in sampled}
    by_kind: dict[str, list[float]] = defaultdict(list)
    for pid, r in rewards.items():
        by_kind[kind_of[pid]].append(pass_at_k(len(r), _correct(r), 1))
    out["pass_at_1_by_kind"] = {kind: float(np.mean(v)) for kind, v in sorted(by_kind.items())}
    out["mean_completion_tokens"] = float(np.mean([len(r["completion_ids"]) for r in sampled])) if sampled else None
    return out


def _mean_pass_at(rewards: dict[str, list[float]], k: int) -> float | None:
    """Mean over problems of the unbiased pass@k (each problem has at least k samples)."""
    values = [pass_at_k(len(r), _correct(r), k) for r in rewards.values()]
    return float(np.mean(values)) if values else None


def per_problem_delta(base: dict[str, list[float]], adapter: dict[str, list[float]]) -> dict[str, float]:
    """Per problem both models answered (sorted by id): mean reward of the adapter minus the base's."""
    return {i: float(np.mean(adapter[i]) - np.mean(base[i])) for i in sorted(set(base) & set(adapter))}


def paired_bootstrap_delta(
    base: dict[str, list[float]], adapter: dict[str, list[float]], *, resamples: int, seed: int
) -> dict[str, Any]:
    """Mean and 95% percentile interval of pass@1(adapter) - pass@1(base), resampling problems.

    Both models answered the same problems, so the difference is paired per problem.
    """
    deltas = per_problem_delta(base, adapter)
    if not deltas:
        return {"mean": None, "ci95": [None, None], "n": 0}
    diff = np.array(list(deltas.values()))
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(lo), float(hi)], "n": len(diff)}


def hierarchical_bootstrap_delta(per_seed: Sequence[Sequence[float]], *, resamples: int, seed: int) -> dict[str, Any]:
    """Mean over seeds of each seed's mean per-problem delta, with a 95% percentile interval.

    ``per_seed[s]`` holds seed s's per-problem deltas (adapter minus base, paired within
    that seed; the seeds need not share problems). Each resample draws as many seeds as
    there are, with replacement, and for each drawn seed resamples its problems with
    replacement (a hierarchical bootstrap), so the interval carries both the spread
    between training seeds and the finite held-out set. Seeds without problems are left out.
    """
    groups = [np.asarray(d, dtype=float) for d in per_seed if len(d)]
    if not groups:
        return {"mean": None, "ci95": [None, None], "n_seeds": 0}
    boots = hierarchical_resample_means(groups, resamples=resamples, rng=np.random.default_rng(seed))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": float(np.mean([g.mean() for g in groups])), "ci95": [float(lo), float(hi)],
            "n_seeds": len(groups)}


def hierarchical_resample_means(groups: list[np.ndarray], *, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` bootstrap replicates of the mean over seeds of per-seed mean deltas.

    groups: one 1-D array of per-problem deltas per seed (lengths may differ). Returns
    shape (resamples,). A seed drawn twice in one replicate gets two independent problem
    resamples, as the two-level bootstrap prescribes.
    """
    n_seeds = len(groups)
    drawn = rng.integers(0, n_seeds, size=(resamples, n_seeds))  # which seed fills each slot
    total = np.zeros(resamples)
    for slot in range(n_seeds):
        for s, diff in enumerate(groups):
            rows = np.flatnonzero(drawn[:, slot] == s)
            if rows.size:
                total[rows] += diff[rng.integers(0, len(diff), size=(rows.size, len(diff)))].mean(axis=1)
    return total / n_seeds
