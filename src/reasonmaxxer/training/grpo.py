"""The training stage of methods grpo and online: trainers that sample from the policy as they train.

The problems are the offline recipe's training problems, framed the same way (the chat
template where the tokenizer has one: :func:`~reasonmaxxer.stages.sampling.resolve_prompt_format`)
and rewarded by the same verifier (:class:`~reasonmaxxer.stages.rollouts.RolloutReward`).
``method: grpo`` is TRL's GRPOTrainer with LoRA; ``method: online`` swaps in the fork-gated
loss (:mod:`reasonmaxxer.training.online`). Both write ``compute.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import datasets

from ..config import Config, DataConfig, grpo_arguments
from ..data.problem import Problem
from ..data.prompts import user_message
from ..errors import ConfigError
from ..stages.rollouts import RolloutReward
from ..stages.sampling import plain_prompt_text, resolve_prompt_format
from .configs import ForkGatedGRPOConfig, fork_gated_kwargs
from .heldout_eval import HeldoutEval
from .model_card import base_model_hub_id, hub_repo_id, run_name
from .online import ComputeCountingGRPOTrainer, ForkGatedGRPOTrainer
from .trainer import FiniteAdapterCheck, train_adapter


def grpo_prompt(problem: Problem, data: DataConfig, prompt_format: Literal["chat", "plain"]) -> Any:
    """The dataset's ``prompt`` for TRL: chat messages (TRL applies the chat template with the
    generation prompt) or the plain text (tokenized with the tokenizer's special tokens) —
    the token ids the offline rollouts use either way."""
    if prompt_format == "plain":
        return plain_prompt_text(problem, data)
    messages = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    return messages + [{"role": "user", "content": user_message(data.user_template(), problem.prompt)}]


def grpo_dataset(problems: list[Problem], data: DataConfig, prompt_format: Literal["chat", "plain"]) -> datasets.Dataset:
    """One row per training problem: the prompt, and the columns the reward reads."""
    return datasets.Dataset.from_list([
        {"prompt": grpo_prompt(p, data, prompt_format), "answer": p.answer, "kind": p.kind, "problem_id": p.id,
         "question": p.prompt, "user_message": user_message(data.user_template(), p.prompt)}
        for p in problems
    ])


class VerifierReward:
    """The run's reward (built-in verifier or ``reward.function``) as a TRL reward function."""

    def __init__(self, reward: RolloutReward):
        self.reward = reward
        self.__name__ = "verifier"  # TRL logs it as rewards/verifier/mean

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], *,
                 answer: list[str], kind: list[str], problem_id: list[str], question: list[str],
                 user_message: list[str], **_: Any) -> list[float]:
        # A chat completion comes as [{"role": "assistant", "content": text}].
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        problems = [Problem(id=i, prompt=q, answer=a, kind=k) for i, q, a, k in zip(problem_id, question, answer, kind)]
        return [float(value) for value, _ in self.reward.score(problems, user_message, texts, completion_ids)]


def build_grpo_trainer(
    cfg: Config,
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    run_dir: Path,
    *,
    report_to: str = "none",
    progress: bool = True,
    heldout: list[Problem] | None = None,
    reward: RolloutReward | None = None,
) -> ComputeCountingGRPOTrainer:
    """The trainer of ``cfg.method`` (grpo or online) over ``problems``, a fresh LoRA adapter on ``model``.

    Checkpoints go to ``run_dir/checkpoints``; ``compute.json`` to ``run_dir``.
    """
    import peft
    from trl import GRPOConfig

    if cfg.method not in ("grpo", "online"):
        raise ValueError(f"build_grpo_trainer: method {cfg.method!r} is not grpo or online")
    if cfg.eval.every_steps > 0 and not heldout:
        raise ConfigError("eval.every_steps: there are no held-out problems to evaluate on; set data.num_heldout > 0 "
                          "or eval.every_steps: 0")
    common_args = dict(
        output_dir=str(run_dir / "checkpoints"), report_to=report_to, run_name=run_name(cfg), seed=cfg.seed,
        **{"ddp_find_unused_parameters": False, "disable_tqdm": not progress, **grpo_arguments(cfg),
           "hub_model_id": hub_repo_id(cfg), "push_to_hub": False},
    )
    if cfg.method == "online":
        args: GRPOConfig = ForkGatedGRPOConfig(
            **common_args, **fork_gated_kwargs(cfg.gate, cfg.loss, online=True),
            entropy_temperature=cfg.entropy_temperature, advantage_clip=cfg.selection.advantage_clip)
    else:
        args = GRPOConfig(**common_args)
    lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    reward = reward if reward is not None else RolloutReward.from_config(cfg)
    model.train()
    common: dict[str, Any] = dict(
        model=model, reward_funcs=[VerifierReward(reward)], args=args,
        train_dataset=grpo_dataset(problems, cfg.data, resolve_prompt_format(tokenizer, cfg.data)),
        processing_class=tokenizer, peft_config=lora,
        run_dir=run_dir,
        base_model_name=base_model_hub_id(cfg.model.name_or_path) or Path(cfg.model.name_or_path).name,
    )
    if cfg.method == "online":  # the public trainer adds FiniteAdapterCheck itself
        trainer: ComputeCountingGRPOTrainer = ForkGatedGRPOTrainer(**common)
    else:
        trainer = ComputeCountingGRPOTrainer(**common, callbacks=[FiniteAdapterCheck()])
    if cfg.eval.every_steps > 0:
        trainer.add_callback(HeldoutEval(trainer, heldout, cfg.data, cfg.rollout, every_steps=cfg.eval.every_steps,
                                         num_samples=cfg.eval.num_samples, seed=cfg.seed, reward=reward))
    return trainer


def train_grpo(trainer: ComputeCountingGRPOTrainer, run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Train (resuming from the last complete checkpoint), save ``adapter/``, write ``compute.json``."""
    summary = train_adapter(trainer, run_dir, cfg)
    totals = trainer.write_compute()
    last = next((h for h in reversed(trainer.state.log_history) if "reward" in h), {})
    return {**summary, **({"reward": last["reward"]} if "reward" in last else {}), "flops": totals.flops,
            "forward_tokens": totals.forward_tokens, "trained_tokens": totals.trained_tokens}
