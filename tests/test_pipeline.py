"""End to end: every stage on a tiny in-process model, skip/rerun rules, --stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from reasonmaxxer.cli import train_main

pytestmark = pytest.mark.slow


def _args(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--no-progress",
        "--model.name_or_path", str(model_dir),
        "--output_dir", str(run_dir),
        "--data.num_train", "6", "--data.num_heldout", "4",
        "--rollout.num_samples", "4", "--rollout.max_new_tokens", "12", "--rollout.batch_size", "8",
        "--scoring.top_k", "8", "--scoring.chunk_size", "5",
        "--training.max_steps", "3", "--training.per_device_train_batch_size", "4",
        "--training.save_steps", "2",
        *extra,
    ]


def _give_mixed_rewards(run_dir: Path) -> None:
    """A random tiny model solves nothing: supply rewards so selection has mixed problems."""
    path = run_dir / "rollouts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r["reward"] = float(r["sample"] % 2 == 0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage_lines(out: str) -> dict[str, str]:
    lines = {}
    for line in out.splitlines():
        name = line.split(" ", 1)[0]
        if name in ("problems", "rollouts", "scoring", "selection", "training"):
            lines[name] = line
    return lines


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "demo"
    assert train_main(_args(tiny_model_dir, run_dir, "--stage", "problems")) == 0
    assert train_main(_args(tiny_model_dir, run_dir, "--stage", "rollouts")) == 0
    _give_mixed_rewards(run_dir)
    assert train_main(_args(tiny_model_dir, run_dir)) == 0
    return run_dir


def test_every_stage_writes_its_outputs(finished_run, tiny_model_dir):
    run = finished_run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["gate"]["tau"] == 1.4 and cfg["rollout"]["num_samples"] == 4
    problems = [json.loads(x) for x in (run / "problems.jsonl").read_text().splitlines()]
    assert sum(p["split"] == "train" for p in problems) == 6
    assert sum(p["split"] == "heldout" for p in problems) == 4
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 24
    shards = sorted((run / "scores").glob("shard-*.safetensors"))
    assert shards
    selection = [json.loads(x) for x in (run / "selection.jsonl").read_text().splitlines()]
    assert len(selection) == 24 and {round(s["advantage"], 6) for s in selection} == {1.0, -1.0}
    for stage in ("problems", "rollouts", "scoring", "selection", "training"):
        assert json.loads((run / "stages" / f"{stage}.json").read_text())["done"] is True
    log = json.loads((run / "train_log.json").read_text())
    steps = [h for h in log if "fork_fraction" in h]
    assert len(steps) == 3
    for key in ("loss", "fork_term", "kl_term", "fork_fraction", "forks_correct", "forks_wrong",
                "dlogp_pos_forks", "dlogp_neg_forks", "base_entropy_forks", "base_entropy_nonforks", "grad_norm"):
        assert all(key in h and h[key] == h[key] for h in steps), key  # present and not NaN


def test_adapter_loads_with_peft_and_changed_the_model(finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, finished_run / "adapter")
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() > 0  # LoRA B is zero at init: any change means it trained


def test_rerun_skips_unchanged_stages_and_redoes_changed_ones(finished_run, tiny_model_dir, capsys):
    capsys.readouterr()
    assert train_main(_args(tiny_model_dir, finished_run)) == 0
    lines = _stage_lines(capsys.readouterr().out)
    assert all("skipped" in lines[s] for s in ("problems", "rollouts", "scoring", "selection", "training"))

    # A gate change invalidates training only.
    assert train_main(_args(tiny_model_dir, finished_run, "--gate.mode", "topk", "--gate.k", "2")) == 0
    lines = _stage_lines(capsys.readouterr().out)
    assert all("skipped" in lines[s] for s in ("problems", "rollouts", "scoring", "selection"))
    assert "skipped" not in lines["training"]
    log = json.loads((finished_run / "train_log.json").read_text())
    assert all(h["forks"] <= 2 * 4 for h in log if "forks" in h)


def test_stage_alone_needs_its_inputs(tiny_model_dir, tmp_path, capsys):
    code = train_main(_args(tiny_model_dir, tmp_path / "fresh", "--stage", "scoring"))
    err = capsys.readouterr().err
    assert code == 2
    assert "stage 'rollouts' has not run with this config" in err and "\n" == err[-1] and err.count("\n") == 1


def test_unknown_stage(tiny_model_dir, tmp_path, capsys):
    assert train_main(_args(tiny_model_dir, tmp_path / "x", "--stage", "rolouts")) == 2
    assert "unknown stage 'rolouts'" in capsys.readouterr().err


def test_no_mixed_success_says_what_to_change(tiny_model_dir, tmp_path, capsys):
    code = train_main(_args(tiny_model_dir, tmp_path / "nomix"))
    err = capsys.readouterr().err
    assert code == 2
    assert "selection: no problem has both a correct and a wrong rollout" in err
    assert "rollout.num_samples" in err


def test_training_logs_fork_metrics_to_wandb_offline(finished_run, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train_main(_args(tiny_model_dir, finished_run, "--loss.kl_coef", "0.5", "--tracking.report_to", "wandb",
                            "--tracking.project", "rm-test")) == 0
    runs = sorted((finished_run / "wandb").glob("offline-run-*"))
    assert runs
    # Offline runs keep their records in a binary log (protobuf: keys are stored verbatim).
    record = next(runs[-1].glob("run-*.wandb")).read_bytes()
    for key in ("train/fork_fraction", "train/kl_term", "train/fork_term", "train/grad_norm",
                "train/dlogp_pos_forks", "train/base_entropy_forks", "training/steps", '"kl_coef":0.5'):
        assert key.encode() in record, key
