"""Parity with the paper's published objective (arXiv 2605.06241), re-derived in float64.

The reference below is written from the paper's formulas, one position at a time, and
shares no code with the project:

- forks F: completion positions with base entropy H > tau_pos in correct rollouts and
  H > tau_neg in wrong ones;
- adv_ce: sum_{F_eff} A * (-log pi) / |F_eff|, F_eff = F minus the wrong-rollout forks with
  pi <= neg_prob_floor (when the floor is > 0), which join the anchored set;
- correct_sft: sum (-log pi) / n over the forks of correct rollouts; wrong forks anchored;
- delta_hinge: mean over F of relu(m_pos - D) * |A| (correct) or relu(D + m_neg) * |A|
  (wrong), D = log pi - log pi_base;
- anchor: beta * sum KL / n over every valid position not in F_eff (prompt positions too).

The project's side is ``fork_mask`` (threshold, tau_pos/tau_neg) and ``fork_gated_loss``
(``floored_forks="anchor"``, prompt KL passed in).
"""

from __future__ import annotations

import math

import pytest
import torch

from reasonmaxxer.core.gate import fork_mask
from reasonmaxxer.core.loss import fork_gated_loss

TAU_POS, TAU_NEG, BETA = 1.4, 1.0, 0.2
PROJECT_VARIANT = {"adv_ce": "signed", "correct_sft": "correct_sft", "delta_hinge": "hinge"}


