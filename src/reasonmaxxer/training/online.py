"""GRPO-style training that samples as it trains: TRL's GRPOTrainer, counted, and the online fork-gated arm.

:class:`ComputeCountingGRPOTrainer` is TRL's own GRPO with one addition: it counts what it
spends (forward and trained tokens, wall seconds; see :mod:`reasonmaxxer.utils.flops`)
and writes ``compute.json``. :class:`ForkGatedGRPOTrainer` samples the same way and trains
with this project's gate and loss instead of GRPO's.

Tested on TRL 1.5 to 1.16 (GRPOTrainer; differences in training/compat.py). What is relied on, and nothing else:

- overridden: ``_generate`` (returns ``prompt_ids, completion_ids, ...`` lists; counted),
  ``_generate_and_score_completions`` (its output dict: ``prompt_ids``/``prompt_mask``
  left-padded, ``completion_ids``/``completion_mask`` right-padded, ``advantages`` (B,) of
  this process's rows, and ``old_per_token_logps``/``ref_per_token_logps`` when those
  passes ran), ``_calculate_rewards`` (returns the (N, F) rewards gathered over all
  processes, in process order), ``compute_loss``, ``log`` and ``_save_checkpoint``
  (each calls the original);
- read: ``num_generations``, ``accelerator``, ``_metrics``, ``state``, ``args``,
  ``model``, and the attribute ``loss_is_scaled_for_ga`` (the online loss is a
  per-micro-batch mean, so the Trainer divides by the accumulation steps).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from ..core.advantages import group_advantages
from ..errors import ConfigError
from ..models.forward import base_token_stats, policy_token_stats
from ..utils.flops import ComputeLedger, base_parameter_count
from ..utils.storage import atomic_write_json, read_json
from .compat import divide_loss_by_accumulation, seed_before_adapter_init, sync_colocated_vllm_on_cpu
from .configs import ForkGatedGRPOConfig
from .trainer import FiniteAdapterCheck, ForkGatedLoss, FsdpAdapterSave, NamedBaseModelCard

logger = logging.getLogger(__name__)

COMPUTE_FILE = "compute.json"
_LEDGER_KEYS = ("forward_tokens", "trained_tokens", "wall_seconds", "flops")


def real_tokens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """() the non-padding prompt and completion positions of a GRPO batch (a device tensor)."""
    return inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()


def packed_batch(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GRPO batch in the layout of :func:`reasonmaxxer.utils.sequences.pack_batch`.

    TRL's prompts are left-padded to P and its completions right-padded to C, which is
    that layout already; positions count real tokens only, as in generation.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` (B, P + C), ``completion_ids``
        and ``completion_mask`` (B, C).
    """
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return {
        "input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
        "completion_ids": inputs["completion_ids"],
        "completion_mask": inputs["completion_mask"],
    }


def ledger_entry(ledger: ComputeLedger) -> dict[str, Any]:
    """The ledger's counts without its parameter count: one ``compute.json`` entry."""
    d = ledger.to_dict()
    return {k: d[k] for k in _LEDGER_KEYS}


