"""Config loading and the errors a user meets: one line naming the key, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reasonmaxxer.cli import train_main
from reasonmaxxer.config.loading import load_config, parse_overrides
from reasonmaxxer.config.schema import Config
from reasonmaxxer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_matches_the_pilot():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.gate.mode == "threshold" and cfg.gate.tau == 2.2 and cfg.entropy_temperature == 1.0
    assert cfg.training["learning_rate"] == 2e-4 and cfg.training["max_steps"] == 40
    assert cfg.training["use_cpu"] is True  # no GPU in tests
    # bf16 mixed precision follows the model's dtype as it resolves here (auto: bf16 on a CPU with native bf16)
    from reasonmaxxer.models.loading import cpu_supports_bf16

    assert cfg.training["bf16"] is cpu_supports_bf16()
    assert load_config(ROOT / "configs" / "demo.yaml", ["--model.dtype", "float32"]).training["bf16"] is False
    assert load_config(ROOT / "configs" / "demo.yaml", ["--model.dtype", "bfloat16"]).training["bf16"] is True
    assert load_config(ROOT / "configs" / "demo.yaml", ["--model.dtype", "float32",
                                                        "--training.bf16", "true"]).training["bf16"] is True


def test_cli_overrides_take_both_forms_and_beat_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"gate": {"tau": 1.0, "mode": "threshold"}, "lora": {"r": 4}}))
    cfg = load_config(path, ["--gate.tau=1.8", "--lora.r", "8", "--tracking.tags", "[a, b]",
                             "--training.learning_rate", "1e-4"])
    assert cfg.gate.tau == 1.8 and cfg.lora.r == 8 and cfg.tracking.tags == ["a", "b"]
    assert cfg.training["learning_rate"] == 1e-4  # YAML 1.1 reads 1e-4 as a string; accepted as a number
    assert cfg.gate.mode == "threshold"


def test_int_widens_to_float_but_not_the_reverse():
    assert load_config(None, ["--gate.tau", "2"]).gate.tau == 2.0
    with pytest.raises(ConfigError, match=r"^rollout.num_samples: expected an integer, got 2.5$"):
        load_config(None, ["--rollout.num_samples", "2.5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--gate.tua", "1"], "gate.tua: unknown key (did you mean 'tau'?)"),
        (["--gaet.tau", "1"], "gaet: unknown section or key (did you mean 'gate'?)"),
        (["--gate.tau", "-0.5"], "gate.tau: must be >= 0, got -0.5"),
        (["--gate.quantile", "0"], "gate.quantile: must be in (0, 1], got 0.0"),
        (["--gate.quantile", "1.5"], "gate.quantile: must be in (0, 1], got 1.5"),
        (["--gate.k", "0"], "gate.k: must be >= 1, got 0"),
        (["--gate.mode", "thresh"], "gate.mode: 'thresh' is not one of 'threshold', 'quantile', 'topk', 'all', 'random' "
                                    "(did you mean 'threshold'?)"),
        (["--rollout.num_samples", "x"], "rollout.num_samples: expected an integer, got 'x'"),
        (["--rollout.num_samples", "1"], "rollout.num_samples: must be >= 2 (advantages need a group), got 1"),
        (["--rollout.top_p", "0"], "rollout.top_p: must be in (0, 1], got 0.0"),
        (["--loss.variant", "signd"], "loss.variant: 'signd' is not one of"),
        (["--loss.kl_coef", "-1"], "loss.kl_coef: must be >= 0, got -1.0"),
        (["--model.trust_remote_code", "yes please"], "model.trust_remote_code: expected true/false"),
        (["--training.learnin_rate", "1"], "training.learnin_rate: unknown key (not an SFTConfig field) "
                                           "(did you mean 'learning_rate'?)"),
        (["--training.learning_rate", "abc"], "training.learning_rate: expected a number, got 'abc'"),
        (["--training.output_dir", "x"], "training.output_dir: set by ReasonMaxxer"),
        (["--training.eval_strategy", "steps"], "training.eval_strategy: 'steps' asks for the Trainer's evaluation"),
        (["--training.eval_steps", "5"], "training.eval_steps: 5 asks for the Trainer's evaluation"),
        (["--training.do_eval", "true"], "training.do_eval: True asks for the Trainer's evaluation"),
        (["--eval.every_steps", "-1"], "eval.every_steps: must be >= 0, got -1"),
        (["--eval.during_training_problems", "0"], "eval.during_training_problems: must be >= 1, got 0"),
        (["--eval.every_steps", "2", "--data.num_heldout", "0"],
         "data.num_heldout: must be >= 1 with eval.every_steps > 0, got 0"),
        (["--data.kinds", "[add, div]"], "data.kinds: must be among"),
        (["--data.source", "file"], "data.path: is required with data.source: file"),
        (["--data.prompt_template", "no placeholder"], "data.prompt_template: must contain '{question}'"),
        (["--scoring.top_k", "0"], "scoring.top_k: must be >= 1 with loss.kl_anchor: cached"),
        (["--data.prompt_format", "chatml"], "data.prompt_format: 'chatml' is not one of 'auto', 'chat', 'plain'"),
        (["--data.prompt_preset", "boxd"], "data.prompt_preset: 'boxd' is not one of 'answer_line', 'boxed' "
                                           "(did you mean 'boxed'?)"),
        (["--reward.function", "my_rewards.score"], "reward.function: must be 'module:callable'"),
        (["--reward.function", "m:f", "--reward.answer_format", "boxed"],
         "reward.answer_format: applies to the built-in verifier only"),
        (["--reward.answer_format", "box"], "reward.answer_format: 'box' is not one of 'auto', 'any', 'boxed'"),
        (["--data.source", "file", "--data.path", "x.jsonl", "--data.heldout_split", "test"],
         "data.heldout_split: applies to data.source: hf"),
        (["--data.source", "file", "--data.path", "x.jsonl", "--data.data_files", "x.jsonl"],
         "data.data_files: applies to data.source: hf"),
        (["--data.source", "hf", "--data.name", "json", "--data.heldout_split", "test",
          "--data.heldout_path", "h.jsonl"], "data.heldout_path: cannot be set together with data.heldout_split"),
        (["--data.source", "hf", "--data.name", "json", "--data.heldout_split", "train"],
         "data.heldout_split: must differ from data.split"),
        (["--data.heldout_path", "no/such/heldout.jsonl"], "data.heldout_path: 'no/such/heldout.jsonl' is not a file"),
        (["--data.data_files", "{train: [1]}"], "data.data_files: expected a string or a list of a string or a mapping"),
        (["--data.shuffle", "sometimes"], "data.shuffle: expected true/false"),
        (["gate.tau", "1"], "command line: expected --section.key value"),
        (["--gate.tau"], "--gate.tau: missing value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_trainer_evaluation_is_refused_before_any_work_and_points_to_eval_every_steps(tiny_model_dir, tmp_path,
                                                                                       capsys):
    from reasonmaxxer.testing import tiny_run_args

    run = tmp_path / "run"
    assert train_main(tiny_run_args(tiny_model_dir, run, "--training.eval_strategy", "steps")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: training.eval_strategy: 'steps'")
    assert "use eval.every_steps: N" in err
    assert not (run / "rollouts.jsonl").exists()


def test_trainer_evaluation_off_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  eval_strategy: no\n  do_eval: false\n")  # a bare `no` is YAML false
    assert load_config(path).training["eval_strategy"] == "no"
    assert load_config(None, ["--eval.every_steps", "4"]).eval.every_steps == 4


def test_exact_anchor_allows_no_top_k():
    cfg = load_config(None, ["--scoring.top_k", "0", "--loss.kl_anchor", "exact"])
    assert cfg.scoring.top_k == 0


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("gate:\n  tau: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml' line \d+"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    section = tmp_path / "section.yaml"
    section.write_text("gate: 3\n")
    with pytest.raises(ConfigError, match="gate: expected a mapping"):
        load_config(section)


def test_parse_overrides_nests_and_parses_yaml_scalars():
    assert parse_overrides(["--a.b=1", "--a.c", "true", "--d", "x y"]) == {"a": {"b": 1, "c": True}, "d": "x y"}


def test_cli_prints_one_line_and_exits_2(capsys):
    code = train_main(["--gate.tua", "1.8"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "error: gate.tua: unknown key (did you mean 'tau'?)\n"


def test_cli_in_a_real_process_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate:\n  mode: quantile\n  quantile: 2.0\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: gate.quantile: must be in (0, 1], got 2.0"
    assert not (tmp_path / "runs").exists()  # stopped before any work


def test_prompt_preset_reward_and_data_options_resolve():
    cfg = load_config(None, [])
    assert cfg.data.prompt_template is None and cfg.answer_format == "any" and cfg.reward.function is None
    assert cfg.data.user_template().endswith("'Answer: <number>'.")
    boxed = load_config(None, ["--data.prompt_preset", "boxed"])
    assert boxed.data.user_template() == (
        "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert boxed.answer_format == "boxed"
    own = load_config(None, ["--data.prompt_preset", "boxed", "--data.prompt_template", "Q {question}"])
    assert own.data.user_template() == "Q {question}" and own.answer_format == "boxed"
    assert load_config(None, ["--data.prompt_preset", "boxed", "--reward.answer_format", "any"]).answer_format == "any"
    files = load_config(None, ["--data.source", "hf", "--data.name", "json",
                               "--data.data_files", "{train: [a.jsonl, b.jsonl], test: c.jsonl}"]).data.data_files
    assert files == {"train": ["a.jsonl", "b.jsonl"], "test": "c.jsonl"}


# --------------------------------------------------------------------------- the paper's presets

PAPER = {  # the paper's recipe, as its text states it (not read from the presets)
    "rollout": {"num_samples": 20, "temperature": 0.6, "top_p": 0.95},
    "scoring": {"entropy_temperature": 1.0},
    "selection": {"trim_longest": 0.2, "advantages_over": "kept", "advantage_clip": 2.5},
    "gate": {"mode": "threshold", "tau": 1.4},
    "loss": {"variant": "signed", "kl_coef": 0.2, "neg_prob_floor": 0.0, "floored_forks": "anchor",
             "kl_anchor": "exact", "kl_on_prompt": True},
    "lora": {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "data": {"num_train": 300, "prompt_preset": "boxed"},
}


@pytest.mark.parametrize("name", ["qwen2.5-1.5b", "qwen2.5-math-7b"])
def test_paper_presets_load_with_a_tiny_model_and_match_the_recipe(name, tiny_model_dir):
    cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml",
                      ["--model.name_or_path", str(tiny_model_dir), "--data.source", "builtin"])
    for section, values in PAPER.items():
        for key, want in values.items():
            assert getattr(getattr(cfg, section), key) == want, f"{section}.{key}"
    assert cfg.gate.effective()["tau"] == 1.4 and cfg.entropy_temperature == 1.0
    assert cfg.answer_format == "boxed"
    # The paper's 8192, where the model's 4096 positions (Qwen2.5-Math-7B) leave room (tests/test_limits.py).
    assert cfg.rollout.max_new_tokens == {"qwen2.5-1.5b": 8192, "qwen2.5-math-7b": 3584}[name]
    t = cfg.training
    assert (t["learning_rate"], t["warmup_steps"], t["max_steps"]) == (1e-4, 50, 149)
    assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"], t["bf16"]) == (1, 8, True)


def test_kl_on_prompt_needs_the_exact_anchor():
    with pytest.raises(ConfigError, match=r"^loss.kl_on_prompt: needs loss.kl_anchor: exact"):
        load_config(None, ["--loss.kl_on_prompt", "true", "--loss.kl_anchor", "cached"])
    assert load_config(None, ["--loss.kl_on_prompt", "true", "--loss.kl_anchor", "exact"]).loss.kl_on_prompt


@pytest.mark.parametrize("key, value, message", [
    ("gate.tau_pos", "-1", "gate.tau_pos: must be >= 0, got -1.0"),
    ("gate.tau_neg", "-0.5", "gate.tau_neg: must be >= 0, got -0.5"),
    ("loss.hinge_margin_neg", "-1", "loss.hinge_margin_neg: must be >= 0, got -1.0"),
    ("loss.floored_forks", "keep", "loss.floored_forks: 'keep' is not one of"),
    ("selection.advantages_over", "some", "selection.advantages_over: 'some' is not one of"),
    ("loss.variant", "sft", "loss.variant: 'sft' is not one of"),
])
def test_paper_options_out_of_range_are_one_line(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"--{key}", value])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_entropy_is_measured_at_temperature_one_by_default():
    cfg = load_config(None, [])
    assert cfg.scoring.entropy_temperature == 1.0 and cfg.entropy_temperature == 1.0
    assert cfg.rollout.temperature == 0.6
    # null: the rollout temperature, as before
    assert load_config(None, ["--scoring.entropy_temperature", "null"]).entropy_temperature == 0.6


def test_tau_pos_and_tau_neg_join_the_gate_fingerprint_only_when_set():
    assert "tau_pos" not in load_config(None, []).gate.effective()
    eff = load_config(None, ["--gate.tau_pos", "1.2"]).gate.effective()
    assert eff["tau_pos"] == 1.2 and "tau_neg" not in eff


@pytest.mark.parametrize(("per_device", "accumulation", "world", "split"), [
    (8, 1, 1, (8, 1)), (8, 1, 2, (4, 1)), (1, 8, 8, (1, 1)), (1, 8, 2, (1, 4)), (2, 4, 2, (2, 2)),
    (4, 3, 2, (3, 2)), (6, 1, 4, None), (8, 2, 16, (1, 1)),
])
def test_the_global_batch_is_the_configs_on_any_number_of_processes(per_device, accumulation, world, split):
    """Brute force: every (micro, accumulation) with micro x accumulation x world = the config's product;
    the one chosen has the largest micro-batch within the config's, and nothing else changes."""
    from reasonmaxxer.config.schema import split_global_batch

    training = {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                "learning_rate": 1e-4}
    total = per_device * accumulation
    options = [(m, a) for m in range(1, per_device + 1) for a in range(1, total + 1) if m * a * world == total]
    if split is None:
        assert not options
        with pytest.raises(ConfigError, match=f"the global batch {total} .* does not split over {world} processes"):
            split_global_batch(training, world)
        return
    got = split_global_batch(training, world)
    assert (got["per_device_train_batch_size"], got["gradient_accumulation_steps"]) == split == max(options)
    assert got["learning_rate"] == 1e-4


def test_run_header_prints_the_split_and_a_lone_process_of_an_accelerate_launch(monkeypatch, capsys):
    from reasonmaxxer.cli import _print_header

    cfg = load_config(None, ["--training.per_device_train_batch_size", "8"])
    _print_header(cfg)
    assert "1 process, global batch 8 = 1 process x 8 per device x 1 accumulation" in capsys.readouterr().out
    # What `accelerate launch --num_processes 2 --cpu` with the FSDP config leaves in the environment.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    _print_header(cfg)
    err = capsys.readouterr().err
    assert "accelerate launch asked for several processes but started 1" in err and len(err.splitlines()) == 1