def _case(rewards=(1.0, 1.0, 0.0, 0.0)):
    """Four rollouts of one problem, right-padded completions, left-padded prompts.

    The default rewards make two correct and two wrong rollouts; non-binary ones such as
    (1, 0.5, 0.5, 0) give the middle two an advantage of exactly 0.
    """
    completion_mask = torch.tensor([
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    entropy = torch.tensor([
        [0.2, 1.5, 1.2, 2.0, 0.1, 9.0],   # correct: forks at 1 and 3 (1.2 < tau_pos); 9.0 is padding
        [1.3, 0.3, 1.6, 5.0, 5.0, 5.0],   # correct: fork at 2 only
        [1.2, 0.4, 1.1, 0.9, 2.5, 0.2],   # wrong: forks at 0, 2, 4 (> tau_neg)
        [0.5, 1.05, 0.7, 3.0, 7.0, 7.0],  # wrong: forks at 1 and 3
    ], dtype=torch.float64)
    probs = torch.tensor([
        [0.9, 0.3, 0.8, 0.5, 0.95, 0.5],
        [0.7, 0.9, 0.2, 0.5, 0.5, 0.5],
        [0.6, 0.8, 0.03, 0.9, 0.4, 0.7],  # position 2: a wrong fork below the floor 0.05
        [0.9, 0.5, 0.8, 0.04, 0.5, 0.5],  # position 3: another floored wrong fork
    ], dtype=torch.float64)
    base_probs = torch.tensor([
        [0.8, 0.4, 0.8, 0.6, 0.9, 0.5],
        [0.7, 0.8, 0.3, 0.5, 0.5, 0.5],
        [0.5, 0.8, 0.05, 0.8, 0.5, 0.6],
        [0.9, 0.4, 0.7, 0.08, 0.5, 0.5],
    ], dtype=torch.float64)
    kl = torch.tensor([
        [0.01, 0.20, 0.03, 0.40, 0.05, 1e6],
        [0.02, 0.04, 0.30, 1e6, 1e6, 1e6],
        [0.06, 0.07, 0.50, 0.08, 0.60, 0.09],
        [0.10, 0.70, 0.11, 0.80, 1e6, 1e6],
    ], dtype=torch.float64)  # 1e6 at padding: must never count
    prompt_kl = torch.tensor([
        [1e6, 0.12, 0.13],
        [0.14, 0.15, 0.16],
        [1e6, 1e6, 0.17],
        [0.18, 0.19, 0.21],
    ], dtype=torch.float64)
    prompt_mask = prompt_kl < 1e5  # left padding
    rewards = list(rewards)
    return {"completion_mask": completion_mask, "entropy": entropy, "logp": probs.log(),
            # fp32-representable: the project keeps the cached base log-probs in fp32
            "base_logp": base_probs.log().float().double(), "kl": kl, "prompt_kl": prompt_kl, "prompt_mask": prompt_mask,
            "advantages": _paper_advantages(rewards).float().double()}  # fp32-representable, as the base log-probs


def _paper_advantages(rewards: list[float], clip: float = 2.5) -> torch.Tensor:
    """z-score over the group with the population std, clipped at +-clip."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return torch.tensor([max(-clip, min(clip, (r - mean) / std)) for r in rewards], dtype=torch.float64)


def _paper_objective(case, objective: str, *, floor: float, logp: torch.Tensor, kl: torch.Tensor,
                     prompt_kl: torch.Tensor, m_pos: float = 0.0, m_neg: float = 0.0) -> torch.Tensor:
    """The published objective, one position at a time, in float64."""
    comp, H, A = case["completion_mask"], case["entropy"], case["advantages"]
    correct = [float(a) > 0 for a in A]
    B, C = comp.shape
    forks = []  # only rollouts with a positive or a negative advantage have forks
    for b in range(B):
        for t in range(C):
            if comp[b, t] and float(A[b]) != 0 and H[b, t] > (TAU_POS if correct[b] else TAU_NEG):
                forks.append((b, t))
    if objective == "adv_ce":
        effective = [(b, t) for b, t in forks
                     if correct[b] or not (floor > 0 and math.exp(float(logp[b, t].detach())) <= floor)]
        term = sum((A[b] * -logp[b, t] for b, t in effective), torch.zeros((), dtype=torch.float64))
        term = term / len(effective)
    elif objective == "correct_sft":
        effective = [(b, t) for b, t in forks if correct[b]]
        term = sum((-logp[b, t] for b, t in effective), torch.zeros((), dtype=torch.float64)) / len(effective)
    else:  # delta_hinge
        effective = forks
        terms = []
        for b, t in forks:
            delta = logp[b, t] - case["base_logp"][b, t]
            hinge = torch.relu(m_pos - delta) if correct[b] else torch.relu(delta + m_neg)
            terms.append(hinge * abs(float(A[b])))
        term = sum(terms, torch.zeros((), dtype=torch.float64)) / len(forks)
    anchored = []
    for b in range(B):
        for t in range(C):
            if comp[b, t] and (b, t) not in effective:
                anchored.append(kl[b, t])
        for j in range(prompt_kl.shape[1]):
            if case["prompt_mask"][b, j]:
                anchored.append(prompt_kl[b, j])
    return term + BETA * sum(anchored, torch.zeros((), dtype=torch.float64)) / len(anchored)


def _project_objective(case, objective: str, *, floor: float, logp, kl, prompt_kl, m_pos=0.0, m_neg=0.0):
    forks = fork_mask(case["entropy"], case["completion_mask"], mode="threshold", tau=1.4, tau_pos=TAU_POS,
                      tau_neg=TAU_NEG, positive=case["advantages"] > 0)
    loss, stats = fork_gated_loss(
        logp, case["base_logp"], case["advantages"], forks, case["completion_mask"], kl, kl_coef=BETA,
        variant=PROJECT_VARIANT[objective], neg_prob_floor=floor, floored_forks="anchor",
        hinge_margin=m_pos, hinge_margin_neg=m_neg, prompt_kl=prompt_kl, prompt_mask=case["prompt_mask"])
    return loss, stats


@pytest.mark.parametrize("objective, floor, margins", [
    ("adv_ce", 0.0, (0.0, 0.0)),
    ("adv_ce", 0.05, (0.0, 0.0)),
    ("correct_sft", 0.0, (0.0, 0.0)),
    ("delta_hinge", 0.0, (0.0, 0.0)),
    ("delta_hinge", 0.0, (0.25, 0.75)),  # fp32-exact margins (the project casts A to fp32)
])
@pytest.mark.parametrize("rewards", [(1.0, 1.0, 0.0, 0.0), (1.0, 0.5, 0.5, 0.0)], ids=["binary", "zero_advantage"])
def test_loss_and_gradients_equal_the_papers_objective(objective, floor, margins, rewards):
    case = _case(rewards)
    if rewards[1] == 0.5:
        assert float(case["advantages"][1]) == 0.0 == float(case["advantages"][2])
    m_pos, m_neg = margins
    grads = []
    values = []
    for side in (_paper_objective, _project_objective):
        logp = case["logp"].clone().requires_grad_(True)
        kl = case["kl"].clone().requires_grad_(True)
        prompt_kl = case["prompt_kl"].clone().requires_grad_(True)
        out = side(case, objective, floor=floor, logp=logp, kl=kl, prompt_kl=prompt_kl, m_pos=m_pos, m_neg=m_neg)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        values.append(loss.item())
        grads.append((logp.grad, kl.grad, prompt_kl.grad))
    assert values[1] == pytest.approx(values[0], rel=1e-12, abs=1e-12)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_case_exercises_every_rule():
    """The hand-made case has what the parity test is about: two floored forks, padding, mixed A."""
    case = _case()
    _, stats = _project_objective(case, "adv_ce", floor=0.05, logp=case["logp"], kl=case["kl"],
                                  prompt_kl=case["prompt_kl"])
    assert stats["forks"] == 8 and stats["forks_correct"] == 3 and stats["forks_wrong"] == 5
    assert stats["forks_floored"] == 2
    # The floor moves the value: anchoring the floored forks is not a no-op here.
    off, _ = _project_objective(case, "adv_ce", floor=0.0, logp=case["logp"], kl=case["kl"],
                                prompt_kl=case["prompt_kl"])
    with_floor, _ = _project_objective(case, "adv_ce", floor=0.05, logp=case["logp"], kl=case["kl"],
                                       prompt_kl=case["prompt_kl"])
    assert abs(off.item() - with_floor.item()) > 1e-3


def test_drop_keeps_floored_forks_in_the_count_and_out_of_the_anchor():
    """``floored_forks: drop`` (the project's earlier rule) differs from the paper's by exactly that."""
    case = _case()
    forks = fork_mask(case["entropy"], case["completion_mask"], mode="threshold", tau=1.4, tau_pos=TAU_POS,
                      tau_neg=TAU_NEG, positive=case["advantages"] > 0)
    loss, stats = fork_gated_loss(case["logp"], case["base_logp"], case["advantages"], forks,
                                  case["completion_mask"], case["kl"], kl_coef=BETA, variant="signed",
                                  neg_prob_floor=0.05, floored_forks="drop")
    A, lp = case["advantages"], case["logp"]
    pushed = [(0, 1), (0, 3), (1, 2), (2, 0), (2, 4), (3, 1)]  # the forks minus the two floored
    fork_term = sum(float(A[b] * -lp[b, t]) for b, t in pushed) / 8
    anchored = [(b, t) for b in range(4) for t in range(6) if case["completion_mask"][b, t]
                and (b, t) not in pushed + [(2, 2), (3, 3)]]
    kl_term = sum(float(case["kl"][b, t]) for b, t in anchored) / len(anchored)
    assert loss.item() == pytest.approx(fork_term + BETA * kl_term, rel=1e-12)
