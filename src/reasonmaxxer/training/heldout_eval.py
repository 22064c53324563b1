"""Held-out pass@1 during training: a TrainerCallback that samples the current policy.

Every ``eval.every_steps`` optimizer steps (and once before the first, and after the
last) the policy — the LoRA adapter enabled, in eval mode so no dropout — samples
``eval.num_samples`` completions for each of the first ``eval.during_training_problems``
held-out problems with the ``fast`` backend, from the same prompts (chat or plain) and at
the same temperature/top_p as the rollouts, rewarded as the rollouts are (the built-in
verifier or ``reward.function``: :class:`~reasonmaxxer.stages.rollouts.RolloutReward`).

The numbers go into the Trainer's log as ``eval_pass_at_1``, ``eval_mean_completion_tokens``
and ``eval_seconds`` (plus its ``step``): into ``train_log.json`` and, through the
Trainer's ``report_to``, into the run's W&B charts as ``eval/pass_at_1`` etc. (the
Trainer's W&B integration turns an ``eval_`` prefix into the ``eval/`` section, as it
does for ``eval_loss``).

Evaluation does not change training: sampling draws from its own seeded generator (and
runs inside ``torch.random.fork_rng``), the adapter is never merged (merging and
unmerging is not bit-exact), and the train mode is restored afterwards.

With several processes the problems' batches are split across processes (batch ``b`` on
process ``b mod n``, each batch with its own seed, as the rollout stage does) and the
results gathered, so every process logs the same numbers and they do not depend on the
number of processes. That needs every process to hold the whole model: with FSDP or
DeepSpeed ZeRO-3 (sharded weights, a collective in every forward) it is refused before
any work (:func:`sharded_weights`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from ..config import DataConfig, RolloutConfig
from ..data.problem import Problem
from ..data.prompts import user_message
from ..stages.rollouts import RolloutReward
from ..stages.sampling import eos_token_ids, generate_batch, prompt_ids, resolve_prompt_format
from ..utils import distributed as dist


def sharded_weights(training: dict[str, Any]) -> str | None:
    """What shards the weights over processes in this launch (FSDP, ZeRO-3), or None.

    Read from ``accelerate launch``'s environment and the ``training`` section's
    ``fsdp``/``deepspeed`` arguments.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or training.get("fsdp"):
        return "FSDP"
    stage = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    deepspeed = training.get("deepspeed")
    if isinstance(deepspeed, str) and Path(deepspeed).is_file():
        try:
            deepspeed = json.loads(Path(deepspeed).read_text())
        except ValueError:
            deepspeed = None
    if isinstance(deepspeed, dict):
        stage = (deepspeed.get("zero_optimization") or {}).get("stage", stage)
    return "DeepSpeed ZeRO-3" if str(stage) == "3" else None


def pass_at_1(rewards_by_problem: Sequence[Sequence[float]]) -> float:
    """Mean over problems of each problem's mean reward (its fraction of correct samples)."""
    if not rewards_by_problem:
        raise ValueError("pass_at_1: no problems")
    return sum(sum(r) / len(r) for r in rewards_by_problem) / len(rewards_by_problem)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of the evaluation at ``step``: a resumed run draws the same samples."""
    return seed * 1000003 + step


def sample_heldout(model: Any, tokenizer: Any, problems: list[Problem], data: DataConfig, cfg: RolloutConfig,
                   *, seed: int, reward: RolloutReward | None = None) -> dict[str, dict[str, list[Any]]]:
    """``cfg.num_samples`` completions per problem, verified, from every process's share of batches.

    Problems are batched by prompt length (``cfg.batch_size`` sequences a batch); batch
    ``b`` is sampled with seed ``seed * 100003 + b`` by process ``b mod world_size``.

    Returns, per problem id, ``{"rewards": [...], "tokens": [...]}`` (one entry per sample).
    """
    reward = reward or RolloutReward()
    eos_ids = eos_token_ids(model, tokenizer)
    prompt_format = resolve_prompt_format(tokenizer, data, log=False)
    prompts = {p.id: prompt_ids(tokenizer, p, data, prompt_format) for p in problems}
    order = sorted(problems, key=lambda p: (len(prompts[p.id]), p.id))
    per_call = max(1, cfg.batch_size // cfg.num_samples)
    batches = [order[i : i + per_call] for i in range(0, len(order), per_call)]
    mine: dict[str, dict[str, list[Any]]] = {}
    for b in dist.my_share(len(batches)):
        batch = batches[b]
        results = generate_batch(model, tokenizer, [prompts[p.id] for p in batch], cfg, eos_ids,
                                 seed=seed * 100003 + b)
        for problem, samples in zip(batch, results):
            texts = [tokenizer.decode(completion, skip_special_tokens=True) for completion, _ in samples]
            scores = reward.score([problem] * len(samples), [user_message(data.user_template(), problem.prompt)] *
                                  len(samples), texts, [completion for completion, _ in samples])
            mine[problem.id] = {"rewards": [float(r) for r, _ in scores],
                                "tokens": [len(completion) for completion, _ in samples]}
    merged: dict[str, dict[str, list[Any]]] = {}
    for part in dist.gather_objects(mine):
        merged.update(part)
    return merged


class HeldoutEval(TrainerCallback):
    """Log held-out pass@1 of the policy at step 0, every ``every_steps`` steps, and at the last step."""

    def __init__(self, trainer: Any, problems: list[Problem], data: DataConfig, rollout: RolloutConfig, *,
                 every_steps: int, num_samples: int, seed: int,
                 reward: RolloutReward | None = None):
        if every_steps < 1 or not problems:
            raise ValueError("HeldoutEval needs every_steps >= 1 and at least one problem")
        self.trainer = trainer
        self.problems = problems
        self.data = data
        # The `fast` loop samples through PEFT in this process whatever made the rollouts.
        self.sampling = dataclasses.replace(rollout, num_samples=num_samples, backend="fast")
        self.every_steps = every_steps
        self.seed = seed
        self.reward = reward or RolloutReward()

    def measure(self, step: int) -> dict[str, float]:
        """Sample and verify with the model as it is now; the metrics as they are logged."""
        start = time.perf_counter()
        model, tokenizer = self.trainer.model, self.trainer.processing_class
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            found = sample_heldout(model, tokenizer, self.problems, self.data, self.sampling,
                                   seed=step_seed(self.seed, step), reward=self.reward)
        tokens = [n for p in found.values() for n in p["tokens"]]
        return {
            "eval_pass_at_1": pass_at_1([p["rewards"] for p in found.values()]),
            "eval_mean_completion_tokens": sum(tokens) / len(tokens),
            "eval_seconds": time.perf_counter() - start,
        }

    def _evaluate_and_log(self, state: Any, control: Any) -> None:
        model = self.trainer.model
        was_training = model.training
        should_log = control.should_log
        model.eval()
        try:
            metrics = self.measure(state.global_step)
            # Logged while the model is still in eval mode: SFTTrainer.log then merges its
            # (empty) eval metric buffer, leaving this step's training metrics for the train log.
            self.trainer.log(metrics)
        finally:
            model.train(was_training)
            # Trainer.log clears should_log; the step's own train log entry must still be written.
            control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a resumed run has this point in its restored log history
            self._evaluate_and_log(state, control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every_steps == 0 or step == state.max_steps:
            self._evaluate_and_log(state, control)
        return control
