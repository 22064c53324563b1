"""The rollout stage: sample from the frozen base, verify, append to a resumable JSONL file.

The sampling itself is :mod:`reasonmaxxer.stages.sampling`; this module is the writer:
fixed seeded batches, written whole, split across processes, resumed after a kill.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from tqdm.auto import tqdm

from ..config import Config, DataConfig, RolloutConfig
from ..data.problem import Problem
from ..data.prompts import user_message
from ..data.reward_functions import RewardFunction, call_reward_function, load_reward_function
from ..data.rewards import AnswerFormat, verify
from ..models.limits import check_context
from ..utils import distributed as dist
from ..utils.storage import append_jsonl, read_jsonl_cut_torn_tail, write_jsonl
from .sampling import eos_token_ids, generate_batch, prompt_ids, resolve_prompt_format


@dataclass(frozen=True)
class RolloutReward:
    """How rollouts are rewarded: the built-in verifier, or the user's ``reward.function`` (imported once)."""

    answer_format: AnswerFormat = "any"
    function: RewardFunction | None = None
    spec: str | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> RolloutReward:
        """The run's reward; imports ``reward.function`` (one-line ConfigError when it cannot)."""
        spec = cfg.reward.function
        if spec is not None:
            return cls(function=load_reward_function(spec), spec=spec)
        return cls(answer_format=cfg.answer_format)

    def score(self, problems: list[Problem], prompts: list[str], completions: list[str],
              completion_ids: list[list[int]]) -> list[tuple[float, str | None]]:
        """(reward, extracted answer) per completion; ``problems[i]`` is completion i's problem.

        A user function is called once for the whole batch, TRL style; it extracts nothing.
        """
        if self.function is None:
            return [verify(text, p.answer, self.answer_format) for p, text in zip(problems, completions)]
        rewards = call_reward_function(
            self.function, self.spec or "", prompts=prompts, completions=completions, completion_ids=completion_ids,
            answer=[p.answer for p in problems], kind=[p.kind for p in problems],
            problem_id=[p.id for p in problems],
        )
        return [(r, None) for r in rewards]


