"""Method grpo through train.py: TRL's GRPOTrainer with LoRA, its config section, compute.json."""

from __future__ import annotations

import json

import pytest

from reasonmaxxer.cli import train_main
from reasonmaxxer.config.loading import load_config
from reasonmaxxer.data.problem import read_split
from reasonmaxxer.models.loading import load_model, load_tokenizer
from reasonmaxxer.stages.sampling import prompt_ids
from reasonmaxxer.testing import tiny_run_args
from reasonmaxxer.training.grpo import build_grpo_trainer, grpo_dataset
from reasonmaxxer.utils.flops import model_flops

GENERATED: list[tuple[str, int]] = []


def recording_reward(prompts, completions, completion_ids, problem_id, **kwargs):
    """Records (problem, completion length) of every sample TRL generated; mixed rewards."""
    GENERATED.extend((p, len(c)) for p, c in zip(problem_id, completion_ids))
    return [float(c[0] % 2) if c else 0.0 for c in completion_ids]


def _grpo_args(model_dir, run_dir, *extra):
    return tiny_run_args(model_dir, run_dir, "--method", "grpo", "--rollout.max_new_tokens", "8",
                         "--training.max_steps", "2", "--training.save_steps", "1",
                         "--grpo.gradient_checkpointing", "false", *extra)


