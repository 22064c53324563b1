"""How far any fine-tune moved from its base, at forks and elsewhere, on your own rollouts.

:func:`movement` is what ``eval.py`` measures, as one call on two models and a dataset:
a LoRA adapter (a ``peft.PeftModel``), a merged or fully fine-tuned model, or an RL
checkpoint, against the base it came from. Rows are TRL-style ``prompt`` / ``completion``
pairs, standard (text) or conversational (lists of messages), or pre-tokenized
``prompt_ids`` / ``completion_ids``; an optional ``reward`` column splits Δlog p by correct
(reward > 0) and wrong rollouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..core.gate import fork_mask
from ..data.rows import tokenize_rollout
from ..errors import DataError
from ..models.forward import completion_hidden, head_logits
from ..utils.sequences import pack_batch, pad_ragged
from .movement import MOVEMENT_KEYS, entropy_deciles, kl_share_high_entropy, position_movement, summarize


@torch.no_grad()
def movement(
    model: Any,
    tokenizer: Any,
    dataset: Iterable[Mapping[str, Any]],
    *,
    base_model: Any = None,
    mode: str = "threshold",
    tau: float = 1.4,
    quantile: float = 0.2,
    k: int = 8,
    batch_size: int = 8,
    chunk_size: int = 128,
    entropy_temperature: float = 1.0,
    top_n: int = 5,
) -> dict[str, Any]:
    """Movement of ``model`` from its base at fork and non-fork positions of ``dataset``.

    Forks are chosen by the base's entropy (at ``entropy_temperature``) with the gate
    ``mode`` (``threshold`` at ``tau``, ``quantile`` of the dataset's completion tokens,
    or ``topk`` per sequence), as training chooses them.

    Args:
        model: the fine-tuned causal LM, or a ``peft.PeftModel``.
        tokenizer: the tokenizer of both models (its pad token pads the batches).
        dataset: rows as :func:`tokenize_rollout` reads them (a ``datasets.Dataset``
            or a list of dicts), with an optional ``reward``.
        base_model: the base. None when ``model`` is a ``PeftModel``: its base pass runs
            with the adapter disabled (never a second copy of the weights).
        mode: the gate, ``threshold``, ``quantile`` or ``topk`` (see
            :func:`~reasonmaxxer.core.gate.fork_mask`).
        tau: the threshold in nats, for ``threshold``.
        quantile: the top fraction of the dataset's completion tokens, for ``quantile``.
        k: positions per sequence, for ``topk``.
        batch_size: rollouts per forward pass.
        chunk_size: completion positions per LM-head chunk (bounds the logits held).
        entropy_temperature: the temperature the gate's entropy is measured at.
        top_n: the base top-n that a RERANKED argmax comes from.

    Returns:
        :func:`~reasonmaxxer.evaluation.movement.summarize`'s report (KL, JS, top-1
        agreement, shift classes and Δlog p at forks and elsewhere, ``kl_ratio``,
        ``kl_share_at_forks``), plus ``kl_share_top20_entropy`` (the gate-free view),
        ``entropy_deciles`` and ``rollouts``.
    """
    if mode not in ("threshold", "quantile", "topk"):
        raise ValueError(f"mode must be threshold, quantile or topk (an entropy gate), got {mode!r}")
    if base_model is None and not hasattr(model, "disable_adapter"):
        raise ValueError("base_model is None but model is not a PeftModel: pass the base model")
    rows = [dict(r) for r in dataset]
    if not rows:
        raise DataError("movement: the dataset has no rows")
    pairs = [tokenize_rollout(tokenizer, r, i) for i, r in enumerate(rows)]
    empty = [i for i, (_, c) in enumerate(pairs) if not c]
    if empty:
        raise DataError(f"row {empty[0]}: the completion has no tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_rollout: list[dict[str, torch.Tensor]] = []
    try:
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            packed = {key: v.to(device) for key, v in pack_batch([p for p, _ in chunk], [c for _, c in chunk],
                                                                 tokenizer.pad_token_id).items()}
            stats = _batch_movement(model, base_model, packed, chunk_size, entropy_temperature, top_n)
            for j, (_, completion) in enumerate(chunk):
                per_rollout.append({key: v[j, : len(completion)].cpu() for key, v in stats.items()})
    finally:
        model.train(was_training)
    lengths = [len(c) for _, c in pairs]
    mask = pad_ragged([torch.ones(n, dtype=torch.bool) for n in lengths], max(lengths), False)
    base_entropy = pad_ragged([p["base_entropy"] for p in per_rollout], max(lengths))
    forks = fork_mask(base_entropy, mask, mode=mode, tau=tau, quantile=quantile, k=k)
    flat = {key: torch.cat([p[key] for p in per_rollout]) for key in MOVEMENT_KEYS}
    correct = torch.cat([torch.full((n,), float(r.get("reward", 0.0)) > 0) for n, r in zip(lengths, rows)])
    report = summarize(flat, forks[mask], correct)
    report["kl_share_top20_entropy"] = kl_share_high_entropy(flat["base_entropy"], flat["kl"], quantile=0.2)
    report["entropy_deciles"] = entropy_deciles(flat["base_entropy"], flat["kl"], flat["top1_agree"])
    report["rollouts"] = len(rows)
    return report


def _batch_movement(model: Any, base_model: Any, batch: dict[str, torch.Tensor], chunk_size: int,
                    entropy_temperature: float, top_n: int) -> dict[str, torch.Tensor]:
    """:func:`position_movement` over one packed batch, the LM head chunk by chunk: (B, C) per key."""
    def base_pass(fn):
        if base_model is not None:
            return fn(base_model)
        with model.disable_adapter():
            return fn(model)

    base_hidden = base_pass(lambda m: completion_hidden(m, batch))
    policy_hidden = completion_hidden(model, batch)
    targets = batch["completion_ids"]
    parts = []
    for s in range(0, targets.shape[1], chunk_size):
        base_logits = base_pass(lambda m: head_logits(m, base_hidden[:, s : s + chunk_size]))
        policy_logits = head_logits(model, policy_hidden[:, s : s + chunk_size])
        parts.append(position_movement(base_logits, policy_logits, targets[:, s : s + chunk_size],
                                       entropy_temperature=entropy_temperature, top_n=top_n))
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in MOVEMENT_KEYS}