class ComputeCountingGRPOTrainer(NamedBaseModelCard, FsdpAdapterSave, GRPOTrainer):
    """TRL's GRPOTrainer that counts its compute and writes ``<run_dir>/compute.json``
    (``run_dir`` defaults to ``args.output_dir``).

    Forward tokens: every prompt and completion token of each sample (prefill once per
    sample), and every real position of the old-log-prob and reference passes when TRL
    runs them. Trained tokens: every real position of each micro-batch that goes through
    forward and backward. Counts are per process and summed over processes when read.
    """

    def __init__(self, *args: Any, run_dir: Path | str | None = None, base_model_name: str | None = None,
                 **kwargs: Any):
        self.base_model_name = base_model_name
        self._checkpoint_entries: list[dict[str, Any]] = []
        self._host_counts = [0, 0]  # this process: forward, trained tokens since this run started
        self._device_counts: list[torch.Tensor] = []  # (2,) increments not read yet: no host sync per micro-batch
        self._wall_start: float | None = None
        grpo_args = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments.get("args")
        if grpo_args is not None:  # TRL's default config seeds itself
            seed_before_adapter_init(grpo_args.seed)
        super().__init__(*args, **kwargs)
        sync_colocated_vllm_on_cpu(self)
        self.run_dir = Path(run_dir if run_dir is not None else self.args.output_dir)
        self.check_launch()
        # Totals (all processes) at the checkpoint this run resumed from; N is the base's parameters.
        self._resumed = ComputeLedger(base_parameter_count(self.accelerator.unwrap_model(self.model)))

    # ------------------------------------------------------------------ counting
    def _count(self, tokens: torch.Tensor, *, forward_passes: int = 0, trained: bool = False) -> None:
        if self.model.training:
            self._device_counts.append(torch.stack([tokens * forward_passes, tokens * int(trained)]).long())

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        if self.model.training:
            prompt_ids, completion_ids = out[0], out[1]
            self._host_counts[0] += sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
        return out

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        passes = int("old_per_token_logps" in out) + int("ref_per_token_logps" in out)
        if passes:
            self._count(real_tokens(out), forward_passes=passes)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count(real_tokens(inputs), trained=True)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def compute_totals(self) -> ComputeLedger:
        """The run's compute so far, summed over processes (every process must call it)."""
        local = torch.tensor(self._host_counts, dtype=torch.long, device=self.accelerator.device)
        if self._device_counts:
            local = local + torch.stack(self._device_counts).sum(0).to(local.device)
            self._device_counts = []
        self._host_counts = local.tolist()
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        forward, trained = (int(x) for x in total.tolist())
        elapsed = time.perf_counter() - self._wall_start if self._wall_start is not None else 0.0
        r = self._resumed
        return ComputeLedger(r.n_params, forward_tokens=r.forward_tokens + forward,
                             trained_tokens=r.trained_tokens + trained, wall_seconds=r.wall_seconds + elapsed)

    def write_compute(self, checkpoint_dir: str | None = None) -> ComputeLedger:
        """Write ``compute.json`` (and a copy into ``checkpoint_dir``, recording a checkpoint entry)."""
        totals = self.compute_totals()
        if checkpoint_dir is not None:
            self._checkpoint_entries.append({"step": self.state.global_step, **ledger_entry(totals)})
        record = {"n_params": totals.n_params, "checkpoints": list(self._checkpoint_entries),
                  "total": ledger_entry(totals)}
        if self.is_world_process_zero():
            atomic_write_json(self.run_dir / COMPUTE_FILE, record)
            if checkpoint_dir is not None and os.path.isdir(checkpoint_dir):
                atomic_write_json(Path(checkpoint_dir) / COMPUTE_FILE, record)
        return totals

    def _restore_compute(self, checkpoint: str) -> None:
        """Continue the counts from what a checkpoint recorded (a run resumed from it)."""
        path = Path(checkpoint) / COMPUTE_FILE
        if not path.is_file():
            logger.warning("%s has no %s: compute is counted from this run's start", checkpoint, COMPUTE_FILE)
            return
        record = read_json(path)
        self._resumed = ComputeLedger.from_dict({"n_params": self._resumed.n_params, **record["total"]})
        self._checkpoint_entries = list(record.get("checkpoints", []))

    # ------------------------------------------------------------------ Trainer hooks
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if isinstance(resume_from_checkpoint, str):
            self._restore_compute(resume_from_checkpoint)
        self._wall_start = time.perf_counter()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        totals = self.compute_totals()
        logs = {**logs, "compute/flops": totals.flops, "compute/forward_tokens": totals.forward_tokens,
                "compute/trained_tokens": totals.trained_tokens}
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        self.write_compute(checkpoint_dir=folder)