def test_grpo_runs_end_to_end_and_counts_its_compute(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    GENERATED.clear()
    args = _grpo_args(tiny_model_dir, run, "--reward.function", "test_grpo:recording_reward",
                      "--grpo.top_entropy_quantile", "0.2")
    assert train_main(args) == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert not (run / "rollouts.jsonl").exists()  # no rollout/scoring/selection stages
    record = json.loads((run / "compute.json").read_text())
    assert set(record) == {"n_params", "checkpoints", "total"}
    n_params = sum(p.numel() for p in load_model(str(tiny_model_dir), dtype="float32", device="cpu").parameters())
    assert record["n_params"] == n_params
    assert [c["step"] for c in record["checkpoints"]] == [1, 2]

    # By hand: each sample's prompt (the offline rollouts' token ids) plus its completion, once
    # generated (forward) and once trained; beta 0 and no accumulation: no reference or old pass.
    cfg = load_config(None, args[1:])  # drop --no-progress
    tokenizer = load_tokenizer(str(tiny_model_dir))
    problems = {p.id: p for p in read_split(run / "problems.jsonl", "train")}
    tokens = sum(len(prompt_ids(tokenizer, problems[pid], cfg.data, "chat")) + n for pid, n in GENERATED)
    assert len(GENERATED) == 2 * 4  # 2 steps x per_device_train_batch_size 4
    total = record["total"]
    assert total["forward_tokens"] == tokens and total["trained_tokens"] == tokens
    assert total["flops"] == model_flops(n_params, forward_tokens=tokens, trained_tokens=tokens)
    assert record["checkpoints"][-1]["forward_tokens"] == tokens
    assert 0 < record["checkpoints"][0]["forward_tokens"] < tokens
    assert 0 < record["checkpoints"][0]["wall_seconds"] <= total["wall_seconds"]
    log = json.loads((run / "train_log.json").read_text())
    assert log[-1]["compute/forward_tokens"] == tokens and "compute/flops" in log[0]


def test_grpo_section_reaches_grpo_config(tiny_model_dir, tmp_path):
    cfg = load_config(None, ["--method", "grpo", "--model.name_or_path", str(tiny_model_dir),
                             "--output_dir", str(tmp_path), "--rollout.num_samples", "4", "--rollout.top_p", "0.9",
                             "--training.per_device_train_batch_size", "4",
                             "--grpo.top_entropy_quantile", "0.2", "--grpo.max_completion_length", "5"])
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    problems = read_split_free(cfg)
    trainer = build_grpo_trainer(cfg, model, tokenizer, problems, tmp_path, progress=False)
    assert trainer.args.top_entropy_quantile == 0.2 and trainer.top_entropy_quantile == 0.2
    assert trainer.args.num_generations == 4 and trainer.args.top_p == 0.9  # from rollout
    assert trainer.args.max_completion_length == 5  # the grpo section wins over rollout.max_new_tokens
    assert trainer.args.learning_rate == cfg.training["learning_rate"]  # from training
    assert trainer.args.output_dir == str(tmp_path / "checkpoints")


def read_split_free(cfg):
    from reasonmaxxer.data.sources import load_problems

    return load_problems(cfg.data, seed=cfg.seed)[0]


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_trl_tokenizes_the_prompts_as_the_offline_rollouts(tiny_model_dir, prompt_format):
    cfg = load_config(None, ["--data.system_prompt", "Be brief.", "--data.prompt_format", prompt_format])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    problems = read_split_free(cfg)[:3]
    rows = grpo_dataset(problems, cfg.data, prompt_format)
    prompts = [r["prompt"] for r in rows]
    if prompt_format == "chat":  # as GRPOTrainer._tokenize_prompts does for conversational prompts
        got = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    else:
        got = tokenizer(text=prompts)["input_ids"]
    assert [list(g) for g in got] == [prompt_ids(tokenizer, p, cfg.data, prompt_format) for p in problems]


GRPO_MISTAKES = [
    ("unknown grpo key", ["--method", "grpo", "--grpo.top_entropy_quantil", "0.2"],
     "grpo.top_entropy_quantil: unknown key (not a GRPOConfig field) (did you mean 'top_entropy_quantile'?)"),
    ("grpo key set by ReasonMaxxer", ["--method", "grpo", "--grpo.output_dir", "x"],
     "grpo.output_dir: set by ReasonMaxxer"),
    ("grpo wrong type", ["--method", "grpo", "--grpo.num_iterations", "x"],
     "grpo.num_iterations: expected an integer, got 'x'"),
    ("grpo batch not whole groups", ["--method", "grpo", "--rollout.num_samples", "3"],
     "grpo.num_generations: each generation batch (4 completions over all processes"),
    ("grpo section with method offline", ["--grpo.beta", "0.1"],
     "grpo.beta: the grpo section applies to method grpo or online"),
    ("GRPO loss key with method online", ["--method", "online", "--grpo.beta", "0.1"],
     "grpo.beta: GRPO's loss setting has no effect with method online"),
    ("unknown method", ["--method", "grp"], "method: 'grp' is not one of 'offline', 'grpo', 'online'"),
    ("offline stage with method grpo", ["--method", "grpo", "--stage", "rollouts"],
     "--stage: method grpo has no rollouts stage"),
    ("value TRL refuses", ["--method", "grpo", "--grpo.generation_batch_size", "8", "--grpo.steps_per_generation", "2"],
     "grpo: 'generation_batch_size' and 'steps_per_generation' can not be both configured"),
]


@pytest.mark.parametrize("name, args, expected", GRPO_MISTAKES, ids=[c[0] for c in GRPO_MISTAKES])
def test_grpo_mistakes_are_one_line_and_no_work(name, args, expected, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert train_main([*tiny_run_args(tiny_model_dir, run), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1, err
    assert err[0].startswith("error: " + expected), err[0]
    assert not (run / "adapter").exists() and not (run / "compute.json").exists()


def test_offline_fingerprint_is_unchanged_by_the_method_key(tiny_model_dir, tmp_path):
    from reasonmaxxer.jobs.pipeline import Pipeline

    base = ["--model.name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path)]
    offline = Pipeline(load_config(None, base)).fingerprints()
    explicit = Pipeline(load_config(None, [*base, "--method", "offline"])).fingerprints()
    grpo = Pipeline(load_config(None, [*base, "--method", "grpo"])).fingerprints()
    quantile = Pipeline(load_config(None, [*base, "--method", "grpo", "--grpo.top_entropy_quantile", "0.2"]))
    assert offline == explicit
    assert grpo["training"] != offline["training"] and grpo["problems"] == offline["problems"]
    assert quantile.fingerprints()["training"] != grpo["training"]


def test_help_describes_the_grpo_section(capsys):
    from reasonmaxxer.config.reference import config_reference

    text = config_reference()
    section = text[text.index("\ngrpo:\n"):]
    assert "GRPOConfig" in section and "num_generations = rollout.num_samples" in section.replace("\n  ", " ")
    assert "--method  (one of 'offline', 'grpo', 'online'" in text
