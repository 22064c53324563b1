"""Shared test setup: offline hub, no wandb, and a tiny model built once per session."""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported by any test module: the hub
# client reads these at import time, and a hub id must fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers this suite uses."""
    config.addinivalue_line("markers", "slow: end-to-end tests that take tens of seconds or more")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model + ChatML tokenizer saved as safetensors, built once per session."""
    from reasonmaxxer.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (every training stage), with supplied mixed rewards."""
    from helpers import give_mixed_rewards

    from reasonmaxxer.cli import train_main
    from reasonmaxxer.testing import tiny_run_args

    run_dir = tmp_path_factory.mktemp("run") / "demo"
    assert train_main(tiny_run_args(tiny_model_dir, run_dir, "--stage", "problems")) == 0
    assert train_main(tiny_run_args(tiny_model_dir, run_dir, "--stage", "rollouts")) == 0
    give_mixed_rewards(run_dir / "rollouts.jsonl")
    assert train_main(tiny_run_args(tiny_model_dir, run_dir)) == 0
    return run_dir
