"""ForkGatedTrainer: TRL's SFTTrainer with its loss replaced by the fork-gated objective.

Tested on TRL 1.5 to 1.16 (``SFTTrainer.compute_loss``/``log``/``_metrics`` are what we
override or reuse). The reference model is the base itself: the cached top-k from
scoring (``loss.kl_anchor: cached``) or the same weights with the LoRA adapter disabled
(``exact``) — never a second copy of the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from ..config import Config, GateConfig, LossConfig
from ..config.schema import split_global_batch
from ..core.gate import gate_mask
from ..core.kl import prompt_kl
from ..core.loss import fork_gated_loss, stats_to_floats
from ..core.ops import masked_mean
from ..data.problem import Problem
from ..errors import ConfigError, DataError, TrainingDivergedError
from ..models.forward import policy_token_stats, prompt_logits
from ..stages.rollouts import RolloutReward
from ..stages.scoring import LazyScores, score_rollouts
from ..utils import distributed as dist
from ..utils.storage import atomic_write_json
from .compat import divide_loss_by_accumulation, seed_before_adapter_init
from .configs import ForkGatedConfig, fork_gated_kwargs
from .dataset import ForkCollator, fork_dataset, prepare_fork_dataset, rollouts_fingerprint
from .heldout_eval import HeldoutEval
from .model_card import base_model_hub_id, hub_repo_id, push_adapter, run_name, write_model_card

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"checkpoint-\d+")


def paper_loss_options(loss_cfg: LossConfig) -> dict[str, Any]:
    """The loss options beyond the variant, floor and margin, as keywords of fork_gated_loss."""
    return {"floored_forks": loss_cfg.floored_forks, "hinge_margin_neg": loss_cfg.hinge_margin_neg}


def gather_across_processes(accelerator: Any, local: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of varying length over all processes."""
    if accelerator.num_processes == 1:
        return local
    sentinel = -1e9  # entropies are >= 0, so the padding value cannot collide with data
    padded = accelerator.pad_across_processes(local, dim=0, pad_index=sentinel)
    gathered = accelerator.gather(padded)
    return gathered[gathered != sentinel]


