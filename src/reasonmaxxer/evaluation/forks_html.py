"""forks.html: held-out rollouts token by token, shaded by base entropy, forks outlined."""

from __future__ import annotations

import html
import string
from importlib import resources
from typing import Any

import torch

from .formatting import fmt


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
    template = string.Template((resources.files(__package__) / "templates" / "forks.html").read_text())
    return template.substitute(
        mode=html.escape(gate["mode"]), tau=gate["tau"], quantile=gate["quantile"], k=gate["k"],
        kl_fork=fmt(movement["fork"]["kl_mean"] if movement["fork"] else None),
        kl_nonfork=fmt(movement["nonfork"]["kl_mean"] if movement["nonfork"] else None),
        correct=col(correct), wrong=col(wrong),
    )
