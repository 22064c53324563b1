"""ablation.md and ablation.png: the table and plot of a sweep, one row per point over its seeds.

Points that differ only in ``seed`` form a group. A group's Δpass@1 is the mean over its
seeds of each seed's Δpass@1 (each paired within its seed: base and adapter answered that
seed's held-out problems), with an interval from a hierarchical bootstrap over seeds and
problems; a group of one seed keeps the paired bootstrap interval over problems.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.storage import atomic_write_text
from .accuracy import hierarchical_bootstrap_delta
from .formatting import fmt

SEED_KEY = "seed"
AVERAGED = ("fork_fraction", "kl_ratio", "kl_mean_all", "top1_agreement_nonfork", "pass_at_1_base",
            "pass_at_1_adapter", "train_seconds")
"""Per-point fields a group reports as their mean over its seeds."""


def group_key(point: dict[str, Any]) -> str:
    """The point without its seed, as a stable key: points with equal keys differ only in seed."""
    return json.dumps({k: v for k, v in sorted(point.items()) if k != SEED_KEY}, sort_keys=True, default=str)


def group_over_seeds(rows: list[dict[str, Any]], *, resamples: int, seed: int) -> list[dict[str, Any]]:
    """One aggregated row per group of points that differ only in seed, in first-appearance order.

    rows: the sweep's per-point rows (``point``, ``seed``, ``delta_pass_at_1``,
    ``delta_ci95``, ``per_problem_delta`` and the :data:`AVERAGED` fields). A seed that
    appears twice in a group (a repeated grid value) counts once.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        members = groups.setdefault(group_key(r["point"]), [])
        if all(_seed_of(m) != _seed_of(r) for m in members):
            members.append(r)
    varying = _varying_keys([r["point"] for r in rows])
    return [_aggregate(members, varying, resamples=resamples, seed=seed) for members in groups.values()]


def paired_differences(rows: list[dict[str, Any]], *, resamples: int, seed: int) -> list[dict[str, Any]]:
    """Δpass@1 of group a minus group b, for every pair of groups, paired by seed and problem.

    Within each seed both groups answered the same held-out problems, so the difference
    is taken per problem (a's per-problem delta minus b's) over the problems both have;
    the mean is over the seeds both groups ran, with a hierarchical bootstrap interval
    (seeds, then problems) as for a single group. The problems' difficulty cancels; the
    spread between seeds still counts.
    """
    groups: dict[str, dict[Any, dict[str, float]]] = {}
    labels: dict[str, str] = {}
    varying = _varying_keys([r["point"] for r in rows])
    for r in rows:
        key = group_key(r["point"])
        labels.setdefault(key, _label(r["point"], varying))
        if r.get("per_problem_delta") and r.get("delta_pass_at_1") is not None:
            groups.setdefault(key, {}).setdefault(_seed_of(r), r["per_problem_delta"])
    keys = list(groups)
    out = []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            both = {s: [groups[a][s][p] - groups[b][s][p] for p in groups[a][s] if p in groups[b][s]]
                    for s in groups[a] if s in groups[b]}
            seeds = [s for s, d in both.items() if d]  # a seed whose problems differ pairs nothing
            per_seed = [both[s] for s in seeds]
            boot = hierarchical_bootstrap_delta(per_seed, resamples=resamples, seed=seed)
            if boot["mean"] is None:
                continue
            out.append({"a": labels[a], "b": labels[b], "seeds": seeds, "delta_pass_at_1": boot["mean"],
                        "delta_ci95": boot["ci95"], "problems": sum(len(d) for d in per_seed)})
    return out


def _label(point: dict[str, Any], varying: list[str]) -> str:
    """A group's name: the parameters that vary in the sweep, by their last dotted part."""
    return ", ".join(f"{k.split('.')[-1]}={point.get(k)}" for k in varying) or "base config"


def _seed_of(row: dict[str, Any]) -> Any:
    return row.get("seed", row["point"].get(SEED_KEY))


def _varying_keys(points: list[dict[str, Any]]) -> list[str]:
    """Parameters other than seed that take more than one value in the sweep (what labels show)."""
    keys = sorted({k for p in points for k in p if k != SEED_KEY})
    return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True, default=str) for p in points}) > 1]


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _aggregate(members: list[dict[str, Any]], varying: list[str], *, resamples: int, seed: int) -> dict[str, Any]:
    point = {k: v for k, v in members[0]["point"].items() if k != SEED_KEY}
    label = _label(point, varying)
    measured = [m for m in members if m["delta_pass_at_1"] is not None]
    if len(measured) > 1:
        boot = hierarchical_bootstrap_delta([list(m["per_problem_delta"].values()) for m in measured],
                                            resamples=resamples, seed=seed)
        mean, ci, interval = boot["mean"], boot["ci95"], "seeds and problems"
    elif measured:
        mean, ci, interval = measured[0]["delta_pass_at_1"], measured[0]["delta_ci95"], "problems"
    else:
        mean, ci, interval = None, [None, None], "none"
    return {
        "point": point,
        "label": label,
        "seeds": [_seed_of(m) for m in members],
        "delta_pass_at_1": mean,
        "delta_ci95": ci,
        "interval_over": interval,
        **{k: _mean([m.get(k) for m in members]) for k in AVERAGED},
        "per_seed": [{"seed": _seed_of(m), "delta_pass_at_1": m["delta_pass_at_1"], "delta_ci95": m["delta_ci95"],
                      "kl_mean_all": m.get("kl_mean_all"), "run_dir": m.get("run_dir")} for m in members],
    }


