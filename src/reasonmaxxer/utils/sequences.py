"""Batch layout shared by scoring, training and evaluation.

Each row is ``[left padding | prompt | completion | right padding]``: prompts are
left-padded to the batch's longest prompt P, completions right-padded to the longest
completion C, so completion position j of every row sits at column P + j and the logits
that predict it at column P + j - 1. A model then needs only its last C + 1 logits.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pack_batch(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Lay out prompt/completion pairs for a teacher-forced pass.

    Returns:
        ``input_ids`` (B, P + C), ``attention_mask`` (B, P + C), ``position_ids``
        (B, P + C) counting from the first real token, ``completion_ids`` (B, C) and
        ``completion_mask`` (B, C).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    P = max(len(p) for p in prompt_ids)
    C = max(len(c) for c in completion_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + C), dtype=torch.long)
    completion = torch.full((B, C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((B, C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, P - len(p) : P] = torch.as_tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(c)] = torch.as_tensor(c, dtype=torch.long)
        attention_mask[i, P - len(p) : P + len(c)] = 1
        completion[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = 1
    # Positions as in generation: count real tokens only, so left padding does not shift them.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_ids": completion,
        "completion_mask": completion_mask,
    }


def pad_ragged(rows: Sequence[torch.Tensor], length: int, value: float = 0.0) -> torch.Tensor:
    """Right-pad tensors of shape (C_i, ...) to (B, length, ...), B = len(rows)."""
    first = rows[0]
    out = torch.full((len(rows), length, *first.shape[1:]), value, dtype=first.dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