class ForkGatedGRPOTrainer(ForkGatedLoss, ComputeCountingGRPOTrainer):
    """TRL's GRPOTrainer with the fork-gated loss: a drop-in for ``GRPOTrainer(model, reward_funcs, args,
    train_dataset, peft_config)`` whose gradient flows only through the **base** model's forks.

    It samples and rewards as GRPO does (``num_generations`` completions per prompt, your
    reward functions, TRL's generation settings). Each micro-batch then runs one pass
    with the LoRA adapter disabled, which gives the base's log-probs, its entropy at
    ``entropy_temperature`` and the states the exact KL compares with. The gate reads the
    base's entropy (or the policy's), and advantages are z-scored within each prompt's
    group. The signed term acts at forks and the exact KL to the base elsewhere. The
    policy's pass runs the LM head fused with its log-probs and the KL (no (B, C, V) logits).
    GRPO's own loss settings (beta, clipping, importance ratios) are not used.

    TRL's ``top_entropy_quantile`` gates on the *policy's* entropy, which drifts as it
    trains; this gate stays on the base's. Needs a LoRA adapter (``peft_config`` or a
    ``PeftModel``): the base is the model with its adapter disabled, never a second copy.
    Counts its compute into ``compute.json`` in ``args.output_dir``.

    Args:
        model: a model id or folder, a ``PreTrainedModel``, or a ``PeftModel``.
        reward_funcs: as in TRL's GRPOTrainer (functions, reward model ids or models).
        args: the :class:`~reasonmaxxer.ForkGatedGRPOConfig`.
        train_dataset: prompts, as in TRL's GRPOTrainer.
        eval_dataset: as in TRL's GRPOTrainer.
        processing_class: as in TRL's GRPOTrainer.
        reward_processing_classes: as in TRL's GRPOTrainer.
        callbacks: as in TRL's GRPOTrainer; a
            :class:`~reasonmaxxer.training.trainer.FiniteAdapterCheck` is added.
        optimizers: as in TRL's GRPOTrainer.
        **kwargs: the other GRPOTrainer keywords (``peft_config``, ...), ``run_dir``
            (where ``compute.json`` goes; default ``args.output_dir``) and
            ``base_model_name`` (the base's name in the checkpoints' model card).
    """

    _tag_names = ["trl", "grpo", "reasonmaxxer", "fork-gated"]

    def __init__(self, model: Any, reward_funcs: Any = None, args: ForkGatedGRPOConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, callbacks: list[Any] | None = None,
                 optimizers: tuple[Any, Any] = (None, None), **kwargs: Any):
        if args is None:
            model_id = model if isinstance(model, str) else model.config._name_or_path
            args = ForkGatedGRPOConfig(f"{model_id.rstrip('/').split('/')[-1]}-ForkGatedGRPO")
        elif not isinstance(args, ForkGatedGRPOConfig):
            raise TypeError(f"args: expected a reasonmaxxer.ForkGatedGRPOConfig, got {type(args).__name__}")
        self.gate, self.loss_cfg = args.gate_config, args.loss_config
        self.entropy_temperature = args.entropy_temperature
        self.advantage_clip = args.advantage_clip
        self._rewards_gathered: torch.Tensor | None = None
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
                         reward_processing_classes, [FiniteAdapterCheck(), *(callbacks or [])], optimizers, **kwargs)
        divide_loss_by_accumulation(self)
        if not hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter"):
            raise ConfigError("peft_config: ForkGatedGRPOTrainer trains a LoRA adapter (pass a peft.LoraConfig or a "
                              "PeftModel): the base it gates and anchors on is the model with its adapter disabled")

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_gathered = rewards  # (N over all processes, functions), for the advantages below
        return rewards

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(N,) advantages of every process's rows: :func:`group_advantages` per group of num_generations.

        ``rewards`` is (N, F): the reward functions' values (one function here; several are summed,
        a None reward counts 0).
        """
        total = rewards.nan_to_num(0.0).sum(dim=1).float()
        groups = total.view(-1, self.num_generations)
        return torch.stack([group_advantages(g, self.advantage_clip) for g in groups]).reshape(-1)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        local = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * local
        out["advantages"] = self.group_advantages(self._rewards_gathered)[start : start + local].to(
            out["completion_ids"].device)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("ForkGatedGRPOTrainer does not return outputs")
        batch = packed_batch(inputs)
        peft_model = self.accelerator.unwrap_model(model)
        # One forward pass without the adapter (counted) and one trained pass.
        self._count(real_tokens(inputs), forward_passes=1, trained=True)
        base = base_token_stats(model, peft_model, batch, entropy_temperature=self.entropy_temperature)
        policy_entropy = self.gate.entropy_source == "policy"
        policy = policy_token_stats(model, peft_model, batch, kl_anchor="exact", base_hidden=base.hidden,
                                    entropy_temperature=self.entropy_temperature if policy_entropy else None)
        loss, _ = self.gated_loss(
            model, policy_logp=policy.logp, base_logp=base.logp, kl=policy.kl,
            gate_entropy=policy.entropy if policy_entropy else base.entropy, base_entropy=base.entropy,
            advantages=inputs["advantages"], completion_mask=inputs["completion_mask"],
        )
        return loss
