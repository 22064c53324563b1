"""How far a policy (base + LoRA adapter) moved from its base, per completion position.

Per completion position of
held-out rollouts, the forward KL(base || policy) and Jensen–Shannon divergence, top-1
agreement, the shift class of the policy's argmax (UNSHIFTED / RERANKED / SHIFTED) with
its rank under the base, and the sampled token's log-prob under both models; then
aggregates over fork and non-fork positions (:func:`summarize`), the overlap of the two
models' high-entropy sets (:func:`high_entropy_overlap`) and a gate-free view by base
entropy decile (:func:`entropy_deciles`).

Shapes: B batch, C completion positions (or a chunk of them), V vocabulary,
N flattened (masked) positions. All logs are natural (nats).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.entropy import entropy_from_logp, token_entropy
from ..core.gate import fork_mask
from ..core.kl import kl_from_logp
from ..core.ops import LN2, expectation, linear_quantiles
from ..models.forward import completion_hidden, head_logits

UNSHIFTED, RERANKED, SHIFTED = 0, 1, 2
"""``shift_class`` codes: same argmax / argmax changed to a base top-n token / changed to one outside."""
SHIFT_NAMES = ("unshifted", "reranked", "shifted")
"""The names of the ``shift_class`` codes, in code order."""

MOVEMENT_KEYS = (
    "kl",
    "js",
    "base_entropy",
    "policy_entropy",
    "top1_agree",
    "shift_class",
    "promoted_base_rank",
    "base_logp",
    "policy_logp",
)
RANK_HIST_MAX = 10
"""Promoted-token base ranks above this are pooled in the histogram bucket ``">10"``."""

def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the last axis; a row that is entirely -inf becomes all -inf (not nan)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logp.shape[-1] > 0:
        # log_softmax of an all -inf row is nan everywhere, so one column tells dead rows apart.
        dead = torch.isnan(logp[..., 0]) & torch.isneginf(logits[..., 0])
        if bool(dead.any()):
            logp[dead] = float("-inf")
    return logp


@torch.no_grad()
def position_movement(
    base_logits: torch.Tensor,
    policy_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    entropy_temperature: float = 1.0,
    top_n: int = 5,
) -> dict[str, torch.Tensor]:
    """Per-position movement of the policy from the base, for one chunk of positions.

    Everything comes from one fp32 log-softmax of each model; the other (B, C, V)
    buffers are short-lived temporaries (the vocabulary is never looped over).

    Args:
        base_logits: (B, C, V) base logits predicting ``target_ids``; may hold -inf.
        policy_logits: (B, C, V) policy logits at the same positions; may hold -inf.
        target_ids: (B, C) the sampled tokens.
        entropy_temperature: the base entropy is measured at this temperature (the gate's
            entropy); every other quantity is at temperature 1.
        top_n: the base top-n that separates RERANKED from SHIFTED.

    Returns:
        dict of (B, C) tensors:
        ``kl`` fp32 KL(base || policy) over the full vocabulary (nats; 0 at identical
        logits exactly; +inf where the policy gives -inf to a token the base supports);
        ``js`` fp32 Jensen–Shannon divergence with M = (P + Q) / 2, natural log, clamped
        to [0, ln 2];
        ``base_entropy`` / ``policy_entropy`` fp32 entropies at ``entropy_temperature`` (nats);
        ``top1_agree`` bool, argmax equal (torch.argmax's first-index tie-break);
        ``shift_class`` int8, 0 UNSHIFTED / 1 RERANKED / 2 SHIFTED;
        ``promoted_base_rank`` int64, 1-based rank under the base of the policy's argmax,
        base ties broken by lower token id (as argmax does), so it is 1 exactly where
        ``top1_agree``;
        ``base_logp``, ``policy_logp`` fp32 log-prob of the target token (-inf if that
        model gives the token a -inf logit).

    A row whose logits are all -inf has kl = js = entropy = 0 (no nan).
    """
    if base_logits.shape != policy_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(policy_logits.shape)}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    V = base_logits.shape[-1]
    blp = _log_softmax(base_logits)
    plp = _log_softmax(policy_logits)
    target = target_ids.long().unsqueeze(-1)
    out: dict[str, torch.Tensor] = {
        "base_logp": blp.gather(-1, target).squeeze(-1),
        "policy_logp": plp.gather(-1, target).squeeze(-1),
    }

    # Argmax of each and the base rank of the policy's pick: tokens strictly ahead of it
    # under the base, plus ties with a lower id (argmax returns the first maximum).
    base_arg = blp.argmax(-1)
    policy_arg = plp.argmax(-1)
    picked = blp.gather(-1, policy_arg.unsqueeze(-1))  # (B, C, 1)
    ids = torch.arange(V, device=blp.device)
    ahead = (blp > picked) | ((blp == picked) & (ids < policy_arg.unsqueeze(-1)))
    rank = ahead.sum(-1) + 1
    del ahead
    agree = policy_arg == base_arg
    out["top1_agree"] = agree
    out["promoted_base_rank"] = rank
    shift = torch.full_like(rank, SHIFTED, dtype=torch.int8)
    shift[rank <= top_n] = RERANKED
    shift[agree] = UNSHIFTED
    out["shift_class"] = shift

    bp = blp.exp()
    out["kl"] = kl_from_logp(blp, plp, base_p=bp)
    if entropy_temperature == 1.0:
        out["base_entropy"] = entropy_from_logp(blp, p=bp)
        out["policy_entropy"] = entropy_from_logp(plp)
    else:
        out["base_entropy"] = token_entropy(base_logits, temperature=entropy_temperature)
        out["policy_entropy"] = token_entropy(policy_logits, temperature=entropy_temperature)

    # JS = 1/2 KL(P || M) + 1/2 KL(Q || M), log M = logaddexp(log P, log Q) - ln 2.
    log_m = torch.logaddexp(blp, plp).sub_(LN2)
    js_base = expectation(bp, blp.sub_(log_m))  # blp is not needed any more
    del bp, blp
    pp = plp.exp()
    js_policy = expectation(pp, plp.sub_(log_m))
    del pp, plp, log_m
    out["js"] = (0.5 * (js_base + js_policy)).clamp(0.0, LN2)
    return {key: out[key] for key in MOVEMENT_KEYS}


@torch.no_grad()
def movement_for_batch(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    chunk_size: int,
    entropy_temperature: float,
    top_n: int = 5,
) -> dict[str, torch.Tensor]:
    """:func:`position_movement` of a PEFT (LoRA-type) model against its own base.

    The decoder runs twice over the batch (adapter disabled, then enabled); the LM head
    and the comparison run over chunks of ``chunk_size`` completion positions, so memory
    holds at most two batch x chunk x vocab logit tensors (plus temporaries). The model is
    put in eval mode for the passes (no LoRA dropout) and its mode restored afterwards.

    Args:
        model: a ``peft.PeftModel`` with a LoRA-type adapter (one whose
            ``disable_adapter()`` switches the injected layers off; prompt-learning
            adapters are not supported).
        batch: from :func:`reasonmaxxer.utils.sequences.pack_batch`, on the model's device.

    Returns:
        The keys of :data:`MOVEMENT_KEYS`, each (B, C); values at padding positions are
        meaningless (mask them with ``batch["completion_mask"]``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    base_model = model.get_base_model()
    targets = batch["completion_ids"]
    B, C = targets.shape

    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            base_hidden = completion_hidden(base_model, batch)
        policy_hidden = completion_hidden(base_model, batch)
        parts: list[dict[str, torch.Tensor]] = []
        for s in range(0, C, chunk_size):
            with model.disable_adapter():
                base_logits = head_logits(base_model, base_hidden[:, s : s + chunk_size])
            policy_logits = head_logits(base_model, policy_hidden[:, s : s + chunk_size])
            parts.append(
                position_movement(
                    base_logits,
                    policy_logits,
                    targets[:, s : s + chunk_size],
                    entropy_temperature=entropy_temperature,
                    top_n=top_n,
                )
            )
            del base_logits, policy_logits
    finally:
        model.train(was_training)
    if not parts:  # no completion positions at all
        empty = position_movement(
            torch.zeros(B, 0, 1), torch.zeros(B, 0, 1), torch.zeros(B, 0, dtype=torch.long)
        )
        return {k: v.to(targets.device) for k, v in empty.items()}
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in MOVEMENT_KEYS}


def _finite_or_none(x: float) -> float | None:
    """JSON has no nan/inf: report those as None."""
    return x if math.isfinite(x) else None


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    n = int(mask.sum())
    if n == 0:
        return None
    return _finite_or_none(float(values[mask].double().sum()) / n)


def _rank_hist(rank: torch.Tensor) -> dict[str, int]:
    """Counts of ranks 2..RANK_HIST_MAX (string keys, every bucket present) and ">10"."""
    counts = torch.bincount(rank.long().clamp(max=RANK_HIST_MAX + 1), minlength=RANK_HIST_MAX + 2)
    hist = {str(r): int(counts[r]) for r in range(2, RANK_HIST_MAX + 1)}
    hist[f">{RANK_HIST_MAX}"] = int(counts[RANK_HIST_MAX + 1])
    return hist


def _set_metrics(pp: dict[str, torch.Tensor], sel: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    n = int(sel.sum())
    shift = pp["shift_class"].long()
    counts = [int(((shift == c) & sel).sum()) for c in (UNSHIFTED, RERANKED, SHIFTED)]
    changed = counts[1] + counts[2]
    dlogp = pp["policy_logp"].double() - pp["base_logp"].double()
    dlogp_correct = _mean(dlogp, sel & correct)
    dlogp_wrong = _mean(dlogp, sel & ~correct)
    gap = None
    if dlogp_correct is not None and dlogp_wrong is not None:
        gap = _finite_or_none(dlogp_correct - dlogp_wrong)
    return {
        "kl_mean": _mean(pp["kl"], sel),
        "js_mean": _mean(pp["js"], sel),
        "top1_agreement": _mean(pp["top1_agree"], sel),
        "unshifted": counts[0] / n if n else None,
        "reranked": counts[1] / n if n else None,
        "shifted": counts[2] / n if n else None,
        "promoted_in_base_top5": (counts[1] / changed if changed else 1.0) if n else None,
        "dlogp_correct": dlogp_correct,
        "dlogp_wrong": dlogp_wrong,
        "contrastive_gap": gap,
        "promoted_base_rank_hist": _rank_hist(pp["promoted_base_rank"][sel & (shift != UNSHIFTED)]),
    }


def summarize(
    per_position: dict[str, torch.Tensor], fork: torch.Tensor, correct: torch.Tensor
) -> dict[str, Any]:
    """Aggregate per-position movement over fork and non-fork positions.

    Args:
        per_position: (N,) tensors of the completion positions only (already masked and
            flattened), with the keys ``kl``, ``js``, ``top1_agree``, ``shift_class``,
            ``promoted_base_rank``, ``base_logp``, ``policy_logp`` (other keys ignored).
        fork: (N,) bool, the gated positions.
        correct: (N,) bool, whether the position's rollout was correct.

    Returns:
        A JSON-serialisable dict (plain ints/floats/None, ``json.dumps(...,
        allow_nan=False)`` works)::

            {"positions": {"fork": int, "nonfork": int},
             "fork": M, "nonfork": M,
             "kl_ratio": fork kl_mean / nonfork kl_mean,
             "kl_share_at_forks": sum kl at forks / sum kl at all positions,
             "fork_share_of_positions": forks / all positions}

        Each M has ``kl_mean``, ``js_mean``, ``top1_agreement``; the shift-class shares
        ``unshifted`` + ``reranked`` + ``shifted`` = 1; ``promoted_in_base_top5`` =
        reranked / (reranked + shifted), 1.0 where no argmax changed (the "top 5" is the
        ``top_n`` the shift classes were made with); ``dlogp_correct`` / ``dlogp_wrong``,
        the mean policy - base log-prob of the sampled token in correct / wrong rollouts,
        and ``contrastive_gap`` = their difference; ``promoted_base_rank_hist``, the
        counts of the base rank of the policy's argmax over the changed positions, keys
        "2" … "10" (always present) and ">10".

        None, never nan or inf: every statistic of an empty set (its histogram is all
        zeros); ``kl_ratio`` when either mean is None or the non-fork mean is 0;
        ``kl_share_at_forks`` when the total KL is 0; ``fork_share_of_positions`` when
        N = 0; any mean or ratio that comes out non-finite (e.g. an infinite KL).
    """
    fork = fork.bool().reshape(-1)
    correct = correct.bool().reshape(-1)
    pp = {k: per_position[k].reshape(-1) for k in MOVEMENT_KEYS if k in per_position}
    missing = {"kl", "js", "top1_agree", "shift_class", "promoted_base_rank", "base_logp", "policy_logp"} - set(pp)
    if missing:
        raise KeyError(f"summarize needs per-position keys {sorted(missing)}")
    nonfork = ~fork
    n_fork, n_nonfork = int(fork.sum()), int(nonfork.sum())
    fork_m = _set_metrics(pp, fork, correct)
    nonfork_m = _set_metrics(pp, nonfork, correct)

    kl_ratio = None
    if fork_m["kl_mean"] is not None and nonfork_m["kl_mean"]:  # None or 0 -> None
        kl_ratio = _finite_or_none(fork_m["kl_mean"] / nonfork_m["kl_mean"])
    kl = pp["kl"].double()
    total = float(kl.sum())
    kl_share = None
    if total != 0.0 and math.isfinite(total):
        kl_share = _finite_or_none(float(kl[fork].sum()) / total)
    n = n_fork + n_nonfork
    return {
        "positions": {"fork": n_fork, "nonfork": n_nonfork},
        "fork": fork_m,
        "nonfork": nonfork_m,
        "kl_ratio": kl_ratio,
        "kl_share_at_forks": kl_share,
        "fork_share_of_positions": n_fork / n if n else None,
    }


def high_entropy_overlap(
    base_entropy: torch.Tensor,
    policy_entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    quantile: float = 0.2,
) -> float | None:
    """Jaccard overlap |A ∩ B| / |A ∪ B| of the base's and the policy's high-entropy sets.

    Each set is ``entropy.fork_mask(mode="quantile")`` of that model's entropy: the top
    ``quantile`` of the masked positions (ties at the cut included).

    Args:
        base_entropy, policy_entropy: (B, C) (or any equal shapes) per-position entropy.
        mask: same shape, 1 at the positions to consider.

    Returns:
        The overlap in [0, 1]; None when the mask selects no position (both sets empty).
    """
    base_set = fork_mask(base_entropy, mask, mode="quantile", quantile=quantile)
    policy_set = fork_mask(policy_entropy, mask, mode="quantile", quantile=quantile)
    union = int((base_set | policy_set).sum())
    if union == 0:
        return None
    return int((base_set & policy_set).sum()) / union


def kl_share_high_entropy(base_entropy: torch.Tensor, kl: torch.Tensor, *, quantile: float = 0.2) -> float | None:
    """Share of the total KL(base || policy) mass that sits at the base's top-``quantile`` entropy positions.

    The set is ``fork_mask(mode="quantile")`` of the base entropy over all given positions
    (ties at the cut included), the same for every adapter measured on the same rollouts,
    so adapters compare at one fixed set of positions whatever gate they trained with.

    Args:
        base_entropy, kl: (N,) over the completion positions (masked, flat).

    Returns:
        sum KL at the set / sum KL everywhere; None when N = 0 or the total KL is 0 or not finite.
    """
    h = base_entropy.reshape(1, -1)
    if h.numel() == 0:
        return None
    high = fork_mask(h, torch.ones_like(h, dtype=torch.bool), mode="quantile", quantile=quantile).reshape(-1)
    kl = kl.reshape(-1).double()
    total = float(kl.sum())
    if not math.isfinite(total) or total <= 0:
        return None
    return _finite_or_none(float(kl[high].sum()) / total)


def entropy_deciles(
    base_entropy: torch.Tensor,
    kl: torch.Tensor,
    top1_agree: torch.Tensor,
    n_bins: int = 10,
) -> list[dict[str, Any]]:
    """KL and top-1 agreement by base-entropy quantile bin (no gate involved).

    Edges e_0 ≤ … ≤ e_n are the linear quantiles k / n_bins of the N entropies (e_0 the
    minimum, e_n the maximum); bin i holds e_i ≤ H < e_{i+1}, the last bin e_{n-1} ≤ H ≤ e_n,
    so every position lands in exactly one bin. With ties an edge repeats and the bins
    between equal edges are empty (``n`` 0, means None); all ``n_bins`` bins are returned.

    Args:
        base_entropy, kl, top1_agree: (N,) over the completion positions (masked, flat).

    Returns:
        ``n_bins`` dicts ``{"lo", "hi", "n", "kl_mean", "top1_agreement"}`` in ascending
        entropy order (plain floats/ints/None); [] when N = 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    h = base_entropy.reshape(-1).double()
    if h.numel() == 0:
        return []
    kl = kl.reshape(-1)
    agree = top1_agree.reshape(-1)
    sorted_h, _ = torch.sort(h)
    edges = linear_quantiles(sorted_h, torch.arange(n_bins + 1, dtype=torch.float64) / n_bins)
    # bin = number of inner edges <= H: e_i <= H < e_{i+1}, the top edge inclusive.
    bins = torch.bucketize(h, edges[1:-1], right=True)
    out = []
    for i in range(n_bins):
        sel = bins == i
        out.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "n": int(sel.sum()),
                "kl_mean": _mean(kl, sel),
                "top1_agreement": _mean(agree, sel),
            }
        )
    return out
