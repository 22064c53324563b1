"""Reading a run configuration: YAML file, dotted command-line overrides, type checks.

Command-line overrides use dotted keys (``--gate.tau 1.8`` or ``--gate.tau=1.8``, the
form W&B sweep agents pass). Every mistake — unknown key, wrong type, out-of-range
value — raises :class:`~reasonmaxxer.errors.ConfigError` with one line that names the
key (and the closest valid key), before any work starts.

OmegaConf (torchtune's choice) would merge and override, but its structured configs
cannot check ``Literal`` choices, and its errors span several lines; the checks here are
small and keep the one-line messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .schema import SECTIONS, Config, TrainingMethod, grpo_arguments, training_defaults

# Set by the pipeline, never by the user.
_RESERVED_TRAINING_KEYS = {"output_dir", "report_to", "run_name", "seed", "remove_unused_columns", "dataset_kwargs"}
# Set by ReasonMaxxer for the GRPO trainers: the run's folder, tracking and seed, and the dataset's
# columns (the reward reads answer/kind/problem_id). TRL's vLLM keys (use_vllm, vllm_mode, ...) pass through.
_RESERVED_GRPO_KEYS = _RESERVED_TRAINING_KEYS
# GRPO-loss settings that method online does not use (its loss is the loss/gate sections').
_GRPO_LOSS_KEYS = ("beta", "loss_type", "epsilon", "epsilon_high", "delta", "top_entropy_quantile", "scale_rewards",
                   "importance_sampling_level", "entropy_coef", "use_adaptive_entropy", "off_policy_mask_threshold",
                   "multi_objective_aggregation", "reward_weights")
# The Trainer's own evaluation needs an eval_dataset, which the pipeline has no use for:
# these keys would fail only after rollouts and scoring. The value each may keep (off).
_TRAINER_EVAL_KEYS: dict[str, Any] = {"eval_strategy": "no", "eval_steps": None, "do_eval": False,
                                      "eval_on_start": False, "per_device_eval_batch_size": None}


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
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
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
    elif origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if isinstance(value, dict):
            return {_coerce(f"{key}", k, key_tp): _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
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


def _is_off(key: str, value: Any) -> bool:
    """Whether a Trainer evaluation key keeps evaluation off (YAML reads a bare `no` as false)."""
    off = _TRAINER_EVAL_KEYS[key]
    return value == off or (key == "eval_strategy" and value is False)


def _validate_training(values: Any, model: Any = None) -> dict[str, Any]:
    """Check the pass-through training arguments against TRL's SFTConfig fields.

    ``model`` is the raw ``model`` section: its dtype and device decide ``bf16``'s default.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"training: expected a mapping of keys, got {values!r}")
    from trl import SFTConfig  # deferred: importing TRL takes seconds

    fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    for key, value in values.items():
        if key in _RESERVED_TRAINING_KEYS:
            raise ConfigError(f"training.{key}: set by ReasonMaxxer; use output_dir/seed/tracking instead")
        if key in _TRAINER_EVAL_KEYS and not _is_off(key, value):
            raise ConfigError(
                f"training.{key}: {value!r} asks for the Trainer's evaluation, which has no eval dataset here; "
                "use eval.every_steps: N (held-out pass@1 every N steps, logged as eval/pass_at_1) instead"
            )
        if key == "eval_strategy":
            values = {**values, key: "no"}  # a bare YAML `no` reads as false
        if key not in fields:
            raise ConfigError(f"training.{key}: unknown key (not an SFTConfig field){_closest(str(key), fields)}")
        checked = _check_scalar_type(f"training.{key}", value, fields[key].default)
        if checked is not value:
            values = {**values, key: checked}
    merged = {**training_defaults(*_model_precision(model)), **values}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SFTConfig(output_dir="/nonexistent-validation-only", report_to="none", **merged)
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"training: {first}") from None
    return merged


def _model_precision(model: Any) -> tuple[str, str]:
    """(dtype, device) of a raw ``model`` section, with the schema's defaults."""
    model = model if isinstance(model, dict) else {}
    dtype, device = model.get("dtype", "auto"), model.get("device", "auto")
    return (dtype if isinstance(dtype, str) else "auto", device if isinstance(device, str) else "auto")


