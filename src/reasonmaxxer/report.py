"""Eval outputs a person reads: report.md, three plots, and forks.html."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from .storage import atomic_write_text

SHIFT_NAMES = ("unshifted", "reranked", "shifted")


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


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


def _rollout_html(r: dict[str, Any], per: dict[str, torch.Tensor], tokenizer: Any, h_max: float) -> str:
    spans = []
    for t, tok in enumerate(r["completion_ids"]):
        h = float(per["base_entropy"][t])
        level = min(h / h_max, 1.0) if h_max > 0 else 0.0
        bg = f"rgba(255,140,0,{0.08 + 0.8 * level:.2f})"
        fork = bool(per["fork"][t])
        title = (f"H_base={h:.2f} nats | p_base={float(per['base_logp'][t].exp()):.3f} | "
                 f"p_policy={float(per['policy_logp'][t].exp()):.3f} | KL={float(per['kl'][t]):.3f}"
                 f"{' | FORK' if fork else ''}")
        text = html.escape(tokenizer.decode([tok])).replace("\n", "↵<br>")
        cls = "tok fork" if fork else "tok"
        spans.append(f'<span class="{cls}" style="background:{bg}" title="{html.escape(title)}">{text}</span>')
    verdict = "correct" if r["reward"] > 0 else "wrong"
    return (f'<div class="ro {verdict}"><div class="hd">{html.escape(r["problem_id"])} · sample {r["sample"]} · '
            f'{verdict} · answer {html.escape(str(r["answer"]))}</div>{"".join(spans)}</div>')


def forks_html(positions: dict[str, Any], rollouts: list[dict[str, Any]], tokenizer: Any, movement: dict[str, Any],
               per_side: int = 8) -> str:
    flat = positions["flat"]
    per_rollout: list[dict[str, torch.Tensor]] = []
    for i in range(len(rollouts)):
        sel = flat["rollout"] == i
        per_rollout.append({k: flat[k][sel] for k in ("base_entropy", "fork", "base_logp", "policy_logp", "kl")})
    h_max = float(flat["base_entropy"].quantile(0.99)) if flat["base_entropy"].numel() else 1.0
    # Show the rollouts where the adapter acted most (largest total KL) on each side.
    order = sorted(range(len(rollouts)), key=lambda i: -float(per_rollout[i]["kl"].sum()))
    correct = [i for i in order if rollouts[i]["reward"] > 0][:per_side]
    wrong = [i for i in order if rollouts[i]["reward"] <= 0][:per_side]
    col = lambda idx: "".join(_rollout_html(rollouts[i], per_rollout[i], tokenizer, h_max) for i in idx)  # noqa: E731
    gate = movement["gate"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ReasonMaxxer forks</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
.cols {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1.5em; }}
.ro {{ font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; border: 1px solid #ddd;
       border-radius: 6px; padding: .6em; margin-bottom: 1em; }}
.ro.correct .hd {{ color: #2e7d32; }} .ro.wrong .hd {{ color: #c62828; }}
.hd {{ font-family: system-ui, sans-serif; font-weight: 600; margin-bottom: .3em; }}
.tok {{ border-radius: 3px; padding: 1px 0; white-space: pre-wrap; }}
.tok.fork {{ outline: 2px solid #1565c0; }}
.tok:hover {{ outline: 2px solid #000; }}
</style></head><body>
<h1>Where the adapter acted</h1>
<p>Held-out rollouts sampled from the base. Shade: base entropy (darker = higher). Outlined: forks
(gate <code>{html.escape(gate['mode'])}</code>, τ={gate['tau']}, ρ={gate['quantile']}, k={gate['k']}).
Hover a token for base/policy probability and KL. Rollouts with the largest total KL first.
KL at forks {_f(movement['fork']['kl_mean'] if movement['fork'] else None)} vs elsewhere
{_f(movement['nonfork']['kl_mean'] if movement['nonfork'] else None)} nats.</p>
<div class="cols"><div><h2>Correct rollouts</h2>{col(correct)}</div><div><h2>Wrong rollouts</h2>{col(wrong)}</div></div>
</body></html>"""