def write_ablation(out: Path, name: str, groups: list[dict[str, Any]],
                   paired: list[dict[str, Any]] | None = None) -> None:
    """ablation.md and ablation.png: one row / one marker per group of points (see :func:`group_over_seeds`),
    and the :func:`paired_differences` between groups when given."""
    lines = [f"# Ablation: {name}", "",
             "| point | seeds | fork fraction | Δpass@1 | 95% CI | per-seed Δpass@1 | kl_ratio | mean KL | "
             "top-1 agree (non-forks) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        lo, hi = g["delta_ci95"]
        per_seed = ", ".join(fmt(s["delta_pass_at_1"]) for s in g["per_seed"])
        train = f"{g['train_seconds']:.0f}" if g["train_seconds"] is not None else "–"
        lines.append(f"| {g['label']} | {', '.join(str(s) for s in g['seeds'])} | {fmt(g['fork_fraction'])} | "
                     f"{fmt(g['delta_pass_at_1'])} | {fmt(lo)} to {fmt(hi)} | {per_seed} | {fmt(g['kl_ratio'], 2)} | "
                     f"{fmt(g['kl_mean_all'])} | {fmt(g['top1_agreement_nonfork'])} | {train} |")
    lines += ["", "Δpass@1 is the mean over seeds of each seed's paired Δpass@1 (adapter − base on that seed's "
              "held-out problems). With several seeds its 95% interval comes from a hierarchical bootstrap "
              "(resample seeds, then each drawn seed's problems); with one seed, from the paired bootstrap over "
              "problems. Mean KL (to the base, on held-out base rollouts) and the other columns are means over seeds.",
              "", "Compare gates at matched total movement (mean KL): high-entropy positions move more under any "
              "update, so a gate that moved the policy more is not better for that alone; a gate is better if it "
              "gains more Δpass@1 at the same movement (the plot)."]
    if paired:
        lines += ["", "## Paired differences", "",
                  "Δpass@1 of a minus b on the same seeds and held-out problems (per-problem differences; 95% "
                  "interval from the same bootstrap over seeds and problems).", "",
                  "| a | b | seeds | problems | Δpass@1 (a − b) | 95% CI |", "|---|---|---|---|---|---|"]
        for d in paired:
            lo, hi = d["delta_ci95"]
            lines.append(f"| {d['a']} | {d['b']} | {', '.join(str(s) for s in d['seeds'])} | {d['problems']} | "
                         f"{fmt(d['delta_pass_at_1'])} | {fmt(lo)} to {fmt(hi)} |")
    lines += ["", "![ablation](ablation.png)"]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    _plot(out / "ablation.png", name, groups)


def _plot(path: Path, name: str, groups: list[dict[str, Any]]) -> None:
    """Left: Δpass@1 (interval) against mean KL per group, per-seed values faint. Right: the intervals by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.45 * len(groups) + 1.5)))
    colors = plt.get_cmap("tab10")
    for i, g in enumerate(groups):
        color = colors(i % 10)
        for s in g["per_seed"]:
            if s["delta_pass_at_1"] is not None and s["kl_mean_all"] is not None:
                ax1.plot(s["kl_mean_all"], s["delta_pass_at_1"], "o", color=color, alpha=0.35, ms=4)
        if g["delta_pass_at_1"] is None or g["kl_mean_all"] is None:
            continue
        lo, hi = _interval(g)
        ax1.errorbar(g["kl_mean_all"], g["delta_pass_at_1"], yerr=[[g["delta_pass_at_1"] - lo],
                     [hi - g["delta_pass_at_1"]]], fmt="s", color=color, capsize=3, ms=6)
        ax1.annotate(f"{g['label']} (n={len(g['seeds'])})", (g["kl_mean_all"], g["delta_pass_at_1"]),
                     textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)
    ax1.axhline(0, color="#888", lw=0.8)
    ax1.set_xlabel("movement: mean KL(base ‖ adapter), held-out base rollouts")
    ax1.set_ylabel("Δpass@1 (adapter − base), 95% interval")
    ax1.set_title("gain against movement (faint: single seeds)", fontsize=10)

    y = list(range(len(groups)))
    means = [g["delta_pass_at_1"] if g["delta_pass_at_1"] is not None else 0.0 for g in groups]
    bounds = [_interval(g) for g in groups]
    ax2.errorbar(means, y, xerr=[[m - lo for m, (lo, _) in zip(means, bounds)],
                                 [hi - m for m, (_, hi) in zip(means, bounds)]],
                 fmt="s", color="#4c72b0", capsize=3)
    for yi, g in zip(y, groups):
        seeds = [s["delta_pass_at_1"] for s in g["per_seed"] if s["delta_pass_at_1"] is not None]
        ax2.plot(seeds, [yi] * len(seeds), "o", color="#dd8452", alpha=0.6, ms=4)
    ax2.axvline(0, color="#888", lw=0.8)
    ax2.set_yticks(y, [g["label"] for g in groups])
    ax2.invert_yaxis()
    ax2.set_xlabel("Δpass@1: mean over seeds (square, 95%) and per seed (dots)")
    fig.suptitle(f"Ablation: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _interval(group: dict[str, Any]) -> tuple[float, float]:
    """The group's interval, collapsed to its mean where a bound is missing."""
    mean = group["delta_pass_at_1"] if group["delta_pass_at_1"] is not None else 0.0
    lo, hi = group["delta_ci95"]
    return (lo if lo is not None else mean, hi if hi is not None else mean)
