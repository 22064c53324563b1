"""The config reference that ``--help`` prints, generated from the schema's dataclasses.

Every field's type, default and help text come from :mod:`.schema`, so the reference
cannot drift from what :func:`~reasonmaxxer.config.load_config` accepts. Defaults are
written as JSON, which is also valid YAML and a valid ``--section.key VALUE`` value.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from typing import Any

from .loading import _RESERVED_GRPO_KEYS, _RESERVED_TRAINING_KEYS, _type_name
from .schema import TRAINING_DEFAULTS, Config

_HELP_INDENT = " " * 6
_WIDTH = 100


def describe_type(tp: Any) -> str:
    """``_type_name`` with lists in the plural ("a list of strings")."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        item = _type_name(typing.get_args(tp)[0])
        return "a list of " + (item.split(" ", 1)[1] + "s" if item.startswith(("a ", "an ")) else item)
    return _type_name(tp)


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory called when it has one)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def format_default(value: Any) -> str:
    """A default as the JSON text one would type in YAML or after ``--section.key``."""
    return json.dumps(value)


def _field_entry(key: str, type_name: str, default: Any, help_text: str) -> list[str]:
    head = f"  --{key}  ({type_name}; default: {format_default(default)})"
    body = textwrap.wrap(help_text, width=_WIDTH, initial_indent=_HELP_INDENT, subsequent_indent=_HELP_INDENT)
    return [head, *body]


def _section_entries(name: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"{name}:"]
    for f in dataclasses.fields(cls):
        lines += _field_entry(f"{name}.{f.name}", describe_type(hints[f.name]), field_default(f), f.metadata["help"])
    return lines


def _training_entries() -> list[str]:
    reserved = ", ".join(sorted(_RESERVED_TRAINING_KEYS))
    intro = (
        "Any field of TRL's SFTConfig (transformers TrainingArguments included), passed through to the trainer, "
        "e.g. --training.learning_rate 1e-4. Set by ReasonMaxxer and refused here: "
        f"{reserved}. hub_model_id defaults to the run's name (tracking.run_name or the output folder's name). "
        "ReasonMaxxer's defaults:"
    )
    lines = ["training:", *textwrap.wrap(intro, width=_WIDTH, initial_indent="  ", subsequent_indent="  ")]
    for key, value in TRAINING_DEFAULTS.items():
        lines.append(f"  --training.{key}  (default: {format_default(value)})")
    lines.append("  --training.bf16  (default: true on a GPU that supports bfloat16, else false)")
    lines.append("  --training.use_cpu  (default: true when no GPU is visible, else false)")
    return lines


def _grpo_entries() -> list[str]:
    reserved = ", ".join(sorted(_RESERVED_GRPO_KEYS))
    intro = (
        "With method grpo or online: any field of TRL's GRPOConfig, passed through, e.g. "
        "--grpo.top_entropy_quantile 0.2 (TRL's 80/20 arm) or --grpo.beta 0.04. Defaults: the training section's "
        "values, then num_generations = rollout.num_samples, temperature and top_p = rollout's, "
        "max_completion_length = rollout.max_new_tokens; everything else is TRL's. Set by ReasonMaxxer and "
        f"refused here: {reserved}."
    )
    return ["grpo:", *textwrap.wrap(intro, width=_WIDTH, initial_indent="  ", subsequent_indent="  ")]


def config_reference() -> str:
    """Every config key by section, with its type, default and help text (``--help``'s epilog)."""
    hints = typing.get_type_hints(Config)
    top, sections = [], []
    for f in dataclasses.fields(Config):
        if f.name == "training":
            sections.append(_training_entries())
        elif f.name == "grpo":
            sections.append(_grpo_entries())
        elif dataclasses.is_dataclass(hints[f.name]):
            sections.append(_section_entries(f.name, hints[f.name]))
        else:
            top += _field_entry(f.name, describe_type(hints[f.name]), field_default(f), f.metadata["help"])
    blocks = [
        textwrap.fill("config keys: set them in the YAML file (section: {key: value}) or override them on the "
                      "command line as --section.key VALUE (values are read as YAML).", width=_WIDTH),
        "\n".join(["top level:", *top]),
        *("\n".join(lines) for lines in sections),
    ]
    return "\n\n".join(blocks)
