"""The offline trainer's dataset: a user's rollouts as token ids, advantages and (optionally) base scores.

:func:`prepare_fork_dataset` turns TRL-style rows (``prompt``/``completion``, standard
or conversational, or ``prompt_ids``/``completion_ids``) with a ``reward`` or an
``advantage`` into the columns :class:`ForkCollator` packs. :func:`fork_dataset` builds
the same columns from the pipeline's selected rollouts, so both go through one trainer.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import datasets
import torch

from ..core.advantages import group_advantages
from ..data.rows import tokenize_rollout
from ..errors import DataError
from ..utils.sequences import pack_batch, pad_ragged

logger = logging.getLogger(__name__)

# Dataset column -> key of the scoring stage's per-rollout scores.
SCORE_COLUMNS = {"base_entropy": "entropy", "base_logp": "logp", "topk_ids": "topk_ids", "topk_logp": "topk_logp"}
COLUMNS = ("prompt_ids", "completion_ids", "advantage", "length", "rollout_index")


def fork_dataset(selection: list[dict[str, Any]], rollouts: list[dict[str, Any]]) -> datasets.Dataset:
    """One row per selected rollout of the pipeline: its tokens, advantage, length and rollout index.

    ``rollout_index`` keys the rollout's scores in the scoring stage's shards; ``length``
    (prompt + completion tokens) is what ``group_by_length`` batches by.
    """
    rows = []
    for r in selection:
        i = int(r["rollout_index"])
        prompt_ids, completion_ids = rollouts[i]["prompt_ids"], rollouts[i]["completion_ids"]
        rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "advantage": float(r["advantage"]),
                     "length": len(prompt_ids) + len(completion_ids), "rollout_index": i})
    return datasets.Dataset.from_list(rows)


def _advantages_from_rewards(prompt_ids: list[list[int]], rewards: list[Any], clip: float,
                             drop_uniform: bool) -> tuple[list[float], list[int], dict[str, int]]:
    """Group-relative advantages over the completions of each prompt (same prompt token ids).

    Returns:
        the (N,) advantages, the indices of the rows kept, and a summary.
    """
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(prompt_ids):
        groups[tuple(p)].append(i)
    advantages = [0.0] * len(rewards)
    uniform: set[int] = set()
    for idx in groups.values():
        adv = group_advantages(torch.tensor([float(rewards[i]) for i in idx], dtype=torch.float64), clip)
        if not bool(adv.ne(0).any()):
            uniform.update(idx)
        for i, a in zip(idx, adv.tolist()):
            advantages[i] = a
    keep = [i for i in range(len(rewards)) if not (drop_uniform and i in uniform)]
    summary = {"prompts": len(groups), "uniform_prompts": sum(1 for idx in groups.values() if idx[0] in uniform),
               "single_completion_prompts": sum(1 for idx in groups.values() if len(idx) == 1)}
    return advantages, keep, summary


def _check_number(value: Any, column: str, row: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"row {row}: '{column}' must be a finite number, got {value!r}")
    return float(value)


def prepare_fork_dataset(dataset: datasets.Dataset, tokenizer: Any, *, advantage_clip: float,
                         drop_uniform_groups: bool, needs_topk: bool, keyed_scores: bool = False,
                         name: str = "train_dataset") -> datasets.Dataset:
    """The columns the trainer reads: ``prompt_ids``, ``completion_ids``, ``advantage``, ``length``,
    ``rollout_index``, and the base's ``base_entropy``/``base_logp`` (+ ``topk_ids``/``topk_logp``)
    when the dataset carries them.

    Args:
        dataset: TRL-style rows (see :func:`~reasonmaxxer.data.rows.tokenize_rollout`) with an
            ``advantage`` column, or a ``reward`` column from which advantages are taken
            within each prompt's completions (z-scored, clipped to ``advantage_clip``).
        tokenizer: the model's tokenizer; its EOS ends a text completion, as in TRL's SFT.
        drop_uniform_groups: drop the prompts whose completions all have one reward.
        needs_topk: the loss anchors to the cached top-k, so score columns must include it.
        keyed_scores: the scores come from a mapping keyed by the dataset's own
            ``rollout_index`` column (the pipeline's), which must then be present.
        name: the argument's name, for errors.

    Raises:
        DataError naming the column or row at the first bad input.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"{name}: expected a datasets.Dataset, got {type(dataset).__name__}")
    columns = set(dataset.column_names)
    if not ({"prompt_ids", "completion_ids"} <= columns or {"prompt", "completion"} <= columns):
        raise DataError(f"{name}: needs the columns 'prompt' and 'completion' (or 'prompt_ids' and "
                        f"'completion_ids'); it has {sorted(columns)}")
    if not columns & {"advantage", "reward"}:
        raise DataError(f"{name}: needs an 'advantage' or a 'reward' column; it has {sorted(columns)}")
    if keyed_scores and "rollout_index" not in columns:
        raise DataError(f"{name}: base_scores are keyed by a 'rollout_index' column, which it lacks")
    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset has no rows")
    score_columns = [c for c in SCORE_COLUMNS if c in columns]
    if score_columns:
        wanted = ["base_entropy", "base_logp"] + (["topk_ids", "topk_logp"] if needs_topk else [])
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DataError(f"{name}: has {score_columns} but not {missing}; give every base score column "
                            f"(or none, and the trainer computes them)")

    eos_id = tokenizer.eos_token_id
    prompts, completions = [], []
    for i, row in enumerate(dataset.select_columns(
            [c for c in ("prompt", "completion", "prompt_ids", "completion_ids") if c in columns])):
        p, c = tokenize_rollout(tokenizer, row, i, eos_id=eos_id)
        if not c:
            raise DataError(f"{name}: row {i}: the completion has no tokens")
        prompts.append(p)
        completions.append(c)

    if "advantage" in columns:
        advantages = [_check_number(a, "advantage", i) for i, a in enumerate(dataset["advantage"])]
        keep = list(range(len(dataset)))
    else:
        rewards = [_check_number(r, "reward", i) for i, r in enumerate(dataset["reward"])]
        advantages, keep, summary = _advantages_from_rewards(prompts, rewards, advantage_clip, drop_uniform_groups)
        logger.info("%s: %d prompts; %d with one reward for all their completions%s; %d with one completion",
                    name, summary["prompts"], summary["uniform_prompts"],
                    " (dropped)" if drop_uniform_groups else "", summary["single_completion_prompts"])
        if not keep:
            raise DataError(f"{name}: no prompt has completions with different rewards ({summary['prompts']} "
                            "prompts): nothing to contrast; give several completions per prompt")

    table: dict[str, list[Any]] = {
        "prompt_ids": [prompts[i] for i in keep],
        "completion_ids": [completions[i] for i in keep],
        "advantage": [advantages[i] for i in keep],
        "length": [len(prompts[i]) + len(completions[i]) for i in keep],
        "rollout_index": list(range(len(keep))),
    }
    if keyed_scores:
        given = dataset["rollout_index"]
        table["rollout_index"] = [int(given[i]) for i in keep]
    for column in score_columns:
        values = dataset[column]
        for i in keep:
            n = len(values[i]) if values[i] is not None else -1
            if n != len(completions[i]):
                raise DataError(f"{name}: row {i}: '{column}' has {n} values for {len(completions[i])} completion "
                                "tokens (one per completion token, as the trainer tokenizes it)")
        table[column] = [values[i] for i in keep]
    return datasets.Dataset.from_dict(table)


