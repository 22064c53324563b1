"""Teacher-forced base pass over each rollout: entropy, sampled log-prob, cached top-k.

The decoder runs once per batch; the LM head and the softmax statistics run over chunks
of completion positions, so memory holds at most batch x chunk x vocab logits. Results
go to ``scores/shard-NNNNN.safetensors`` (one per batch, written atomically), so a killed
run resumes at the first missing shard.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.entropy import token_stats
from ..errors import NonFiniteScoresError
from ..models.forward import completion_hidden, head_logits
from ..utils import distributed as dist
from ..utils.sequences import pack_batch

SCORE_KEYS = ("entropy", "logp", "topk_logp", "topk_ids")


@torch.no_grad()
def score_batch(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    top_k: int,
    chunk_size: int,
    entropy_temperature: float,
) -> dict[str, torch.Tensor]:
    """Per completion position statistics of the base model for one packed batch.

    Args:
        batch: from :func:`reasonmaxxer.utils.sequences.pack_batch` (on the model's device).

    Returns:
        ``entropy`` (B, C), ``logp`` (B, C), and with top_k > 0 ``topk_logp`` (B, C, K),
        ``topk_ids`` (B, C, K); values at padding positions are meaningless.
    """
    hidden = completion_hidden(model, batch)
    targets = batch["completion_ids"]
    parts: list[dict[str, torch.Tensor]] = []
    for s in range(0, targets.shape[1], chunk_size):
        logits = head_logits(model, hidden[:, s : s + chunk_size])
        parts.append(token_stats(logits, targets[:, s : s + chunk_size], top_k=top_k,
                                 entropy_temperature=entropy_temperature))
        del logits
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}


def check_finite_scores(stats: dict[str, torch.Tensor], valid: torch.Tensor, rollout_indices: list[int]) -> None:
    """Stop at the first NaN/inf entropy or log-prob of a completion token.

    A NaN entropy is never above a threshold, so without this check a model that
    overflows would silently have no forks. Raises :class:`NonFiniteScoresError` (exit 3)
    naming the rollout index and completion position.

    Args:
        stats: ``entropy`` and ``logp`` (B, C) from :func:`score_batch`.
        valid: (B, C) bool completion mask (on the host).
        rollout_indices: the rollout index of each row.
    """
    for key in ("entropy", "logp"):
        bad = ~torch.isfinite(stats[key].cpu()) & valid
        if bad.any():
            row, pos = (int(v) for v in bad.nonzero()[0])
            value = float(stats[key][row, pos])
            raise NonFiniteScoresError(
                f"scoring: rollout {rollout_indices[row]}, completion position {pos}: the base model's {key} is "
                f"{value} (its logits hold a NaN or inf); try model.dtype: float32 or bfloat16 (float16 overflows)"
            )


def _shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.safetensors"


def score_rollouts(
    model: Any,
    rollouts: list[dict[str, Any]],
    out_dir: Path,
    *,
    pad_id: int,
    batch_size: int,
    top_k: int,
    chunk_size: int,
    entropy_temperature: float,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every rollout (list order = rollout index) into shards under ``out_dir``."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    # Length-sorted batches waste less padding; the order is fixed so resumed shards match.
    order = sorted(range(len(rollouts)), key=lambda i: (len(rollouts[i]["completion_ids"]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Each process scores every world_size-th batch into its own shard files.
    mine = dist.my_share(len(batches))
    # A kill mid-write leaves a temporary file; each process removes those of its shards.
    own = {_shard_path(out_dir, b).name for b in mine}
    for stale in out_dir.glob(".shard-*.tmp-*"):
        if stale.name[1:].split(".tmp-")[0] in own:
            stale.unlink(missing_ok=True)
    bar = tqdm(total=sum(len(batches[b]) for b in mine), desc="scoring", unit="rollout",
               disable=not progress or not dist.is_main())
    resumed = 0
    for b in mine:
        idx = batches[b]
        path = _shard_path(out_dir, b)
        if path.exists():
            resumed += len(idx)
            bar.update(len(idx))
            continue
        packed = pack_batch(
            [rollouts[i]["prompt_ids"] for i in idx], [rollouts[i]["completion_ids"] for i in idx], pad_id
        )
        packed = {k: v.to(device) for k, v in packed.items()}
        stats = score_batch(model, packed, top_k=top_k, chunk_size=chunk_size,
                            entropy_temperature=entropy_temperature)
        lengths = packed["completion_mask"].sum(-1).cpu()
        valid = packed["completion_mask"].bool().cpu()
        check_finite_scores(stats, valid, idx)
        flat = {k: v.cpu()[valid].contiguous() for k, v in stats.items()}  # ragged rows, concatenated
        if "topk_ids" in flat:
            flat["topk_ids"] = flat["topk_ids"].to(torch.int32)
        flat["rollout_index"] = torch.tensor(idx, dtype=torch.int64)
        flat["lengths"] = lengths.to(torch.int64)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(flat, str(tmp))
        os.replace(tmp, path)
        bar.update(len(idx))
    bar.close()
    resumed = sum(dist.gather_objects(resumed))
    dist.barrier()  # every shard is on disk before anyone loads them
    return {
        "rollouts": len(rollouts),
        "shards": len(batches),
        "resumed_rollouts": resumed,
        "processes": dist.world_size(),
        "seconds": time.perf_counter() - start,
    }


def load_scores(out_dir: Path, keys: tuple[str, ...] = SCORE_KEYS) -> dict[int, dict[str, torch.Tensor]]:
    """Every rollout's scores in memory, per rollout index: ``entropy`` (L,), ``logp`` (L,),
    ``topk_logp``/``topk_ids`` (L, K); only ``keys`` among them (the stored ones).

    The training stage reads them through :class:`LazyScores` instead, which holds only
    what its process touches.
    """
    scores: dict[int, dict[str, torch.Tensor]] = {}
    for path in sorted(Path(out_dir).glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as shard:
            stored = [k for k in keys if k in shard.keys()]
            offsets = [0, *shard.get_tensor("lengths").cumsum(0).tolist()]
            values = {k: shard.get_tensor(k) for k in stored}
            for row, index in enumerate(shard.get_tensor("rollout_index").tolist()):
                a, b = offsets[row], offsets[row + 1]
                scores[index] = {k: values[k][a:b] for k in stored}
    return scores


class LazyScores(Mapping[int, dict[str, torch.Tensor]]):
    """The cached scores as a read-only mapping that reads a rollout's rows from disk when asked.

    Building it reads only each shard's index (rollout ids and lengths); ``scores[i]``
    reads rollout ``i``'s slices of its shard (safetensors, memory-mapped). Under torchrun
    each process's collator asks only for the rollouts its sampler gives it, so a process
    holds its batches' scores rather than every rollout's, and the file pages are shared
    through the page cache. Values equal :func:`load_scores`'s.
    """

    def __init__(self, out_dir: Path):
        self._where: dict[int, tuple[Path, int, int]] = {}  # rollout index -> (shard, first row, end row)
        for path in sorted(Path(out_dir).glob("shard-*.safetensors")):
            with safe_open(str(path), framework="pt") as shard:
                offsets = [0, *shard.get_tensor("lengths").cumsum(0).tolist()]
                for row, index in enumerate(shard.get_tensor("rollout_index").tolist()):
                    self._where[index] = (path, offsets[row], offsets[row + 1])
        self._open: dict[Path, Any] = {}  # shard -> open safe_open handle, made on first use

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, a, b = self._where[index]
        shard = self._open.get(path)
        if shard is None:
            shard = self._open[path] = safe_open(str(path), framework="pt")
        return {k: shard.get_slice(k)[a:b] for k in SCORE_KEYS if k in shard.keys()}

    def __iter__(self) -> Iterator[int]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self) -> dict[str, Any]:
        # Data-loader workers get a copy: file handles do not pickle, so each reopens its own.
        return {"_where": self._where, "_open": {}}
