"""The eval plots: KL and agreement at forks vs elsewhere, by entropy, and the shift classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .movement import SHIFT_NAMES


def _fork_cut(movement: dict[str, Any], flat: dict[str, torch.Tensor]) -> float | None:
    """The entropy above which positions are forks: tau, or the lowest fork's entropy."""
    gate = {**movement["gate"], "mode": movement["gate"].get("measured_at", movement["gate"]["mode"])}
    if gate["mode"] == "threshold":
        return float(gate["tau"])
    if gate["mode"] == "quantile" and flat["fork"].any():
        return float(flat["base_entropy"][flat["fork"]].min())
    return None


def plot_all(out: Path, movement: dict[str, Any], flat: dict[str, torch.Tensor]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # 1. Base entropy histogram with the gate.
    fig, ax = plt.subplots(figsize=(6, 3.5))
    h = flat["base_entropy"].numpy()
    ax.hist(h, bins=60, color="#4c72b0")
    cut = _fork_cut(movement, flat)
    if cut is not None:
        ax.axvline(cut, color="#c44e52", ls="--", label=f"forks: {movement['gate'].get('measured_at')} gate, {cut:.2f} nats")
        ax.legend()
    ax.set_xlabel("base entropy (nats)")
    ax.set_ylabel("completion positions")
    ax.set_title(f"Base entropy; forks {movement['fork_share_of_positions']:.0%} of positions")
    fig.tight_layout()
    fig.savefig(out / "entropy_hist.png", dpi=120)
    plt.close(fig)
    names.append("entropy_hist.png")

    # 2. Movement by base-entropy decile (no gate needed).
    deciles = movement["entropy_deciles"]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    x = list(range(1, len(deciles) + 1))
    ax1.bar(x, [d["kl_mean"] or 0.0 for d in deciles], color="#dd8452", label="mean KL(base‖policy)")
    ax1.set_xlabel("base-entropy decile (1 = lowest)")
    ax1.set_ylabel("mean KL (nats)")
    ax2 = ax1.twinx()
    ax2.plot(x, [d["top1_agreement"] for d in deciles], color="#55a868", marker="o", label="top-1 agreement")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("top-1 agreement")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    ax1.set_title("Movement as a function of base entropy")
    fig.tight_layout()
    fig.savefig(out / "movement_by_entropy.png", dpi=120)
    plt.close(fig)
    names.append("movement_by_entropy.png")

    # 3. Shift classes at forks vs non-forks.
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bottoms = [0.0, 0.0]
    colors = {"unshifted": "#8c8c8c", "reranked": "#4c72b0", "shifted": "#c44e52"}
    for name in SHIFT_NAMES:
        vals = [(movement[w] or {}).get(name) or 0.0 for w in ("fork", "nonfork")]
        ax.bar(["forks", "non-forks"], vals, bottom=bottoms, color=colors[name], label=name)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel("share of positions")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title("Shift class at forks vs elsewhere")
    fig.tight_layout()
    fig.savefig(out / "shift_classes.png", dpi=120)
    plt.close(fig)
    names.append("shift_classes.png")
    return names
