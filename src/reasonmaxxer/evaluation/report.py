"""report.md and the console summary of an evaluation (plots: :mod:`.plots`; forks.html: :mod:`.forks_html`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..utils.storage import atomic_write_text
from .formatting import fmt


def markdown(movement: dict[str, Any], accuracy: dict[str, Any], top: list[dict[str, Any]], plots: list[str]) -> str:
    b, a, d = accuracy["base"], accuracy["adapter"], accuracy["delta_pass_at_1"]
    k = b["samples_per_problem"]
    lines = [
        "# ReasonMaxxer evaluation", "",
        "## Accuracy on held-out problems", "",
        f"| | pass@1 | pass@{k} | greedy | n |", "|---|---|---|---|---|",
        f"| base | {fmt(b['pass_at_1'])} | {fmt(b[f'pass_at_{k}'])} | {fmt(b.get('greedy_accuracy'))} | {b['n']} |",
        f"| adapter | {fmt(a['pass_at_1'])} | {fmt(a[f'pass_at_{k}'])} | {fmt(a.get('greedy_accuracy'))} | {a['n']} |",
        "",
        f"Δpass@1 = {fmt(d['mean'])} (paired bootstrap 95% CI {fmt(d['ci95'][0])} to {fmt(d['ci95'][1])}, "
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
        lines.append(f"| {key} | {fmt(f_.get(key))} | {fmt(n_.get(key))} |")
    lines += [
        "",
        f"- KL ratio (forks / non-forks): **{fmt(movement['kl_ratio'], 2)}**",
        f"- share of all KL mass at forks: **{fmt(movement['kl_share_at_forks'], 2)}**, "
        f"at {fmt(movement['fork_share_of_positions'], 2)} of the positions",
        f"- overlap of base and policy high-entropy (top 20%) position sets: {fmt(movement.get('high_entropy_overlap'))}",
        "", "## Movement by base-entropy decile", "",
        "| decile | entropy range | n | mean KL | top-1 agreement |", "|---|---|---|---|---|",
    ]
    for i, dec in enumerate(movement["entropy_deciles"], 1):
        lines.append(f"| {i} | {fmt(dec['lo'], 2)}–{fmt(dec['hi'], 2)} | {dec['n']} | {fmt(dec['kl_mean'])} | "
                     f"{fmt(dec['top1_agreement'])} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Token-level view: [forks.html](forks.html)", "", "## Most-moved positions", "",
              "| context | token | base p | policy p | KL | H_base | fork |", "|---|---|---|---|---|---|---|"]
    for r in top[:20]:
        ctx = r["context"].replace("|", "\\|").replace("\n", "↵")
        tok = r["token"].replace("|", "\\|").replace("\n", "↵")
        lines.append(f"| …{ctx} | `{tok}` | {fmt(r['base_p'])} | {fmt(r['policy_p'])} | {fmt(r['kl'])} | "
                     f"{fmt(r['base_entropy'], 2)} | {'yes' if r['fork'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, *, movement: dict[str, Any], accuracy: dict[str, Any], positions: dict[str, Any],
                 rollouts: list[dict[str, Any]], tokenizer: Any, top: list[dict[str, Any]]) -> None:
    from .forks_html import forks_html
    from .plots import plot_all

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
        rows.append(f"{key:<24}{fmt(f.get(key)):>10}{fmt(n.get(key)):>12}")
    rows += [
        f"kl_ratio {fmt(m['kl_ratio'], 2)}   kl_share_at_forks {fmt(m['kl_share_at_forks'], 2)}   "
        f"fork_share {fmt(m['fork_share_of_positions'], 2)}",
        f"pass@1 base {fmt(a['base']['pass_at_1'])} -> adapter {fmt(a['adapter']['pass_at_1'])}   "
        f"delta {fmt(d['mean'])} [95% CI {fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}]   "
        f"pass@{k} {fmt(a['base'][f'pass_at_{k}'])} -> {fmt(a['adapter'][f'pass_at_{k}'])}   "
        f"greedy {fmt(a['base'].get('greedy_accuracy'))} -> {fmt(a['adapter'].get('greedy_accuracy'))}",
        f"({result['timings']['total_s']:.0f} s)",
    ]
    return "\n".join(rows)
