"""The adapter's model card, written from a run folder, and its upload to the Hub (mocked)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from reasonmaxxer.config import load_config
from reasonmaxxer.training import model_card
from reasonmaxxer.training.model_card import base_model_hub_id, hub_repo_id, push_adapter, write_model_card

TRAIN_LOG = [
    {"loss": 0.91, "fork_fraction": 0.25, "fork_term": 0.5, "kl_term": 0.01, "step": 1},
    {"loss": 0.37, "fork_fraction": 0.125, "fork_term": 0.3, "kl_term": 0.02, "step": 2},
    {"train_loss": 0.64, "step": 2},
]
ACCURACY = {
    "base": {"pass_at_1": 0.25, "pass_at_4": 0.5, "greedy_accuracy": 0.2, "samples_per_problem": 4, "n": 10},
    "adapter": {"pass_at_1": 0.375, "pass_at_4": 0.6, "greedy_accuracy": 0.3, "samples_per_problem": 4, "n": 10},
    "delta_pass_at_1": {"mean": 0.125, "ci95": [0.05, 0.2], "n": 10},
}
MOVEMENT = {"rollouts": 6, "fork": {"kl_mean": 0.2}, "nonfork": {"kl_mean": 0.01}, "kl_ratio": 20.0,
            "kl_share_at_forks": 0.7, "fork_share_of_positions": 0.1}


def _run(tmp_path, *overrides):
    run = tmp_path / "my-run"
    cfg = load_config(None, ["--output_dir", str(run), "--model.name_or_path", "org/base-model", *overrides])
    (run / "stages").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    summaries = {"problems": {"train": 12, "heldout": 5}, "rollouts": {"rollouts": 48, "mean_reward": 0.5},
                 "selection": {"problems_total": 12, "problems_mixed": 7, "problems_kept": 7, "rollouts_kept": 28,
                               "positive": 14, "negative": 14}}
    for stage, summary in summaries.items():
        (run / "stages" / f"{stage}.json").write_text(json.dumps({"done": True, "summary": summary}))
    (run / "train_log.json").write_text(json.dumps(TRAIN_LOG))
    return cfg, run


def _card(run):
    text = (run / "adapter" / "README.md").read_text()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_card_names_the_method_settings_data_and_training(tmp_path):
    cfg, run = _run(tmp_path, "--gate.tau", "1.7", "--scoring.entropy_temperature", "0.9", "--loss.variant", "hinge",
                    "--loss.kl_coef", "0.3", "--lora.r", "4", "--data.kinds", "[add, sub]")
    write_model_card(cfg, run)
    meta, body = _card(run)
    assert meta["base_model"] == "org/base-model" and meta["library_name"] == "peft"
    assert {"reasonmaxxer", "lora", "base_model:adapter:org/base-model"} <= set(meta["tags"])
    assert body.startswith("\n# my-run\n")
    assert "mode: threshold, tau: 1.7" in body
    assert "temperature | 0.9 |" in body
    assert "| loss | hinge, hinge margin 1 nats |" in body and "coefficient 0.3, cached" in body
    assert "r 4, alpha 32" in body
    assert "kinds add, sub" in body and "12 for training, 5 held out" in body
    assert "7 of 12 problems kept" in body and "28 rollouts (14 positive, 14 negative" in body
    assert "Steps: 2; final logged loss 0.37, mean training loss 0.64" in body
    assert "Not evaluated yet" in body


def test_card_adds_the_evaluation_once_it_is_newer_than_the_adapter(tmp_path):
    cfg, run = _run(tmp_path)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "accuracy.json").write_text(json.dumps(ACCURACY))
    (eval_dir / "movement.json").write_text(json.dumps(MOVEMENT))
    write_model_card(cfg, run, eval_dir=eval_dir)
    _, body = _card(run)
    assert "| pass@1 | 0.25 | 0.375 |" in body and "| pass@4 | 0.5 | 0.6 |" in body
    assert "Delta pass@1: 0.125 (95% bootstrap CI 0.05 to 0.2, 10 problems)" in body
    assert "0.2 at forks vs 0.01 elsewhere (ratio 20)" in body

    # A retrained adapter (weights newer than the results) does not inherit them.
    weights = run / "adapter" / "adapter_model.safetensors"
    later = (eval_dir / "accuracy.json").stat().st_mtime + 10
    os.utime(weights, (later, later))
    write_model_card(cfg, run, eval_dir=eval_dir)
    _, body = _card(run)
    assert "pass@1" not in body and "Not evaluated yet" in body


def test_base_model_hub_id(tmp_path):
    assert base_model_hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    assert base_model_hub_id(str(snapshot)) == "Qwen/Qwen3-0.6B"
    assert base_model_hub_id(str(tmp_path)) is None  # a local folder of unknown origin


def test_local_base_has_no_base_model_key(tmp_path):
    cfg, run = _run(tmp_path, "--model.name_or_path", str(tmp_path))
    write_model_card(cfg, run)
    meta, body = _card(run)
    assert "base_model" not in meta and not any(t.startswith("base_model:") for t in meta["tags"])
    assert f"`{tmp_path}` (a local model)" in body


@pytest.mark.parametrize("overrides, repo", [
    ([], "my-run"),
    (["--tracking.run_name", "named"], "named"),
    (["--tracking.run_name", "named", "--training.hub_model_id", "org/chosen"], "org/chosen"),
    (["--tracking.run_name", "gate.k=2,gate.mode=topk"], "gate.k-2-gate.mode-topk"),  # a sweep point's name
    (["--tracking.run_name", "x" * 120], "x" * 96),
])
def test_hub_repo_id(tmp_path, overrides, repo):
    cfg, _ = _run(tmp_path, *overrides)
    assert hub_repo_id(cfg) == repo


class _FakeHub:
    def __init__(self, fail=False):
        self.fail = fail
        self.calls = []

    def install(self, monkeypatch):
        import huggingface_hub

        fake = self

        class Api:
            def __init__(self, token=None):
                fake.calls.append(("token", token))

            def create_repo(self, repo_id, private=None, exist_ok=False):
                if fake.fail:
                    raise ConnectionError("hub unreachable\nmore detail")
                fake.calls.append(("create", repo_id, private, exist_ok))
                return type("RepoUrl", (), {"repo_id": f"user/{repo_id}" if "/" not in repo_id else repo_id})()

            def upload_folder(self, repo_id, folder_path, commit_message):
                files = sorted(os.listdir(folder_path))
                fake.calls.append(("upload", repo_id, folder_path, files))

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)


def test_push_uploads_the_adapter_folder_with_its_card(tmp_path, monkeypatch):
    cfg, run = _run(tmp_path, "--training.push_to_hub", "true", "--training.hub_private_repo", "true")
    write_model_card(cfg, run)
    hub = _FakeHub()
    hub.install(monkeypatch)
    assert push_adapter(cfg, run) == "user/my-run"
    assert ("create", "my-run", True, True) in hub.calls
    upload = next(c for c in hub.calls if c[0] == "upload")
    assert upload[1] == "user/my-run" and upload[2] == str(run / "adapter")
    assert "README.md" in upload[3] and "adapter_model.safetensors" in upload[3]


def test_failed_push_warns_and_keeps_the_adapter(tmp_path, monkeypatch, caplog):
    cfg, run = _run(tmp_path, "--training.push_to_hub", "true")
    _FakeHub(fail=True).install(monkeypatch)
    with caplog.at_level("WARNING", logger=model_card.__name__):
        assert push_adapter(cfg, run) is None
    assert "hub unreachable" in caplog.text and f"hf upload my-run {run / 'adapter'}" in caplog.text
    assert (run / "adapter" / "adapter_model.safetensors").exists()