def rollouts_fingerprint(dataset: datasets.Dataset, *parts: Any) -> str:
    """A short hash of every row's token ids and ``parts`` (model, dtype, scoring options):
    the folder the base scores of this dataset are cached in."""
    h = hashlib.sha256(repr(parts).encode())
    for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"]):
        h.update(repr((p, c)).encode())
    return h.hexdigest()[:16]


class ForkCollator:
    """Packs rows of :func:`prepare_fork_dataset` into the shared batch layout with their base scores.

    The scores come from the rows' own columns (``base_entropy``, ...) or, when
    ``scores`` is set, from that mapping (rollout index -> ``entropy``, ``logp``,
    ``topk_ids``, ``topk_logp`` tensors: the scoring stage's shards, read lazily).

    Returns, per batch: :func:`~reasonmaxxer.utils.sequences.pack_batch`'s tensors,
    ``advantages`` (B,), ``base_entropy``/``base_logp`` (B, C) and, when scored with a
    top-k, ``topk_ids``/``topk_logp`` (B, C, K).
    """

    def __init__(self, pad_id: int, scores: Mapping[int, dict[str, torch.Tensor]] | None = None):
        self.pad_id = pad_id
        self.scores = scores

    def _row_scores(self, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.scores is not None:
            return self.scores[int(row["rollout_index"])]
        return {key: torch.as_tensor(row[column], dtype=torch.long if key == "topk_ids" else torch.float32)
                for column, key in SCORE_COLUMNS.items() if column in row}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pack_batch([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], self.pad_id)
        C = batch["completion_ids"].shape[1]
        scores = [self._row_scores(r) for r in rows]
        batch["advantages"] = torch.tensor([float(r["advantage"]) for r in rows], dtype=torch.float32)
        batch["base_entropy"] = pad_ragged([s["entropy"].float() for s in scores], C)
        batch["base_logp"] = pad_ragged([s["logp"].float() for s in scores], C)
        if "topk_ids" in scores[0]:
            batch["topk_ids"] = pad_ragged([s["topk_ids"].long() for s in scores], C)
            batch["topk_logp"] = pad_ragged([s["topk_logp"].float() for s in scores], C)
        return batch