def _check_scalar_type(key: str, value: Any, default: Any) -> Any:
    """TrainingArguments does not check types: check those fields with a scalar default (ints widened to float)."""
    if isinstance(default, bool):
        _coerce(key, value, bool)
    elif isinstance(default, int):
        _coerce(key, value, int)
    elif isinstance(default, float):
        return _coerce(key, value, float)
    return value


def _validate_grpo_keys(values: Any) -> dict[str, Any]:
    """Check the ``grpo`` section's keys and scalar types against TRL's GRPOConfig fields."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"grpo: expected a mapping of keys, got {values!r}")
    from trl import GRPOConfig  # deferred: importing TRL takes seconds

    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    out = dict(values)
    for key, value in values.items():
        if key in _RESERVED_GRPO_KEYS:
            raise ConfigError(f"grpo.{key}: set by ReasonMaxxer; use output_dir/seed/tracking instead")
        if key in _TRAINER_EVAL_KEYS and not _is_off(key, value):
            raise ConfigError(f"grpo.{key}: {value!r} asks for the Trainer's evaluation, which has no eval dataset "
                              "here; use eval.every_steps: N instead")
        if key not in fields:
            raise ConfigError(f"grpo.{key}: unknown key (not a GRPOConfig field){_closest(str(key), fields)}")
        out[key] = "no" if key == "eval_strategy" else _check_scalar_type(f"grpo.{key}", value, fields[key].default)
    return out


def _validate_grpo_config(cfg: Config) -> None:
    """Method grpo/online: the resolved GRPOConfig must build, and its batches must hold whole groups."""
    if cfg.method == "offline":
        if cfg.grpo:
            raise ConfigError(f"grpo.{next(iter(cfg.grpo))}: the grpo section applies to method grpo or online; "
                              "method is 'offline'")
        return
    if cfg.method == "online":
        unused = [k for k in _GRPO_LOSS_KEYS if k in cfg.grpo]
        if unused:
            raise ConfigError(f"grpo.{unused[0]}: GRPO's loss setting has no effect with method online (its loss is "
                              "the loss and gate sections'); remove it, or use method grpo")
    from trl import GRPOConfig

    # The global batch as the config writes it (one process's view): each process then takes its share, and
    # TRL asks the whole generation batch, over all processes, to hold whole groups.
    args = grpo_arguments(cfg, world_size=1)
    per_device = int(args.get("per_device_train_batch_size", 8))
    steps = args.get("steps_per_generation") or args.get("gradient_accumulation_steps", 1)
    generation_batch = args.get("generation_batch_size") or per_device * steps
    groups = int(args["num_generations"])
    if generation_batch % groups:
        raise ConfigError(
            f"grpo.num_generations: each generation batch ({generation_batch} completions over all processes: "
            f"per_device_train_batch_size {per_device} x steps_per_generation {steps}, or "
            f"grpo.generation_batch_size) must hold whole groups of num_generations ({groups}, default "
            "rollout.num_samples); make the batch a multiple of it"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            GRPOConfig(output_dir="/nonexistent-validation-only", report_to="none", **args)
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"grpo: {first}") from None


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
            kwargs[key] = (_validate_training(value, raw.get("model")) if check_training
                           else {**training_defaults(*_model_precision(raw.get("model"))), **(value or {})})
        elif key == "grpo":
            kwargs[key] = _validate_grpo_keys(value) if check_training else dict(value or {})
        elif key in ("output_dir", "seed", "method"):
            kwargs[key] = _coerce(key, value, {"output_dir": str, "seed": int, "method": TrainingMethod}[key])
        else:
            cls = typing.get_type_hints(Config)[key]
            kwargs[key] = _build_section(key, cls, value)
    cfg = Config(**kwargs)
    if check_training and "training" not in raw:
        cfg.training = _validate_training({}, raw.get("model"))
    cfg.validate()
    if check_training:
        _validate_grpo_config(cfg)
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
