"""train.py/eval.py options of their own: --help's config reference and --print_config."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from reasonmaxxer.cli import eval_main, train_main
from reasonmaxxer.config import TRAINING_DEFAULTS, Config, load_config


def _help_text(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _schema_fields() -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) for every config key except the training and grpo pass-throughs."""
    hints = typing.get_type_hints(Config)
    out = []
    for f in dataclasses.fields(Config):
        if f.name in ("training", "grpo"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += [(f"{f.name}.{sub.name}", sub) for sub in dataclasses.fields(hints[f.name])]
        else:
            out.append((f.name, f))
    return out


def _default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _entry(help_text: str, key: str) -> tuple[str, list[str]]:
    """The ``--key (...)`` line of the reference and the help lines under it."""
    lines = help_text.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.startswith(f"  --{key}  (")]
    body = []
    for line in lines[i + 1:]:
        if not line.startswith("      "):
            break
        body.append(line.strip())
    return lines[i], body


@pytest.mark.parametrize("main", [train_main, eval_main], ids=["train", "eval"])
def test_help_lists_every_config_key_with_its_default_and_help(main, capsys):
    text = _help_text(main, capsys)
    fields = _schema_fields()
    assert len(fields) > 50
    for key, f in fields:
        head, body = _entry(text, key)
        default_text = head.rsplit("default: ", 1)[1][:-1]
        # The printed default, read the way a YAML file or an override is read, is the schema's default.
        assert yaml.safe_load(default_text) == _default_of(f), key
        assert " ".join(body) == " ".join(f.metadata["help"].split()), key
    section_order = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and
                     line.endswith(":") and line[:-1] in {f.name for f in dataclasses.fields(Config)}]
    assert section_order == [f.name for f in dataclasses.fields(Config) if f.name not in ("output_dir", "seed", "method")]
    for key, value in TRAINING_DEFAULTS.items():
        line = next(line for line in text.splitlines() if line.startswith(f"  --training.{key}  ("))
        assert yaml.safe_load(line.rsplit("default: ", 1)[1][:-1]) == value
    assert "SFTConfig" in text


def test_print_config_round_trips_and_runs_nothing(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "gate": {"mode": "topk", "k": 3},
                                      "data": {"kinds": ["add", "word"]}, "training": {"max_steps": 7}}))
    overrides = ["--gate.tau", "1.8", "--training.learning_rate", "1e-4", "--tracking.tags", "[a, b]"]
    assert train_main(["--config", str(config), *overrides, "--print_config"]) == 0
    printed = capsys.readouterr().out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    expected = load_config(config, overrides)
    assert load_config(resolved) == expected
    raw = yaml.safe_load(printed)
    assert raw["gate"]["tau"] == 1.8 and raw["training"]["max_steps"] == 7
    assert raw["training"]["save_steps"] == TRAINING_DEFAULTS["save_steps"]  # the defaults are spelled out
    assert not (tmp_path / "run").exists()  # nothing ran

    assert eval_main(["--config", str(config), "--run_dir", str(tmp_path / "other"), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(tmp_path / "other")


@pytest.mark.parametrize("main", [train_main, eval_main], ids=["train", "eval"])
def test_print_config_with_a_bad_override_is_one_line(main, capsys):
    assert main(["--print_config", "--gate.tua", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["error: gate.tua: unknown key (did you mean 'tau'?)"]
