"""Sweeps: W&B grid expansion, validation, reuse of shared stages, resume, agent mode."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from reasonmaxxer.config.loading import parse_overrides
from reasonmaxxer.errors import ConfigError
from reasonmaxxer.sweep import expand_grid, load_sweep, point_args, sweep_configs
from reasonmaxxer.testing import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path, parameters, **extra):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": parameters, **extra}))
    return path


def test_grid_expands_like_wandb():
    params = {"lora.r": {"value": 8}, "gate.tau": {"values": [1.0, 2.0]},
              "gate.mode": {"values": ["threshold", "random"]}}
    # W&B: parameters sorted by name, Cartesian product with the last name varying fastest.
    expected = []
    for mode in ["threshold", "random"]:
        for tau in [1.0, 2.0]:
            expected.append({"gate.mode": mode, "gate.tau": tau, "lora.r": 8})
    assert expand_grid(params) == expected


def test_grid_expands_int_and_q_uniform():
    assert [p["lora.r"] for p in expand_grid({"lora.r": {"min": 2, "max": 4}})] == [2, 3, 4]
    taus = [p["gate.tau"] for p in expand_grid({"gate.tau": {"min": 1.0, "max": 2.0, "q": 0.25}})]
    assert taus == pytest.approx([1.0, 1.25, 1.5, 1.75])


def test_point_args_are_what_the_cli_takes():
    point = {"gate.tau": 1.4, "gate.mode": "random", "tracking.tags": ["a"], "selection.drop_truncated": True}
    args = point_args(point)
    assert "--gate.tau=1.4" in args
    assert parse_overrides(args) == {"gate": {"tau": 1.4, "mode": "random"}, "tracking": {"tags": ["a"]},
                                     "selection": {"drop_truncated": True}}


def test_shipped_sweeps_validate_against_the_demo():
    demo = str(ROOT / "configs" / "demo.yaml")
    tau = sweep_configs(demo, [], load_sweep(ROOT / "configs" / "sweeps" / "tau.yaml"))
    assert len(tau) == 12
    assert {(c.gate.mode, c.gate.tau) for _, c in tau} == {(m, t) for m in ("threshold", "random", "all")
                                                          for t in (1.0, 1.4, 1.8, 2.2)}
    rho = sweep_configs(demo, [], load_sweep(ROOT / "configs" / "sweeps" / "rho.yaml"))
    assert [c.gate.quantile for _, c in rho] == [0.05, 0.1, 0.2, 0.4]
    assert all(c.gate.mode == "quantile" for _, c in rho)


@pytest.mark.parametrize("params, extra, message", [
    ({"gate.tua": {"values": [1.0]}}, {}, "gate.tua: unknown key (did you mean 'tau'?)"),
    ({"gate.tau": {"values": [-1.0]}}, {}, "gate.tau: must be >= 0"),
    ({"gate.tau": {"values": []}}, {}, "'values' must be a non-empty list"),
    ({"gate.tau": {"distribution": "normal"}}, {}, "is not usable in a grid"),
    ({"gate.tau": {"values": [1.0]}}, {"method": "bayes"}, "method 'bayes' cannot run locally"),
])
def test_bad_sweep_files_fail_before_any_work(tmp_path, params, extra, message):
    path = _sweep_file(tmp_path, params, **extra)
    with pytest.raises(ConfigError) as err:
        sweep_configs(None, [], load_sweep(path))
    assert message in str(err.value) and f"sweep file '{path}'" in str(err.value)


def test_effective_gate_ignores_unused_fields():
    from reasonmaxxer.config.loading import load_config

    a = load_config(None, ["--gate.mode", "all", "--gate.tau", "1.0"]).gate.effective()
    b = load_config(None, ["--gate.mode", "all", "--gate.tau", "2.0"]).gate.effective()
    assert a == b == {"mode": "all"}
    r = load_config(None, ["--gate.mode", "random", "--gate.tau", "1.8"]).gate.effective()
    assert r == {"mode": "random", "tau": 1.8, "entropy_source": "base", "reference": "threshold"}


# ----------------------------------------------------------------------------- end to end


@pytest.fixture()
def mixed_verify(monkeypatch):
    """A random tiny model solves nothing: reward by a hash of the text so problems are mixed."""
    import zlib

    import reasonmaxxer.stages.rollouts as rollouts_module

    monkeypatch.setattr(rollouts_module, "verify", lambda text, answer, *_: (float(zlib.crc32(text.encode()) % 2), None))


def _count(monkeypatch, cls_or_module, name):
    calls = []
    original = getattr(cls_or_module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls_or_module, name, wrapper)
    return calls


@pytest.mark.slow
def test_local_sweep_reuses_rollouts_and_resumes(tiny_model_dir, tmp_path, monkeypatch, mixed_verify, capsys):
    from reasonmaxxer import sweep as sweep_module
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.pipeline import Pipeline

    sweep = _sweep_file(tmp_path, {"gate.mode": {"values": ["topk", "all"]}, "gate.k": {"values": [2, 3]}},
                        name="t")
    args = [*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--eval.num_samples", "2", "--eval.bootstrap", "100",
            "--eval.movement_rollouts", "4", "--sweep", str(sweep)]
    rollout_stages = _count(monkeypatch, Pipeline, "stage_rollouts")
    real_run_point = sweep_module.run_point
    trained = []

    def run_point_then_die(point, cfg, base_dir, progress):
        trained.append(point)
        if len(trained) == 2:
            raise KeyboardInterrupt  # a kill during the second point
        return real_run_point(point, cfg, base_dir, progress)

    monkeypatch.setattr(sweep_module, "run_point", run_point_then_die)
    assert train_main(args) == 130
    assert len(rollout_stages) == 1 and trained == [{"gate.k": 2, "gate.mode": "topk"},
                                                    {"gate.k": 2, "gate.mode": "all"}]
    monkeypatch.setattr(sweep_module, "run_point", real_run_point)
    points = _count(monkeypatch, sweep_module, "run_point")
    assert train_main(args) == 0
    # Resumed at the first unfinished point; gate.mode=all at k=3 is the same run as at k=2.
    assert len(points) == 2
    assert len(rollout_stages) == 1  # rollouts were generated once, for the whole sweep
    sweep_dir = tmp_path / "run" / "sweeps" / "t"
    rows = json.loads((sweep_dir / "ablation.json").read_text())
    assert [r["point"] for r in rows] == [{"gate.k": 2, "gate.mode": "topk"}, {"gate.k": 2, "gate.mode": "all"},
                                          {"gate.k": 3, "gate.mode": "topk"}, {"gate.k": 3, "gate.mode": "all"}]
    assert rows[3]["same_as"] == {"gate.k": 2, "gate.mode": "all"}
    assert rows[1]["fork_fraction"] == pytest.approx(1.0)
    assert 0 < rows[0]["fork_fraction"] < 1
    for r in rows:
        assert {"delta_pass_at_1", "delta_ci95", "kl_ratio", "top1_agreement_nonfork", "train_seconds"} <= set(r)
    for name in ("ablation.md", "ablation.png"):
        assert (sweep_dir / name).stat().st_size > 0
    point_dir = Path(rows[0]["run_dir"])
    assert (point_dir / "rollouts.jsonl").is_symlink()  # shared, not copied or regenerated
    assert (point_dir / "adapter" / "adapter_config.json").exists() and (point_dir / "movement.json").exists()
    # The base's eval samples do not depend on the point: sampled once, in the base run.
    assert (tmp_path / "run" / "eval_samples" / "base_samples.jsonl").exists()
    assert not list(sweep_dir.glob("*/eval_samples/base_samples.jsonl"))
    assert all((Path(r["run_dir"]) / "eval_samples" / "adapter_samples.jsonl").exists() for r in rows)


@pytest.mark.slow
def test_wandb_agent_point_runs_in_its_own_folder_and_logs_to_wandb(tiny_model_dir, tmp_path, monkeypatch,
                                                                     mixed_verify, caplog):
    from helpers import wandb_records, wandb_summary_and_history

    from reasonmaxxer.cli import train_main

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # tracking.report_to stays at its default, none, as in the demo config the shipped sweeps use.
    args = [*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--eval.num_samples", "2", "--eval.bootstrap", "100",
            "--eval.movement_rollouts", "4", "--gate.mode=topk", "--gate.k=2"]
    with caplog.at_level(logging.INFO, logger="reasonmaxxer.sweep"):
        assert train_main(args) == 0
    assert len([r for r in caplog.records if "tracking switched on" in r.getMessage()]) == 1
    points = list((tmp_path / "run" / "sweeps" / "abc123").iterdir())
    assert len(points) == 1 and "gate.k=2" in points[0].name
    assert (points[0] / "adapter" / "adapter_config.json").exists()
    assert (points[0] / "accuracy.json").exists()
    assert (tmp_path / "run" / "rollouts.jsonl").exists()  # shared stages live in the base run
    assert not list((tmp_path / "run").glob("wandb"))  # the agent's one W&B run is the point's

    # The point's offline W&B run: part of the sweep, with the sweep's metric and the Trainer's logs.
    (run_file,) = (points[0] / "wandb").glob("offline-run-*/run-*.wandb")
    (run_record,) = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert run_record.sweep_id == "abc123"
    summary, history = wandb_summary_and_history(run_file)
    metrics = {load_sweep(path).metric["name"] for path in (ROOT / "configs" / "sweeps").glob("*.yaml")}
    accuracy = json.loads((points[0] / "accuracy.json").read_text())
    for metric in metrics:  # accuracy/delta_pass_at_1
        assert summary[metric] == pytest.approx(accuracy["delta_pass_at_1"]["mean"])
    train_log = json.loads((points[0] / "train_log.json").read_text())
    logged_losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(logged_losses) == 3  # training.max_steps with logging_steps 1
    assert logged_losses == pytest.approx([h["loss"] for h in train_log if "loss" in h])
