"""ablation.md and ablation.png: the table and plot of a sweep's points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..utils.storage import atomic_write_text
from .report import fmt


def write_ablation(out: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """ablation.md and ablation.png: one row / one bar per sweep point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["point"].items()) for r in rows]
    lines = [f"# Ablation: {name}", "",
             "| point | fork fraction | Δpass@1 | 95% CI | kl_ratio | mean KL | top-1 agree (non-forks) | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in zip(labels, rows):
        lo, hi = r["delta_ci95"]
        lines.append(f"| {label} | {fmt(r['fork_fraction'])} | {fmt(r['delta_pass_at_1'])} | {fmt(lo)} to {fmt(hi)} | "
                     f"{fmt(r['kl_ratio'], 2)} | {fmt(r['kl_mean_all'])} | {fmt(r['top1_agreement_nonfork'])} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "Compare gates at matched total movement (mean KL): high-entropy positions move more under any "
              "update, so a gate that moved the policy more is not better for that alone.", "",
              "![ablation](ablation.png)"]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.45 * len(rows) + 1.5)))
    y = list(range(len(rows)))
    means = [r["delta_pass_at_1"] or 0.0 for r in rows]
    err = [[m - (r["delta_ci95"][0] if r["delta_ci95"][0] is not None else m) for m, r in zip(means, rows)],
           [(r["delta_ci95"][1] if r["delta_ci95"][1] is not None else m) - m for m, r in zip(means, rows)]]
    ax1.errorbar(means, y, xerr=err, fmt="o", color="#4c72b0", capsize=3)
    ax1.axvline(0, color="#888", lw=0.8)
    ax1.set_yticks(y, labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("Δpass@1 (adapter − base), 95% CI")
    ax2.barh(y, [r["kl_ratio"] or 0.0 for r in rows], color="#dd8452")
    ax2.set_yticks(y, [""] * len(rows))
    ax2.invert_yaxis()
    ax2.set_xlabel("KL ratio (forks / non-forks)")
    fig.suptitle(f"Ablation: {name}")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    plt.close(fig)
