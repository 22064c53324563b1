"""The bad-input catalogue (docs/reliability.md, Troubleshooting): each mistake, through the command line.

Every case must end with exactly one ``error: ...`` line on stderr naming the key, file,
row or value, a non-zero exit, and no work done: no rollouts, no scores, no adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonmaxxer.cli import eval_main, train_main
from reasonmaxxer.testing import build_tiny_model_dir, tiny_run_args

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _data_file(tmp: Path, text: str, *extra: str) -> list[str]:
    return ["--data.source", "file", "--data.path", str(_write(tmp / "data.jsonl", text)), *extra]


def _other_adapter(tmp: Path) -> Path:
    """A LoRA adapter saved for a different (wider) tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = build_tiny_model_dir(tmp / "other_model", hidden_size=48)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(other),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(tmp / "other_adapter")
    return tmp / "other_adapter"


def _changed_config_run(model: Path, tmp: Path) -> list[str]:
    """A folder whose problems stage was made with another seed."""
    assert train_main(tiny_run_args(model, tmp / "run", "--stage", "problems")) == 0
    return ["--seed", "7"]


def _sweep(tmp: Path) -> list[str]:
    path = _write(tmp / "sweep.yaml", "method: grid\nparameters:\n  gate.tua:\n    values: [1.0]\n")
    return ["--sweep", str(path)]


# (id, entry point, arguments after the tiny-run defaults (a function of the model and a
#  scratch folder, or a list), the start of the expected line after "error: ", exit code)
CATALOGUE = [
    ("unknown key", "train", ["--gate.tua", "1.8"], "gate.tua: unknown key (did you mean 'tau'?)", 2),
    ("Trainer evaluation asked for", "train", ["--training.eval_strategy", "steps"],
     "training.eval_strategy: 'steps' asks for the Trainer's evaluation", 2),
    ("prompt KL with the cached anchor", "train", ["--loss.kl_on_prompt", "true"],
     "loss.kl_on_prompt: needs loss.kl_anchor: exact", 2),
    ("unknown section", "train", ["--gaet.tau", "1.8"], "gaet: unknown section or key (did you mean 'gate'?)", 2),
    ("wrong type", "train", ["--rollout.num_samples", "x"], "rollout.num_samples: expected an integer, got 'x'", 2),
    ("tau out of range", "train", ["--gate.tau", "-1"], "gate.tau: must be >= 0, got -1.0", 2),
    ("rho out of range", "train", ["--gate.mode", "quantile", "--gate.quantile", "1.5"],
     "gate.quantile: must be in (0, 1], got 1.5", 2),
    ("k out of range", "train", ["--gate.mode", "topk", "--gate.k", "0"], "gate.k: must be >= 1, got 0", 2),
    ("unknown choice", "train", ["--gate.mode", "thresh"], "gate.mode: 'thresh' is not one of", 2),
    ("unknown training field", "train", ["--training.learnin_rate", "1e-4"],
     "training.learnin_rate: unknown key (not an SFTConfig field) (did you mean 'learning_rate'?)", 2),
    ("missing config file", "train", lambda m, t: ["--config", str(t / "nope.yaml")],
     "config file '{tmp}/nope.yaml' does not exist", 2),
    ("config not a mapping", "train", lambda m, t: ["--config", str(_write(t / "list.yaml", "- a\n- b\n"))],
     "config file '{tmp}/list.yaml': the top level must be a mapping of sections", 2),
    ("config YAML syntax", "train", lambda m, t: ["--config", str(_write(t / "bad.yaml", "gate:\n  tau: [1\n"))],
     "config file '{tmp}/bad.yaml' line", 2),
    ("model folder missing", "train", ["--model.name_or_path", "./no/such/model"],
     "model.name_or_path: folder './no/such/model' does not exist", 2),
    ("hub id while offline", "train", ["--model.name_or_path", "some-org/some-model"],
     "model.name_or_path: cannot load 'some-org/some-model' from the Hugging Face hub", 2),
    ("data file missing", "train", lambda m, t: ["--data.source", "file", "--data.path", str(t / "none.jsonl")],
     "{tmp}/none.jsonl: no such file", 2),
    ("dataset column missing", "train", lambda m, t: _data_file(t, '{"q": "1+1", "answer": "2"}\n'),
     "{tmp}/data.jsonl, line 1: no column 'prompt' (the row has: q, answer)", 2),
    ("malformed JSONL row", "train",
     lambda m, t: _data_file(t, '{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": \n'),
     "{tmp}/data.jsonl, line 2: invalid JSON", 2),
    ("empty dataset", "train", lambda m, t: _data_file(t, "\n"), "{tmp}/data.jsonl: no rows", 2),
    ("unknown stage", "train", ["--stage", "rolouts"], "--stage: unknown stage 'rolouts'", 2),
    ("stage without its inputs", "train", ["--stage", "scoring"],
     "--stage scoring: stage 'rollouts' has not run with this config", 2),
    ("vllm not installed", "train", ["--rollout.backend", "vllm"],
     "rollout.backend: 'vllm' needs the vllm package, which is not installed", 2),
    ("completion past the model's context", "train", ["--rollout.max_new_tokens", "600"],
     "rollout.max_new_tokens: 600 new tokens after prompts of up to 1 tokens need 601 positions, more than the 512", 2),
    ("vLLM tensor parallel against the heads", "train",
     ["--rollout.backend", "vllm", "--rollout.vllm_tensor_parallel_size", "3"],
     "rollout.vllm_tensor_parallel_size: 3 does not divide the 4 attention heads", 2),
    ("sweep with an unknown parameter", "train", lambda m, t: _sweep(t), "sweep file '{tmp}/sweep.yaml'", 2),
    ("folder made with another config", "train", _changed_config_run,
     "output_dir: '{tmp}/run' holds a run made with a different config (seed: 0 -> 7)", 2),
    ("adapter folder missing", "eval", lambda m, t: ["--adapter", str(t / "nothing")],
     "--adapter: '{tmp}/nothing' is not a PEFT adapter folder", 2),
    ("adapter of another base", "eval", lambda m, t: ["--adapter", str(_other_adapter(t))],
     "--adapter: '{tmp}/other_adapter' does not match the base", 2),
]