def rollout_batches(order: list[Problem], prompt_lengths: list[int], cfg: RolloutConfig) -> list[list[Problem]]:
    """The problems of each generate call, in ``order`` (prompts shortest first).

    With ``cfg.batch_tokens`` a call takes prompts while prompts x num_samples x (its
    longest prompt + max_new_tokens) fits the budget (at least one prompt); otherwise
    ``batch_size // num_samples`` prompts (at least one).
    """
    if not cfg.batch_tokens:
        per_call = max(1, cfg.batch_size // cfg.num_samples)
        return [order[i : i + per_call] for i in range(0, len(order), per_call)]
    batches: list[list[Problem]] = []
    current: list[Problem] = []
    longest = 0
    for problem, length in zip(order, prompt_lengths):
        widest = max(longest, length)
        if current and (len(current) + 1) * cfg.num_samples * (widest + cfg.max_new_tokens) > cfg.batch_tokens:
            batches.append(current)
            current, widest = [], length
        current.append(problem)
        longest = widest
    return [*batches, current] if current else batches


def run_rollouts(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    data: DataConfig,
    cfg: RolloutConfig,
    out_path: Path,
    *,
    seed: int,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    do_sample: bool = True,
    desc: str = "rollouts",
    reward: RolloutReward | None = None,
    prompt_format: Literal["chat", "plain"] | None = None,
) -> dict[str, Any]:
    """Sample, verify and append rollouts to ``out_path``; resume from what it holds.

    Problems are cut into fixed batches (by prompt length, for less padding); each batch
    has its own seed and is written whole after it finishes, so a resumed run skips the
    finished batches and produces the same rollouts as an uninterrupted one.

    ``reward`` defaults to the built-in verifier; ``prompt_format`` (resolved: chat or
    plain) to ``data.prompt_format`` resolved here, said in one log line.
    """
    start = time.perf_counter()
    reward = reward if reward is not None else RolloutReward()
    if prompt_format is None:
        prompt_format = resolve_prompt_format(tokenizer, data, log=dist.is_main())
    eos_ids = eos_token_ids(model, tokenizer)
    prompts = {p.id: prompt_ids(tokenizer, p, data, prompt_format) for p in problems}
    if prompts:
        check_context(model.config, longest_prompt=max(len(ids) for ids in prompts.values()),
                      max_new_tokens=cfg.max_new_tokens, model_name=getattr(model, "name_or_path", "the model"))
    order = sorted(problems, key=lambda p: (len(prompts[p.id]), p.id))
    batches = rollout_batches(order, [len(prompts[p.id]) for p in order], cfg)

    existing = read_jsonl_cut_torn_tail(out_path)
    counts = Counter(r["problem_id"] for r in existing)
    finished = [all(counts[p.id] == cfg.num_samples for p in batch) for batch in batches]
    # A batch is written whole; one with missing records was cut by a kill mid-write: drop
    # what it left and sample it again, so the file matches an uninterrupted run.
    partial = {p.id for batch, ok in zip(batches, finished) if not ok for p in batch}
    if partial & counts.keys():
        existing = [r for r in existing if r["problem_id"] not in partial]
        if dist.is_main():
            write_jsonl(out_path, existing)
    dist.barrier()
    todo = [(b, batch) for b, (batch, ok) in enumerate(zip(batches, finished)) if not ok]
    # With several processes they go in rounds: process r samples the r-th batch of each
    # round and the main process appends the round's batches in batch order, so the file
    # is the one a single process writes.
    world, rank = dist.world_size(), dist.rank()
    new_tokens = 0
    batches_per_process = [0] * world
    bar = tqdm(total=len(problems), initial=len(problems) - sum(len(b) for _, b in todo),
               desc=desc, unit="problem", disable=not progress or not dist.is_main())
    for first in range(0, len(todo), world):
        mine = todo[first + rank] if first + rank < len(todo) else None
        records: list[dict[str, Any]] = []
        if mine is not None:
            b, batch = mine
            results = generate_batch(model, tokenizer, [prompts[p.id] for p in batch], cfg, eos_ids,
                                     seed=seed * 100003 + b, do_sample=do_sample)
            flat = [(problem, j, completion, finish)
                    for problem, samples in zip(batch, results) for j, (completion, finish) in enumerate(samples)]
            texts = [tokenizer.decode(completion, skip_special_tokens=True) for _, _, completion, _ in flat]
            scores = reward.score([p for p, *_ in flat], [user_message(data.user_template(), p.prompt) for p, *_ in flat],
                                  texts, [c for _, _, c, _ in flat])
            for (problem, j, completion, finish), text, (value, extracted) in zip(flat, texts, scores):
                records.append({
                    "problem_id": problem.id, "sample": j, "kind": problem.kind,
                    "answer": problem.answer, "prompt_ids": prompts[problem.id],
                    "completion_ids": completion, "text": text, "finish": finish,
                    "reward": value, "extracted": extracted,
                })
        for source, done in enumerate(dist.gather_objects(None if mine is None else (mine[0], records))):
            if done is None:
                continue
            batches_per_process[source] += 1
            b, batch_records = done
            if dist.is_main():
                append_jsonl(out_path, batch_records)
            new_tokens += sum(len(r["completion_ids"]) for r in batch_records)
            bar.update(len(batches[b]))
            if on_batch is not None:
                on_batch(b)
    bar.close()
    dist.barrier()  # the last round is on disk before anyone reads the file
    records = read_jsonl_cut_torn_tail(out_path)
    elapsed = time.perf_counter() - start
    rewards = [r["reward"] for r in records]
    return {
        "rollouts": len(records),
        "problems": len({r["problem_id"] for r in records}),
        "mean_reward": sum(rewards) / max(len(rewards), 1),
        "new_tokens_this_run": new_tokens,
        "tokens_per_s": new_tokens / elapsed if elapsed > 0 else 0.0,
        "resumed_from": len(existing),
        "batches_per_process": batches_per_process,
    }
