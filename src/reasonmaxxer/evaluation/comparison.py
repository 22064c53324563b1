"""compare.md, compare.json and compare.png: arms on equal compute, and the compute ratios between them.

Each arm is a curve of points (compute spent, held-out Δpass@1): an offline arm one point
per scale (a run whose total compute is that point), an RL arm one point per evaluated
checkpoint. Seeds are aggregated per point index: compute and movement as means over
seeds, Δpass@1 as the mean over seeds of each seed's paired Δpass@1 with a hierarchical
bootstrap over seeds and problems (as the ablations do).

The ratio users ask for: how much compute arm A needed to reach the reference arm's final
Δpass@1, divided by the compute of that final reference point (and the reverse). "Reach"
is the first crossing of A's curve, interpolated linearly in compute between the two
points around it; a curve already at the target at its first point reached it "at most"
there; one that never reaches it gives a lower bound, "more than" its last compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..utils.storage import atomic_write_text
from .accuracy import hierarchical_bootstrap_delta
from .formatting import fmt

REACHED, AT_FIRST, NOT_REACHED = "reached", "at_first_point", "not_reached"


def compute_to_reach(flops: Sequence[float], deltas: Sequence[float], target: float,
                     wall_seconds: Sequence[float] | None = None) -> dict[str, Any]:
    """The compute at which a curve first reaches ``target``, linearly interpolated.

    Args:
        flops: (P,) ascending compute of the curve's points.
        deltas: (P,) their Δpass@1.
        target: the Δpass@1 to reach.
        wall_seconds: (P,) optional measured seconds, interpolated at the same place.

    Returns:
        ``{"flops", "wall_seconds", "status"}``: ``reached`` (interpolated between the
        points around the first crossing), ``at_first_point`` (the first point is already
        at or above the target: its compute, an upper bound) or ``not_reached`` (the last
        point's compute: a lower bound). Empty curve: flops None.
    """
    if len(flops) != len(deltas) or (wall_seconds is not None and len(wall_seconds) != len(flops)):
        raise ValueError("flops, deltas and wall_seconds must have one value per point")
    if not len(flops):
        return {"flops": None, "wall_seconds": None, "status": NOT_REACHED}
    walls = list(wall_seconds) if wall_seconds is not None else None
    for i, y in enumerate(deltas):
        if y >= target:
            if i == 0:
                return {"flops": float(flops[0]), "wall_seconds": walls[0] if walls else None, "status": AT_FIRST}
            t = (target - deltas[i - 1]) / (y - deltas[i - 1])  # y > target >= deltas[i-1]: well defined
            x = flops[i - 1] + t * (flops[i] - flops[i - 1])
            w = walls[i - 1] + t * (walls[i] - walls[i - 1]) if walls else None
            return {"flops": float(x), "wall_seconds": w, "status": REACHED}
    return {"flops": float(flops[-1]), "wall_seconds": walls[-1] if walls else None, "status": NOT_REACHED}


def compute_ratio(arm: dict[str, Sequence[float]], reference: dict[str, Sequence[float]]) -> dict[str, Any]:
    """Compute ``arm`` needs to reach ``reference``'s final Δpass@1, over the reference's final compute.

    Both are curves ``{"flops": (P,), "delta": (P,), "wall_seconds": (P,)}``, ascending in flops.
    ``ratio`` is a lower bound when ``status`` is ``not_reached`` ("more than ratio×").
    """
    target = reference["delta"][-1]
    hit = compute_to_reach(arm["flops"], arm["delta"], target, arm.get("wall_seconds"))
    ref_flops, ref_wall = reference["flops"][-1], (reference.get("wall_seconds") or [None])[-1]
    return {
        "target_delta": float(target),
        **hit,
        "ratio": hit["flops"] / ref_flops if hit["flops"] is not None and ref_flops else None,
        "wall_ratio": hit["wall_seconds"] / ref_wall if hit["wall_seconds"] is not None and ref_wall else None,
    }


def percentile_with_inf(values: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of ``values`` (N,), interpolated linearly as ``np.percentile`` does,
    where ``values`` may hold +inf: the result is inf when an infinite value carries weight in
    the interpolation (``np.percentile`` gives NaN there, from inf - inf or inf * 0)."""
    v = np.sort(np.asarray(values, dtype=float))
    h = (len(v) - 1) * q / 100.0
    i = int(np.floor(h))
    frac = h - i
    if frac == 0.0:
        return float(v[i])
    a, b = v[i], v[i + 1]
    return float(b) if not np.isfinite(b) else float(a + frac * (b - a))


def bootstrap_ratio(arm_by_seed: list[np.ndarray], ref_by_seed: list[np.ndarray], arm_flops: Sequence[float],
                    ref_flops: Sequence[float], *, resamples: int, seed: int) -> list[float | None] | None:
    """95% interval of :func:`compute_ratio` (FLOPs) under a hierarchical bootstrap over seeds and problems.

    arm_by_seed[s], ref_by_seed[s]: (P_arm, Q_s) and (P_ref, Q_s) per-problem Δ of each point
    for seed s, over the same Q_s held-out problems (columns in the same order), so one
    problem resample is shared by both curves (they are paired within a seed). The
    compute axis stays at the mean over seeds. A replicate that never reaches the target
    counts as infinite: a bound of None is infinite ("∞ to ∞" when no replicate reaches it).
    None when there is nothing to resample (no seed, or the two lists differ in length).
    """
    rng = np.random.default_rng(seed)
    n = len(arm_by_seed)
    if n == 0 or len(ref_by_seed) != n:
        return None
    ratios = np.empty(resamples)
    for b in range(resamples):
        arm_curve = np.zeros(arm_by_seed[0].shape[0])
        ref_curve = np.zeros(ref_by_seed[0].shape[0])
        for s in rng.integers(0, n, size=n):
            q = arm_by_seed[s].shape[1]
            cols = rng.integers(0, q, size=q)
            arm_curve += arm_by_seed[s][:, cols].mean(axis=1)
            ref_curve += ref_by_seed[s][:, cols].mean(axis=1)
        r = compute_ratio({"flops": arm_flops, "delta": arm_curve / n}, {"flops": ref_flops, "delta": ref_curve / n})
        ratios[b] = np.inf if r["status"] == NOT_REACHED or r["ratio"] is None else r["ratio"]
    bounds = (percentile_with_inf(ratios, 2.5), percentile_with_inf(ratios, 97.5))
    return [b if np.isfinite(b) else None for b in bounds]


# ----------------------------------------------------------------------------- aggregation


CURVE_MEANS = ("flops", "wall_seconds", "forward_tokens", "trained_tokens", "pass_at_1_base", "pass_at_1_adapter",
               "kl_mean_all", "kl_fork", "kl_nonfork", "kl_ratio", "kl_share_at_forks", "kl_share_top20_entropy",
               "fork_shifted", "fork_reranked", "nonfork_shifted", "nonfork_reranked")


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def arm_curve(points: list[dict[str, Any]], *, resamples: int, seed: int) -> list[dict[str, Any]]:
    """One aggregated point per point index (``index``) of an arm, over its seeds, ascending in compute."""
    by_index: dict[int, list[dict[str, Any]]] = {}
    for p in points:
        by_index.setdefault(p["index"], []).append(p)
    out = []
    for index in sorted(by_index):
        members = by_index[index]
        if len(members) > 1:
            boot = hierarchical_bootstrap_delta([list(m["per_problem_delta"].values()) for m in members],
                                                resamples=resamples, seed=seed)
            delta, ci, over = boot["mean"], boot["ci95"], "seeds and problems"
        else:
            delta, ci, over = members[0]["delta_pass_at_1"], members[0]["delta_ci95"], "problems"
        deltas = [m["delta_pass_at_1"] for m in members]
        out.append({"index": index, "label": members[0]["label"], "seeds": [m["seed"] for m in members],
                    "delta_pass_at_1": delta, "delta_ci95": ci, "interval_over": over,
                    "delta_min": min(deltas), "delta_max": max(deltas),
                    "adapter_min": min(m["pass_at_1_adapter"] for m in members),
                    "adapter_max": max(m["pass_at_1_adapter"] for m in members),
                    **{k: _mean([m.get(k) for m in members]) for k in CURVE_MEANS}})
    return sorted(out, key=lambda c: c["flops"])


def _per_seed_matrix(points: list[dict[str, Any]], order: list[int], seed: int,
                     problems: list[str]) -> np.ndarray | None:
    rows = []
    for index in order:
        p = next((p for p in points if p["index"] == index and p["seed"] == seed), None)
        if p is None or any(q not in p["per_problem_delta"] for q in problems):
            return None
        rows.append([p["per_problem_delta"][q] for q in problems])
    return np.asarray(rows, dtype=float)


def ratio_rows(points: dict[str, list[dict[str, Any]]], curves: dict[str, list[dict[str, Any]]], reference: str,
               *, resamples: int, seed: int) -> list[dict[str, Any]]:
    """Per arm other than the reference: the compute it needs to reach the reference's final Δpass@1
    and the reverse, in FLOPs and wall seconds, with a bootstrap interval of the FLOPs ratio."""
    ref_curve = curves.get(reference) or []
    out = []
    for arm, curve in curves.items():
        if arm == reference or not curve or not ref_curve:
            continue
        as_xy = {name: {"flops": [c["flops"] for c in cv], "delta": [c["delta_pass_at_1"] for c in cv],
                        "wall_seconds": [c["wall_seconds"] or 0.0 for c in cv]}
                 for name, cv in ((arm, curve), (reference, ref_curve))}
        forward = compute_ratio(as_xy[arm], as_xy[reference])
        reverse = compute_ratio(as_xy[reference], as_xy[arm])
        intervals = _ratio_intervals(points, arm, reference, curve, ref_curve, resamples=resamples, seed=seed)
        out.append({"arm": arm, "reference": reference, "final_delta": curve[-1]["delta_pass_at_1"],
                    "final_flops": curve[-1]["flops"], "final_wall_seconds": curve[-1]["wall_seconds"],
                    "to_reach_reference": {**forward, "ratio_ci95": intervals[0]},
                    "reference_to_reach_arm": {**reverse, "ratio_ci95": intervals[1]}})
    return out


def _ratio_intervals(points: dict[str, list[dict[str, Any]]], arm: str, reference: str, curve: list[dict[str, Any]],
                     ref_curve: list[dict[str, Any]], *, resamples: int, seed: int) -> list[list[float | None] | None]:
    """Both directions' FLOPs-ratio intervals over the seeds where both arms have every point
    (None for a direction without such a seed)."""
    arm_order, ref_order = [c["index"] for c in curve], [c["index"] for c in ref_curve]
    arm_m, ref_m = [], []
    for s in sorted({p["seed"] for p in points[arm]} & {p["seed"] for p in points[reference]}):
        any_point = next(p for p in points[reference] if p["seed"] == s)
        problems = sorted(any_point["per_problem_delta"])
        a, r = (_per_seed_matrix(points[arm], arm_order, s, problems),
                _per_seed_matrix(points[reference], ref_order, s, problems))
        if a is not None and r is not None and problems:
            arm_m.append(a)
            ref_m.append(r)
    arm_x, ref_x = [c["flops"] for c in curve], [c["flops"] for c in ref_curve]
    if not arm_m:
        return [None, None]
    return [bootstrap_ratio(arm_m, ref_m, arm_x, ref_x, resamples=resamples, seed=seed),
            bootstrap_ratio(ref_m, arm_m, ref_x, arm_x, resamples=resamples, seed=seed)]


# ----------------------------------------------------------------------------- outputs


def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def ratio_text(hit: dict[str, Any], key: str = "ratio") -> str:
    """``2.1×``, ``≤ 0.4×`` (already there at the first point) or ``> 3×`` (never reached: a lower bound)."""
    value = hit.get(key)
    if value is None:
        return "–"
    prefix = {NOT_REACHED: "> ", AT_FIRST: "≤ "}.get(hit["status"], "")
    return f"{prefix}{value:.2g}×"


def _interval_text(ci: list[float | None] | None) -> str:
    if ci is None:
        return "–"
    lo, hi = ci
    return f"{'∞' if lo is None else f'{lo:.2g}'} to {'∞' if hi is None else f'{hi:.2g}'}"


SPENT_WARNING = 0.25
"""An arm whose spend is off the budget by more than this share gets a line saying how to size it."""


def spent_lines(budget: float, spent: dict[str, Any]) -> list[str]:
    """The budget each arm spent (min to max over seeds), and a warning when the estimate was off."""
    lines = ["## Budget spent", "", "| arm | spent / budget (over seeds) |", "|---|---|"]
    off = []
    for arm, entry in spent["arms"].items():
        fractions = list(entry["fraction_by_seed"].values())
        if not fractions:
            continue
        lo, hi = min(fractions), max(fractions)
        lines.append(f"| {arm} | {lo:.2f}" + (f" to {hi:.2f} |" if hi - lo >= 0.005 else " |"))
        if lo < 1 - SPENT_WARNING or hi > 1 + SPENT_WARNING:
            off.append(arm)
    est, got = spent["tokens_per_sample_estimate"], spent.get("tokens_per_sample_measured")
    lines += ["", f"Tokens per sample: {est} estimated" + (f", {got:.0f} measured by the RL runs." if got else ".")]
    if off:
        lines.append(f"**{', '.join(off)} spent more than {SPENT_WARNING:.0%} off the budget of {budget:.3g} FLOPs**"
                     + (f": set `tokens_per_sample: {got:.0f}` in the compare file." if got else "."))
    return lines + [""]


def write_comparison(out: Path, name: str, *, budget: float, reference: str, curves: dict[str, list[dict[str, Any]]],
                     ratios: list[dict[str, Any]], kinds: dict[str, str], spent: dict[str, Any] | None = None) -> None:
    """compare.md and compare.png (compare.json is written by the caller, with the raw points)."""
    lines = [f"# Comparison: {name}", "",
             f"Budget {budget:.3g} FLOPs per arm (2N per forward token, 6N per trained token). Reference arm: "
             f"`{reference}`.", "", *(spent_lines(budget, spent) if spent else []),
             f"## Compute to reach `{reference}`'s final Δpass@1 (and the reverse)", "",
             "| arm | final Δpass@1 | its FLOPs | FLOPs to reach the reference's final | × reference | 95% CI | "
             "wall s | × reference wall | reference's FLOPs to reach this arm's final | × this arm | 95% CI |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        f, b = r["to_reach_reference"], r["reference_to_reach_arm"]
        lines.append(f"| {r['arm']} | {fmt(r['final_delta'])} | {_sci(r['final_flops'])} | {_sci(f['flops'])} | "
                     f"{ratio_text(f)} | {_interval_text(f['ratio_ci95'])} | "
                     f"{_secs(f['wall_seconds'])} | "
                     f"{ratio_text(f, 'wall_ratio')} | {_sci(b['flops'])} | {ratio_text(b)} | "
                     f"{_interval_text(b['ratio_ci95'])} |")
    lines += ["", "`> X×`: never reached within the budget (a lower bound); `≤ X×`: already there at the first "
              "point. Reaching is the first crossing, interpolated linearly in compute between evaluated points.",
              "", "## Every point", "",
              "| arm | kind | point | seeds | FLOPs | wall s | Δpass@1 | 95% CI | pass@1 base → adapter | "
              "mean KL | KL forks / elsewhere | KL share top-20% entropy | shifted at forks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, curve in curves.items():
        for c in curve:
            lo, hi = c["delta_ci95"]
            lines.append(f"| {arm} | {kinds.get(arm, '')} | {c['label']} | {len(c['seeds'])} | {_sci(c['flops'])} | "
                         f"{_secs(c['wall_seconds'])} | "
                         f"{fmt(c['delta_pass_at_1'])} | {fmt(lo)} to {fmt(hi)} | "
                         f"{fmt(c['pass_at_1_base'])} → {fmt(c['pass_at_1_adapter'])} | {fmt(c['kl_mean_all'])} | "
                         f"{fmt(c['kl_ratio'], 2)} | {fmt(c['kl_share_top20_entropy'])} | "
                         f"{fmt(c['fork_shifted'])} |")
    lines += ["", "Movement is measured on the same held-out base rollouts for every arm of a seed, split at the "
              "same forks (the base-entropy gate at temperature 1): mean KL(base ‖ adapter), KL at forks over KL "
              "elsewhere, the share of KL mass at the base's top-20% entropy positions, and the share of fork "
              "positions whose argmax left the base's top 5.", "", "![compare](compare.png)"]
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    plot_comparison(out / "compare.png", name, curves)


def plot_comparison(path: Path, name: str, curves: dict[str, list[dict[str, Any]]]) -> None:
    """Left: pass@1 against compute (log FLOPs), seed spread shaded. Right: pass@1 against movement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10")
    bases = []
    for i, (arm, curve) in enumerate(curves.items()):
        pts = [c for c in curve if c["flops"] and c["pass_at_1_adapter"] is not None]
        if not pts:
            continue
        color = colors(i % 10)
        x = [c["flops"] for c in pts]
        ax1.plot(x, [c["pass_at_1_adapter"] for c in pts], "o-", color=color, label=arm)
        ax1.fill_between(x, [c["adapter_min"] for c in pts], [c["adapter_max"] for c in pts], color=color, alpha=0.2)
        moved = [c for c in pts if c["kl_mean_all"] is not None]
        ax2.plot([c["kl_mean_all"] for c in moved], [c["pass_at_1_adapter"] for c in moved], "o-", color=color,
                 label=arm)
        bases += [c["pass_at_1_base"] for c in pts if c["pass_at_1_base"] is not None]
    for ax in (ax1, ax2):
        if bases:
            ax.axhline(float(np.mean(bases)), color="#888", lw=0.8, ls="--", label="base")
        ax.set_ylabel("held-out pass@1 (mean over seeds)")
        ax.legend(fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("compute spent (FLOPs, log scale); shaded: seed range")
    ax2.set_xlabel("movement: mean KL(base ‖ adapter), held-out base rollouts")
    fig.suptitle(f"Comparison: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