def markdown(movement: dict[str, Any], accuracy: dict[str, Any], top: list[dict[str, Any]], plots: list[str]) -> str:
    b, a, d = accuracy["base"], accuracy["adapter"], accuracy["delta_pass_at_1"]
    k = b["samples_per_problem"]
    lines = [
        "# ReasonMaxxer evaluation", "",
        "## Accuracy on held-out problems", "",
        f"| | pass@1 | pass@{k} | greedy | n |", "|---|---|---|---|---|",
        f"| base | {_f(b['pass_at_1'])} | {_f(b[f'pass_at_{k}'])} | {_f(b.get('greedy_accuracy'))} | {b['n']} |",
        f"| adapter | {_f(a['pass_at_1'])} | {_f(a[f'pass_at_{k}'])} | {_f(a.get('greedy_accuracy'))} | {a['n']} |",
        "",
        f"Δpass@1 = {_f(d['mean'])} (paired bootstrap 95% CI {_f(d['ci95'][0])} to {_f(d['ci95'][1])}, "
        f"{d['n']} problems).", "",
        "## Movement at forks vs elsewhere", "",
        f"Gate: `{movement['gate']['mode']}`, forks measured at the `{movement['gate'].get('measured_at')}` gate "
        f"(τ={movement['gate']['tau']}, ρ={movement['gate']['quantile']}, "
        f"k={movement['gate']['k']}), entropy at T={movement['gate']['entropy_temperature']}; "
        f"{movement['positions']['fork']} fork and {movement['positions']['nonfork']} non-fork positions "
        f"from {movement.get('rollouts', '?')} held-out base rollouts.", "",
        "| metric | forks | non-forks |", "|---|---|---|",
    ]
    for key in ("kl_mean", "js_mean", "top1_agreement", "unshifted", "reranked", "shifted", "promoted_in_base_top5",
                "dlogp_correct", "dlogp_wrong", "contrastive_gap"):
        f_, n_ = movement["fork"] or {}, movement["nonfork"] or {}
        lines.append(f"| {key} | {_f(f_.get(key))} | {_f(n_.get(key))} |")
    lines += [
        "",
        f"- KL ratio (forks / non-forks): **{_f(movement['kl_ratio'], 2)}**",
        f"- share of all KL mass at forks: **{_f(movement['kl_share_at_forks'], 2)}**, "
        f"at {_f(movement['fork_share_of_positions'], 2)} of the positions",
        f"- overlap of base and policy high-entropy (top 20%) position sets: {_f(movement.get('high_entropy_overlap'))}",
        "", "## Movement by base-entropy decile", "",
        "| decile | entropy range | n | mean KL | top-1 agreement |", "|---|---|---|---|---|",
    ]
    for i, dec in enumerate(movement["entropy_deciles"], 1):
        lines.append(f"| {i} | {_f(dec['lo'], 2)}–{_f(dec['hi'], 2)} | {dec['n']} | {_f(dec['kl_mean'])} | "
                     f"{_f(dec['top1_agreement'])} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Token-level view: [forks.html](forks.html)", "", "## Most-moved positions", "",
              "| context | token | base p | policy p | KL | H_base | fork |", "|---|---|---|---|---|---|---|"]
    for r in top[:20]:
        ctx = r["context"].replace("|", "\\|").replace("\n", "↵")
        tok = r["token"].replace("|", "\\|").replace("\n", "↵")
        lines.append(f"| …{ctx} | `{tok}` | {_f(r['base_p'])} | {_f(r['policy_p'])} | {_f(r['kl'])} | "
                     f"{_f(r['base_entropy'], 2)} | {'yes' if r['fork'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, *, movement: dict[str, Any], accuracy: dict[str, Any], positions: dict[str, Any],
                 rollouts: list[dict[str, Any]], tokenizer: Any, top: list[dict[str, Any]]) -> None:
    plots = plot_all(out, movement, positions["flat"])
    atomic_write_text(out / "report.md", markdown(movement, accuracy, top, plots))
    atomic_write_text(out / "forks.html", forks_html(positions, rollouts, tokenizer, movement))


def console_summary(result: dict[str, Any]) -> str:
    """The short table eval.py prints."""
    m, a = result["movement"], result["accuracy"]
    f, n = m["fork"] or {}, m["nonfork"] or {}
    d = a["delta_pass_at_1"]
    k = a["base"]["samples_per_problem"]
    rows = [
        f"{'':<24}{'forks':>10}{'non-forks':>12}",
        f"{'positions':<24}{m['positions']['fork']:>10}{m['positions']['nonfork']:>12}",
    ]
    for key in ("kl_mean", "js_mean", "top1_agreement", "reranked", "shifted", "dlogp_correct", "dlogp_wrong"):
        rows.append(f"{key:<24}{_f(f.get(key)):>10}{_f(n.get(key)):>12}")
    rows += [
        f"kl_ratio {_f(m['kl_ratio'], 2)}   kl_share_at_forks {_f(m['kl_share_at_forks'], 2)}   "
        f"fork_share {_f(m['fork_share_of_positions'], 2)}",
        f"pass@1 base {_f(a['base']['pass_at_1'])} -> adapter {_f(a['adapter']['pass_at_1'])}   "
        f"delta {_f(d['mean'])} [95% CI {_f(d['ci95'][0])}, {_f(d['ci95'][1])}]   "
        f"pass@{k} {_f(a['base'][f'pass_at_{k}'])} -> {_f(a['adapter'][f'pass_at_{k}'])}   "
        f"greedy {_f(a['base'].get('greedy_accuracy'))} -> {_f(a['adapter'].get('greedy_accuracy'))}",
        f"({result['timings']['total_s']:.0f} s)",
    ]
    return "\n".join(rows)


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
        lines.append(f"| {label} | {_f(r['fork_fraction'])} | {_f(r['delta_pass_at_1'])} | {_f(lo)} to {_f(hi)} | "
                     f"{_f(r['kl_ratio'], 2)} | {_f(r['kl_mean_all'])} | {_f(r['top1_agreement_nonfork'])} | "
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