class ForkGatedLoss:
    """The fork gate and loss of a training step, shared by the offline and the online trainer.

    A mixin for a TRL trainer (it uses ``self.state``, ``self.args.seed``,
    ``self.accelerator`` and ``self._metrics``); the trainer sets ``gate``, ``loss_cfg``
    and ``entropy_temperature`` before its own ``__init__``.
    """

    gate: GateConfig
    loss_cfg: LossConfig
    entropy_temperature: float
    # The loss is a per-micro-batch mean (normalised by its own fork and non-fork counts),
    # so the Trainer divides it by the accumulation steps. A class attribute, because TRL
    # reads it during __init__ to do the same on transformers < 5.19, which ignores it.
    loss_is_scaled_for_ga = False

    def _gate_generator(self) -> torch.Generator:
        """Seeded by (seed, process, step, micro-batch): a resumed run draws the same positions."""
        step = self.state.global_step
        if step != getattr(self, "_gate_step", None):
            self._gate_step, self._gate_micro = step, 0
        self._gate_micro += 1
        seed = hash((self.args.seed, self.accelerator.process_index, step, self._gate_micro)) % (2**63)
        return torch.Generator().manual_seed(seed)

    def _skip_nonfinite(self, model: Any, loss: torch.Tensor, stats: dict[str, Any], mode: str) -> torch.Tensor:
        """A NaN/inf loss: this micro-batch contributes a zero gradient, and it is logged.

        Too many in a row means training diverged: stop before the optimizer or a
        checkpoint sees a bad adapter.
        """
        self._nonfinite_in_a_row = getattr(self, "_nonfinite_in_a_row", 0) + 1
        step, limit = self.state.global_step, self.loss_cfg.max_nonfinite_in_a_row
        terms = ", ".join(f"{k} {stats[k]:.4g}" for k in ("fork_term", "kl_term") if k in stats)
        if self._nonfinite_in_a_row > limit:
            raise TrainingDivergedError(
                f"training: the loss was {loss.item()} ({terms}) in {self._nonfinite_in_a_row} micro-batch(es) in a "
                f"row at step {step} (loss.max_nonfinite_in_a_row: {limit}); no adapter was saved and the last "
                f"checkpoint is kept. Lower training.learning_rate, raise loss.neg_prob_floor, or train in float32"
            )
        logger.warning("step %d: the loss is %s (%s); this micro-batch is skipped (%d in a row, at most %d)",
                       step, loss.item(), terms, self._nonfinite_in_a_row, limit)
        self._metrics[mode]["nonfinite_skipped"].append(torch.ones((), device=loss.device))
        # Zero, but through every trainable weight, so backward (and DDP's all-reduce) runs as usual.
        # nan_to_num: a weight that is itself NaN still gives 0 (FiniteAdapterCheck reports it).
        return sum((p * 0.0).nan_to_num(0.0).sum() for p in model.parameters() if p.requires_grad)

    def gated_loss(self, model: Any, *, policy_logp: torch.Tensor, base_logp: torch.Tensor, kl: torch.Tensor,
                   gate_entropy: torch.Tensor, base_entropy: torch.Tensor, advantages: torch.Tensor,
                   completion_mask: torch.Tensor, **extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate, fork-gated loss and its metrics for one micro-batch.

        Args:
            policy_logp, kl: (B, C) with gradient; base_logp, base_entropy: (B, C) the base's;
            gate_entropy: (B, C) the entropy the gate reads (the base's or the policy's).
            advantages: (B,); completion_mask: (B, C).
            extra: more keywords of :func:`~reasonmaxxer.core.loss.fork_gated_loss` (prompt KL).

        Returns:
            The () loss (a zero through every trainable weight when it is not finite) and the
            (B, C) fork mask.
        """
        mode = "train" if self.model.training else "eval"
        # The quantile cut pools every process's completion tokens.
        forks = gate_mask(self.gate, gate_entropy, completion_mask,
                          gather=lambda t: gather_across_processes(self.accelerator, t),
                          generator=self._gate_generator() if self.gate.mode == "random" else None,
                          positive=advantages > 0)
        loss, stats = fork_gated_loss(
            policy_logp, base_logp, advantages, forks, completion_mask, kl,
            kl_coef=self.loss_cfg.kl_coef, variant=self.loss_cfg.variant,
            neg_prob_floor=self.loss_cfg.neg_prob_floor, hinge_margin=self.loss_cfg.hinge_margin,
            **paper_loss_options(self.loss_cfg), **extra,
        )
        # The one host sync of a micro-batch: a NaN/inf loss must not reach backward.
        if not torch.isfinite(loss):
            return self._skip_nonfinite(model, loss, stats_to_floats(stats), mode), forks
        self._nonfinite_in_a_row = 0
        with torch.no_grad():
            valid = completion_mask.bool()
            base_h = base_entropy.float()
            stats["base_entropy_forks"] = masked_mean(base_h, forks)
            stats["base_entropy_nonforks"] = masked_mean(base_h, valid & ~forks)
            stats["nonfinite_skipped"] = torch.zeros((), device=loss.device)
        stats.pop("loss")
        for key, value in stats.items():  # device tensors: read once per logged step, in log()
            self._metrics[mode][key].append(value)
        return loss, forks

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The trainer's log, after turning the step's metric tensors into floats with one device sync."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        tensors = {k: v for k, v in metrics.items() if v and isinstance(v[0], torch.Tensor)}
        if tensors:
            means = torch.stack([torch.stack([x.float().reshape(()) for x in v]).mean() for v in tensors.values()])
            for key, mean in zip(tensors, means.tolist()):
                metrics[key] = [mean]
        super().log(logs, start_time)


class NamedBaseModelCard:
    """A mixin for a TRL trainer whose ``checkpoints/`` card names the base model (``base_model_name``)."""

    base_model_name: str | None = None

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card for ``checkpoints/``, naming the base model and the hub repo.

        TRL reads the base from the model config's ``_name_or_path`` and drops it when that
        is a local folder (the embedded default is one), which renders "a fine-tuned
        version of [None]"; it names the base ``base_model_name`` instead while it writes.
        """
        config = self.accelerator.unwrap_model(self.model).config
        saved = config._name_or_path
        if self.base_model_name:
            config._name_or_path = self.base_model_name
        if self.hub_model_id is None:  # set by the Trainer only when it pushes, which it does not here
            self.hub_model_id = self.args.hub_model_id
        try:
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        finally:
            config._name_or_path = saved


def gathered_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model`` whole and on the CPU, keyed as ``named_parameters``.

    An FSDP2 parameter is a DTensor of which this process holds one shard; ``full_tensor``
    gathers it from every process, so every process must call this, in the same order.
    Only the trainable tensors travel (a LoRA adapter: megabytes), never the frozen base.
    """
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = param.detach()
            state[name] = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).cpu()
    return state


class FsdpAdapterSave:
    """A mixin for a Trainer of a PEFT model: ``check_launch`` once it is built; under FSDP2,
    ``save_model`` writes the whole adapter.

    transformers saves a model under FSDP only with ``FULL_STATE_DICT``, and then gathers
    every weight, the frozen base included, onto the first process (15 GB for a 7B base, at
    every checkpoint). With ``SHARDED_STATE_DICT`` it writes no adapter at all, neither in a
    checkpoint nor at the end. Under FSDP2 the adapter alone is gathered here and saved in
    PEFT format in both cases; each checkpoint still holds accelerate's state for resuming
    (``pytorch_model_fsdp_0/`` and ``optimizer_0/``, one file per process when sharded).
    """

    def check_launch(self) -> None:
        """Once the Trainer is built: say in one line when the launch asked for a strategy the trainer does
        not run, and refuse an FSDP setup under which no adapter could be saved."""
        if (mismatch := launch_mismatch(self.accelerator)) and self.accelerator.is_main_process:
            logger.warning("%s", mismatch)
        if problem := fsdp_save_problem(getattr(self.accelerator.state, "fsdp_plugin", None)):
            raise ConfigError(problem)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        import peft

        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        # FSDP1 saves through transformers, with a full state dict (check_launch refused the others).
        if not (fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2 and isinstance(self.model, peft.PeftModel)):
            return super().save_model(output_dir, _internal_call)
        state_dict = gathered_trainable_state_dict(self.model)
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


class ForkGatedTrainer(ForkGatedLoss, NamedBaseModelCard, FsdpAdapterSave, SFTTrainer):
    """TRL's SFTTrainer whose loss pushes gradient only through the base's forks, anchored by KL elsewhere.

    Trains a LoRA adapter (``peft_config``, or a ``PeftModel``) on rollouts you already
    have: ``train_dataset`` holds ``prompt`` and ``completion`` (text, or lists of chat
    messages, as TRL accepts them; or ``prompt_ids``/``completion_ids``) and a ``reward``
    (advantages are then taken within each prompt's completions) or an ``advantage``.
    Several completions per prompt, some right and some wrong, are what the loss contrasts.

    The base's entropy, log-probs and top-k at every completion token are read from the
    columns ``base_entropy``, ``base_logp``, ``topk_ids``, ``topk_logp`` when the dataset
    has them; otherwise the trainer computes them once, with the adapter disabled, into
    ``args.base_scores_dir`` (one folder per dataset and model, written shard by shard:
    a killed run resumes where it stopped, a second run reuses them).

    Args:
        model: a model id or folder, a ``PreTrainedModel``, or a ``PeftModel``.
        args: the :class:`~reasonmaxxer.ForkGatedConfig` (default: one in ``<model>-ForkGated``).
        train_dataset: a ``datasets.Dataset`` of rollouts, as above.
        eval_dataset: another, for ``trainer.evaluate()`` (the gated loss and its statistics).
        processing_class: the tokenizer (default: the model's).
        peft_config: the LoRA adapter to train (a ``peft.LoraConfig``), unless ``model`` has one.
        callbacks: as in ``transformers.Trainer``; a :class:`FiniteAdapterCheck` is added.
        optimizers: as in ``transformers.Trainer``.
        base_scores: the base scores keyed by the dataset's ``rollout_index`` column (the
            CLI passes its scoring stage's shards here).
        base_model_name: the base model's name in the checkpoints' model card.
    """

    _tag_names = ["trl", "reasonmaxxer", "fork-gated"]

    def __init__(
        self,
        model: Any,
        args: ForkGatedConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        *,
        base_scores: Mapping[int, dict[str, torch.Tensor]] | None = None,
        base_model_name: str | None = None,
    ):
        model_id = model if isinstance(model, str) else model.config._name_or_path
        if args is None:
            args = ForkGatedConfig(f"{model_id.rstrip('/').split('/')[-1]}-ForkGated")
        elif not isinstance(args, ForkGatedConfig):
            raise TypeError(f"args: expected a reasonmaxxer.ForkGatedConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise DataError("train_dataset: ForkGatedTrainer needs the rollouts to train on")
        self.gate, self.loss_cfg = args.gate_config, args.loss_config
        self.entropy_temperature = args.entropy_temperature
        self.base_model_name = base_model_name
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model_id)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        prepare = partial(prepare_fork_dataset, tokenizer=processing_class, advantage_clip=args.advantage_clip,
                          drop_uniform_groups=args.drop_uniform_groups,
                          needs_topk=self.loss_cfg.kl_anchor == "cached", keyed_scores=base_scores is not None)
        train_dataset = prepare(train_dataset, name="train_dataset")
        scored = "base_entropy" in train_dataset.column_names
        if eval_dataset is not None:
            eval_dataset = prepare(eval_dataset, name="eval_dataset")
            if ("base_entropy" in eval_dataset.column_names) != scored:
                raise DataError("eval_dataset: give the base score columns in both datasets or in neither")
            if base_scores is None and not scored:  # scored with the training rows: indices after theirs
                offset = len(train_dataset)
                eval_dataset = eval_dataset.map(lambda r: {"rollout_index": r["rollout_index"] + offset})
        seed_before_adapter_init(args.seed)
        super().__init__(
            model=model, args=args, data_collator=ForkCollator(processing_class.pad_token_id, base_scores),
            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
            peft_config=peft_config, callbacks=[FiniteAdapterCheck(), *(callbacks or [])], optimizers=optimizers,
        )
        divide_loss_by_accumulation(self)
        self.check_launch()
        if not hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter"):
            raise ConfigError("peft_config: ForkGatedTrainer trains a LoRA adapter (pass a peft.LoraConfig or a "
                              "PeftModel): the base it anchors to is the model with its adapter disabled")
        if base_scores is None and not scored:
            self.data_collator.scores = self.score_base(
                [train_dataset] + ([eval_dataset] if eval_dataset is not None else []))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """The Trainer's sampler, with ``group_by_length`` grouping whole optimizer steps.

        Transformers groups by one process's batch, so the rows of a step would depend on
        the number of processes. Grouped by the global batch (every process's micro-batches
        of one step), a step trains on the same rows on 1 or N processes: accelerate hands
        process r the micro-batches r, r + N, ... of the sampler's order.
        """
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            args = self.args
            sampler.batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return sampler

    def score_base(self, parts: list[datasets.Dataset]) -> LazyScores:
        """The base's scores of every row of ``parts`` (in order: rollout index), computed with the
        adapter disabled into ``args.base_scores_dir/<fingerprint>``, or read back from there.

        The fingerprint covers the rows' token ids, the model (name and dtype) and the
        scoring options, so a changed dataset or model never reads stale scores.
        """
        args: ForkGatedConfig = self.args
        model = self.accelerator.unwrap_model(self.model)
        top_k = args.anchor_top_k if self.loss_cfg.kl_anchor == "cached" else 0
        rows = datasets.concatenate_datasets([p.select_columns(["prompt_ids", "completion_ids"]) for p in parts])
        base = model.get_base_model()
        folder = Path(args.base_scores_dir or Path(args.output_dir) / "base_scores") / rollouts_fingerprint(
            rows, base.config._name_or_path, str(base.dtype), args.entropy_temperature, top_k,
            args.scoring_batch_size)
        rollouts = [{"prompt_ids": p, "completion_ids": c} for p, c in zip(rows["prompt_ids"], rows["completion_ids"])]
        was_training = model.training
        model.eval()
        whole: Any = contextlib.nullcontext()
        if dist.weights_on_first_process_only():  # a model the caller loaded: the others may hold zeros
            dist.broadcast_from_first_process([*base.parameters(), *base.buffers()])
        if any(hasattr(p, "ds_tensor") for p in model.parameters()):
            import deepspeed

            # ZeRO-3 loaded the weights partitioned over the processes: the base pass needs them whole.
            whole = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        try:
            with whole, model.disable_adapter():
                summary = score_rollouts(model, rollouts, folder, pad_id=self.processing_class.pad_token_id,
                                         batch_size=args.scoring_batch_size, top_k=top_k,
                                         chunk_size=args.scoring_chunk_size,
                                         entropy_temperature=args.entropy_temperature, progress=not args.disable_tqdm)
        finally:
            model.train(was_training)
        logger.info("base scores of %d rollouts in %s (%d read back from an earlier run)", summary["rollouts"],
                    folder, summary["resumed_rollouts"])
        return LazyScores(folder)

    def _prompt_kl(self, model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For ``loss.kl_on_prompt``: KL(base || policy) at the prompt positions, and their mask.

        The policy's prompt logits keep their graph; the base's come from the same weights
        with the adapter disabled (``loss.kl_anchor: exact``, checked by the config).

        Returns:
            ``prompt_kl`` (B, P - 1) and ``prompt_mask`` (B, P - 1), keyword arguments of
            :func:`~reasonmaxxer.core.loss.fork_gated_loss`.
        """
        policy_logits, mask = prompt_logits(model, inputs)
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            base_logits, _ = prompt_logits(model, inputs)
        return {"prompt_kl": prompt_kl(base_logits, policy_logits, mask), "prompt_mask": mask}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy_entropy = self.gate.entropy_source == "policy"
        # The LM head runs fused with the log-probs and the KL, chunk by chunk: no (B, C, V) logits.
        policy = policy_token_stats(model, self.accelerator.unwrap_model(model), inputs,
                                    kl_anchor=self.loss_cfg.kl_anchor,
                                    entropy_temperature=self.entropy_temperature if policy_entropy else None)
        loss, _ = self.gated_loss(
            model, policy_logp=policy.logp, base_logp=inputs["base_logp"], kl=policy.kl,
            gate_entropy=policy.entropy if policy_entropy else inputs["base_entropy"],
            base_entropy=inputs["base_entropy"], advantages=inputs["advantages"],
            completion_mask=inputs["completion_mask"],
            **(self._prompt_kl(model, inputs) if self.loss_cfg.kl_on_prompt else {}),
        )
        return (loss, {"policy_logp": policy.logp}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The gated loss is the evaluation: no logits or labels to return. Before 1.16, TRL
        # left this to transformers, which computes a loss only for a batch with labels.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class FiniteAdapterCheck(TrainerCallback):
    """Stop the run when an optimizer step left a NaN/inf in the adapter.

    Runs before the step's checkpoint is written, so no checkpoint or saved adapter ever
    holds a non-finite weight. Checking the LoRA weights costs one pass over a few MB.
    Every process checks what it holds (its shard under FSDP/ZeRO-3) and the verdicts are
    combined, so all processes stop together: one that stopped alone would leave the
    others waiting in the next step's collectives until the timeout.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # A sharded weight is checked on this process's shard: a DTensor's local part (FSDP2), ZeRO-3's
        # partition (its parameter itself is an empty placeholder between forward passes).
        local = [p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p) for _, p in params]
        finite = torch.stack([torch.isfinite(p).all() for p in local]).to(torch.uint8)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite.all()):  # one device sync, not one per weight
            bad = [name for (name, _), ok in zip(params, finite.tolist()) if not ok]
            grad_norm = next((h["grad_norm"] for h in reversed(state.log_history) if "grad_norm" in h), None)
            raise TrainingDivergedError(
                f"training: {len(bad)} adapter weight tensor(s) became NaN/inf at step {state.global_step} "
                f"(first: {bad[0]}; last logged grad_norm {grad_norm}); no adapter was saved and the last "
                f"checkpoint is kept. Lower training.learning_rate, set training.max_grad_norm, or train in float32"
            )
        return control


def _checkpoint_is_complete(path: Path) -> bool:
    """Whether the Trainer finished writing ``path``.

    The Trainer writes a checkpoint in place: weights, optimizer, RNG state, and
    ``trainer_state.json`` last. A kill in between leaves a folder that
    ``get_last_checkpoint`` would still pick, so a complete one is one whose state file
    parses and names the folder's own step, next to adapter weights.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    step = path.name.rsplit("-", 1)[-1]
    has_weights = any((path / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors"))
    return has_weights and str(state.get("global_step")) == step


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``folder``; torn ones (killed mid-save) are removed."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)),
                   key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)
    for path in found:
        if _checkpoint_is_complete(path):
            return str(path)
        logger.warning("removing %s: it was not finished (the run was killed while saving it)", path)
        shutil.rmtree(path, ignore_errors=True)  # every rank may get here at once
    return None


def build_trainer(
    cfg: Config,
    model: Any,
    tokenizer: Any,
    rollouts: list[dict[str, Any]],
    selection: list[dict[str, Any]],
    scores: Mapping[int, dict[str, torch.Tensor]],
    output_dir: Path,
    *,
    report_to: str = "none",
    entropy_temperature: float,
    progress: bool = True,
    heldout: list[Problem] | None = None,
) -> ForkGatedTrainer:
    """The CLI's ForkGatedTrainer: the public one, over the selected rollouts and the scoring
    stage's ``scores``, with a fresh LoRA adapter on ``model``.

    With ``cfg.eval.every_steps`` > 0 it also logs the held-out pass@1 of the policy on
    ``heldout`` (see :mod:`reasonmaxxer.training.heldout_eval`).
    """
    import peft

    args = ForkGatedConfig(
        output_dir=str(output_dir),
        report_to=report_to,
        run_name=run_name(cfg),
        seed=cfg.seed,
        # Every LoRA weight gets a gradient each step: DDP need not search for unused ones.
        **{"ddp_find_unused_parameters": False, "disable_tqdm": not progress,
           **split_global_batch(cfg.training, dist.world_size()),
           # The repo is the run's (the Trainer's default is its output folder's name, "checkpoints"), and
           # train_adapter pushes the adapter folder with its card, so the Trainer itself never pushes
           # (it would upload checkpoints/ at every save).
           "hub_model_id": hub_repo_id(cfg), "push_to_hub": False,
           # The Trainer counts the non-padding positions of every micro-batch after its forward and
           # backward (gathered over processes), logs them as num_input_tokens_seen and keeps the count
           # in each checkpoint's trainer_state.json: the trained tokens of compute.json.
           "include_num_input_tokens_seen": "non_padding"},
        **fork_gated_kwargs(cfg.gate, cfg.loss), entropy_temperature=entropy_temperature,
        anchor_top_k=cfg.scoring.top_k,
    )
    lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    if cfg.eval.every_steps > 0 and not heldout:
        raise ConfigError("eval.every_steps: there are no held-out problems to evaluate on; set data.num_heldout > 0 "
                          "or eval.every_steps: 0")
    model.train()
    trainer = ForkGatedTrainer(
        model, args, train_dataset=fork_dataset(selection, rollouts), processing_class=tokenizer, peft_config=lora,
        base_scores=scores,
        base_model_name=base_model_hub_id(cfg.model.name_or_path) or Path(cfg.model.name_or_path).name,
    )
    if cfg.eval.every_steps > 0:
        trainer.add_callback(HeldoutEval(trainer, heldout, cfg.data, cfg.rollout, every_steps=cfg.eval.every_steps,
                                         num_samples=cfg.eval.num_samples, seed=cfg.seed,
                                         reward=RolloutReward.from_config(cfg)))
    return trainer


def launch_mismatch(accelerator: Any) -> str | None:
    """The strategy the launch asked for (accelerate's environment) when the trainer does not run it.

    accelerate 1.16 turns ``ACCELERATE_USE_FSDP`` into FSDP only on GPUs and other
    accelerators: on CPU processes it runs DDP and says nothing, so the weights are
    replicated on every process rather than sharded. (``ACCELERATE_USE_DEEPSPEED`` does
    give DeepSpeed on CPU processes, over gloo.)
    """
    asked = [name for name, key in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(key, "false").lower() == "true"]
    runs = accelerator.distributed_type.value
    if not asked or runs in asked:
        return None
    return (f"the launch asked for {asked[0]} but the trainer runs {runs} over {accelerator.num_processes} "
            f"process(es): accelerate enables {asked[0]} only on GPUs and other accelerators, so every process "
            "holds the whole model")


def fsdp_save_problem(fsdp_plugin: Any) -> str | None:
    """Why no adapter could be saved under ``fsdp_plugin`` (accelerate's), or None.

    FSDP2 saves through ``FsdpAdapterSave`` with any state dict type. Under FSDP1 the
    Trainer saves a model only with ``FULL_STATE_DICT``; with a sharded or local one it
    writes no adapter, in checkpoints or at the end, and the run would lose its result.
    """
    if fsdp_plugin is None or fsdp_plugin.fsdp_version == 2:
        return None
    kind = str(fsdp_plugin.state_dict_type).rsplit(".", 1)[-1]
    if kind == "FULL_STATE_DICT":
        return None
    return (f"fsdp_state_dict_type: {kind} with fsdp_version 1 saves no adapter (transformers saves an FSDP1 model "
            "only as FULL_STATE_DICT); use fsdp_version: 2 as configs/accelerate/fsdp.yaml does, or FULL_STATE_DICT")


def describe_parallelism(trainer: Any) -> dict[str, Any]:
    """How the trained model was spread over the processes, as the run summary records it.

    ``strategy`` is accelerate's (``NO``, ``MULTI_CPU``/``MULTI_GPU`` for DDP, ``FSDP``,
    ``DEEPSPEED``), ``wrapper`` the class the model trained as (``DistributedDataParallel``,
    ``FSDP...`` for FSDP2, ``DeepSpeedEngine``), ``sharded`` how many trainable tensors each
    process holds only a shard of (DTensors under FSDP2, ZeRO-3's partitioned parameters):
    a launch that fell back to one process or to no sharding shows here.
    """
    accelerator = trainer.accelerator
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    sharded = sum(1 for p in trainable if hasattr(p, "to_local") or hasattr(p, "ds_tensor"))
    return {
        "strategy": accelerator.distributed_type.value,
        "processes": accelerator.num_processes,
        "wrapper": type(trainer.model_wrapped).__name__,
        "sharded": f"{sharded}/{len(trainable)}",
    }


def train_adapter(trainer: ForkGatedTrainer, run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Train, resuming from the last checkpoint in ``run_dir/checkpoints``; save the adapter.

    Writes ``adapter/`` (PEFT format, with its model card) and ``train_log.json`` (the
    Trainer's log history); with ``training.push_to_hub`` uploads the adapter folder.
    """
    resume = last_complete_checkpoint(run_dir / "checkpoints")
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run_dir / "adapter"))
    history = trainer.state.log_history
    pushed_to = None
    if trainer.is_world_process_zero():
        atomic_write_json(run_dir / "train_log.json", history)
        write_model_card(cfg, run_dir)  # replaces PEFT's placeholder README.md
        if cfg.training.get("push_to_hub"):
            pushed_to = push_adapter(cfg, run_dir)
    last = next((h for h in reversed(history) if "fork_fraction" in h), {})
    return {
        "examples": len(trainer.train_dataset),
        "steps": trainer.state.global_step,
        "resumed_from": resume.rsplit("-", 1)[-1] if resume else None,
        "train_loss": result.training_loss,
        "trained_tokens": int(trainer.state.num_input_tokens_seen),
        "parallel": {**describe_parallelism(trainer),
                     **({"mismatch": mismatch} if (mismatch := launch_mismatch(trainer.accelerator)) else {})},
        **({"pushed_to": pushed_to} if pushed_to else {}),
        **{k: last[k] for k in ("fork_fraction", "fork_term", "kl_term", "dlogp_pos_forks", "dlogp_neg_forks")
           if k in last},
    }
