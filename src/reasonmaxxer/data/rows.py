"""TRL-style rollout rows: ``prompt`` / ``completion`` (text or chat messages) or their token ids.

One tokenization for everything that reads a user's rollouts: the trainer's dataset
(:mod:`reasonmaxxer.training.dataset`) and the movement measure
(:func:`reasonmaxxer.movement`), so that a fork found by one is a fork found by the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import DataError


def tokenize_rollout(tokenizer: Any, row: Mapping[str, Any], index: int = 0, *,
                     eos_id: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one TRL-style row.

    Standard rows are tokenized as they are (the prompt with the tokenizer's special
    tokens, the completion without, then ``eos_id`` when given and not already last, as
    TRL's SFT appends the EOS token); conversational rows through the chat template, the
    completion being what the full conversation adds after the prompt's generation
    prompt. Pre-tokenized rows (``prompt_ids``, ``completion_ids``) are taken as given.
    """
    if "prompt_ids" in row and "completion_ids" in row:
        return list(row["prompt_ids"]), list(row["completion_ids"])
    if "prompt" not in row or "completion" not in row:
        raise DataError(f"row {index}: needs 'prompt' and 'completion' (or 'prompt_ids' and 'completion_ids'); "
                        f"it has {sorted(row)}")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
        if eos_id is not None and completion_ids[-1:] != [eos_id]:
            completion_ids = [*completion_ids, eos_id]
        return tokenizer(prompt).input_ids, completion_ids
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
        full = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False))
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"row {index}: the chat template renders the prompt differently inside the full "
                            "conversation; pass prompt_ids and completion_ids instead")
        return prompt_ids, full[len(prompt_ids):]
    raise DataError(f"row {index}: 'prompt' and 'completion' must both be text or both lists of messages")
