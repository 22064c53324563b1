"""W&B tracking: resolved config as run config, offline fallback without credentials."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from reasonmaxxer.config.loading import load_config
from reasonmaxxer.tracking import Tracker, redact


def test_report_to_none_creates_no_run(tmp_path):
    tracker = Tracker(load_config(None, []), tmp_path)
    assert tracker.run is None and tracker.trainer_report_to == "none"
    tracker.summary("x", {"a": 1})  # no-op
    tracker.finish()


def test_redact_drops_credentials_only():
    cfg = {"tracking": {"project": "p", "api_key": "s3cret"}, "x": [{"hf_token": "t"}], "tau": 1.4,
           "rollout": {"max_new_tokens": 128}, "scoring": {"top_k": 64}, "wandb_api_key": "k", "password": "p"}
    out = redact(cfg)
    assert out == {"tracking": {"project": "p", "api_key": "<redacted>"}, "x": [{"hf_token": "<redacted>"}],
                   "tau": 1.4, "rollout": {"max_new_tokens": 128}, "scoring": {"top_k": 64},
                   "wandb_api_key": "<redacted>", "password": "<redacted>"}


def test_saved_config_round_trips(tmp_path):
    """config.yaml as the pipeline writes it loads back to the same config."""
    import yaml

    from reasonmaxxer.config.loading import config_from_dict

    cfg = load_config(None, ["--rollout.max_new_tokens", "77", "--gate.tau", "1.8"])
    text = yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False)
    assert config_from_dict(yaml.safe_load(text)).to_dict() == cfg.to_dict()


@pytest.mark.slow
def test_no_credentials_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["--tracking.report_to", "wandb", "--tracking.group", "g1", "--tracking.tags", "[t1]",
                             "--gate.tau", "1.7", "--output_dir", str(tmp_path / "run")])
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="reasonmaxxer.tracking"):
        tracker = Tracker(cfg, run_dir)
    try:
        warnings = [r for r in caplog.records if r.name == "reasonmaxxer.tracking"]
        assert len(warnings) == 1 and "offline" in warnings[0].getMessage()
        assert tracker.run is not None and tracker.trainer_report_to == "wandb"
        assert tracker.run.config["gate"]["tau"] == 1.7
        assert tracker.run.group == "g1" and list(tracker.run.tags) == ["t1"]
        tracker.summary("rollouts", {"mean_reward": 0.25, "note": "skipped: not a number"})
        assert tracker.run.summary["rollouts/mean_reward"] == 0.25
    finally:
        tracker.finish()
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline run folder missing"


@pytest.mark.slow
def test_no_credential_lands_in_any_file_of_the_run(tiny_model_dir, tmp_path, monkeypatch):
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.testing import tiny_run_args

    secret = "wk-3f9c1e7d0b2a4c6e8f1a3b5c7d9e0f2a4b6c8d0e"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = tiny_run_args(tiny_model_dir, run, "--tracking.report_to", "wandb", "--tracking.api_key", secret)
    assert train_main(args) == 2  # tracking.api_key is not a key: secrets go in the environment
    assert train_main(tiny_run_args(tiny_model_dir, run, "--tracking.report_to", "wandb", "--stage", "problems")) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert not [p for p in files if secret.encode() in p.read_bytes()]