def test_the_catalogue_has_at_least_twenty_cases():
    assert len({case[0] for case in CATALOGUE}) == len(CATALOGUE) >= 20


def test_the_docs_list_every_case():
    readme = (ROOT / "docs" / "reliability.md").read_text()
    names = [name for name, *_ in CATALOGUE] + [name for name, *_ in PROMPT_AND_REWARD_CASES]
    names += ["folder in use by another job", "chat format without a template"]  # tests/test_lock.py, below
    missing = [name for name in names if f"| {name} |" not in readme]
    assert not missing, f"docs/reliability.md (troubleshooting) lacks: {missing}"


@pytest.mark.parametrize("name, entry, args, expected, code", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_line_and_no_work(name, entry, args, expected, code, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    extra = args(tiny_model_dir, tmp_path) if callable(args) else args
    capsys.readouterr()
    main = train_main if entry == "train" else eval_main
    assert main([*tiny_run_args(tiny_model_dir, run), *extra]) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1, err
    assert err[0].startswith("error: " + expected.format(tmp=tmp_path)), err[0]
    for output in ("rollouts.jsonl", "scores", "adapter", "eval"):
        assert not (run / output).exists(), output
    if name == "folder made with another config":  # the run that was there is untouched
        assert json.loads((run / "stages" / "problems.json").read_text())["done"]


# Mistakes in the prompt and reward options (README troubleshooting rows: see the notes of
# the h-prompts branch), each one line and no work done.


def _base_model_dir(tmp: Path) -> Path:
    """The tiny model as a base model: its tokenizer has no chat template."""
    model = build_tiny_model_dir(tmp / "base_model")
    (model / "chat_template.jinja").unlink()
    return model


PROMPT_AND_REWARD_CASES = [
    ("reward module missing", lambda t: ["--reward.function", "no_such_rewards_module:score"],
     "reward.function: cannot import module 'no_such_rewards_module'"),
    ("reward attribute missing", lambda t: ["--reward.function", "json:no_such_function"],
     "reward.function: module 'json' has no attribute 'no_such_function'"),
    ("held-out file missing", lambda t: ["--data.heldout_path", str(t / "held.jsonl")],
     "data.heldout_path: '{tmp}/held.jsonl' is not a file"),
]


@pytest.mark.parametrize("name, args, expected", PROMPT_AND_REWARD_CASES, ids=[c[0] for c in PROMPT_AND_REWARD_CASES])
def test_prompt_and_reward_mistakes_are_one_line_and_no_work(name, args, expected, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert train_main([*tiny_run_args(tiny_model_dir, run), *args(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("error: " + expected.format(tmp=tmp_path)), err
    assert not (run / "problems.jsonl").exists() and not (run / "rollouts.jsonl").exists()


def test_a_base_model_gets_plain_prompts_and_chat_is_refused(tmp_path, capsys):
    from transformers import AutoTokenizer

    model = _base_model_dir(tmp_path)
    capsys.readouterr()
    assert train_main(tiny_run_args(model, tmp_path / "chat", "--data.prompt_format", "chat")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("error: data.prompt_format: 'chat' needs a tokenizer with a chat "
                                               "template"), err
    assert not (tmp_path / "chat" / "rollouts.jsonl").exists()
    # auto (the default) samples from plain prompts where a chat template used to be required.
    run = tmp_path / "run"
    assert train_main(tiny_run_args(model, run, "--stage", "problems")) == 0
    assert train_main(tiny_run_args(model, run, "--stage", "rollouts")) == 0
    tokenizer = AutoTokenizer.from_pretrained(model)
    first = json.loads((run / "rollouts.jsonl").read_text().splitlines()[0])
    problems = [json.loads(line) for line in (run / "problems.jsonl").read_text().splitlines()]
    question = next(p["prompt"] for p in problems if p["id"] == first["problem_id"])
    text = tokenizer.decode(first["prompt_ids"])
    assert text.startswith(question + "\n\nReason briefly") and "<|im_start|>" not in text
