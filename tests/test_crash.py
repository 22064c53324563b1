"""kill -9 in the middle of a run, then the same command again: nothing lost, same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import give_mixed_rewards
from safetensors.torch import load_file

from reasonmaxxer.testing import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _train(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    start = time.time()
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-2000:]}"
        assert time.time() - start < timeout, "the kill point never came"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(args: list[str]) -> None:
    proc = _train(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_kill_during_rollouts_keeps_every_finished_batch(tiny_model_dir, tmp_path):
    extra = ["--data.num_train", "40", "--rollout.max_new_tokens", "24", "--stage"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for run in (clean, killed):
        _finish(tiny_run_args(tiny_model_dir, run, *extra, "problems"))
    _finish(tiny_run_args(tiny_model_dir, clean, *extra, "rollouts"))
    proc = _train(tiny_run_args(tiny_model_dir, killed, *extra, "rollouts"))
    path = killed / "rollouts.jsonl"
    _kill_when(proc, lambda: path.exists() and path.stat().st_size > 0)
    kept = len(path.read_text().splitlines())
    assert 0 < kept < 160  # killed mid-stage
    _finish(tiny_run_args(tiny_model_dir, killed, *extra, "rollouts"))
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    assert sorted(_rows(killed / "rollouts.jsonl"), key=key) == sorted(_rows(clean / "rollouts.jsonl"), key=key)


def test_kill_during_scoring_keeps_every_finished_shard(tiny_model_dir, tmp_path):
    # 320 one-rollout shards: slow enough that the kill lands mid-stage.
    extra = ["--data.num_train", "80", "--rollout.max_new_tokens", "24", "--scoring.batch_size", "1", "--stage"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for run in (clean, killed):
        for stage in ("problems", "rollouts"):
            _finish(tiny_run_args(tiny_model_dir, run, *extra, stage))
    _finish(tiny_run_args(tiny_model_dir, clean, *extra, "scoring"))
    proc = _train(tiny_run_args(tiny_model_dir, killed, *extra, "scoring"))
    shards = killed / "scores"
    _kill_when(proc, lambda: shards.is_dir() and len(list(shards.glob("shard-*.safetensors"))) >= 3)
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.safetensors")}
    assert 3 <= len(kept) < 320  # killed mid-stage, one shard per rollout
    _finish(tiny_run_args(tiny_model_dir, killed, *extra, "scoring"))
    assert all((shards / name).stat().st_mtime_ns == t for name, t in kept.items())  # finished shards kept
    names = sorted(p.name for p in (clean / "scores").iterdir())
    assert sorted(p.name for p in shards.iterdir()) == names  # no temporary file left behind
    for name in names:
        assert (clean / "scores" / name).read_bytes() == (shards / name).read_bytes(), name


def test_kill_during_training_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    extra = ["--training.max_steps", "6", "--training.save_steps", "2", "--training.per_device_train_batch_size", "2"]
    runs = {}
    for name in ("clean", "killed"):
        run = tmp_path / name
        _finish(tiny_run_args(tiny_model_dir, run, "--stage", "problems"))
        _finish(tiny_run_args(tiny_model_dir, run, "--stage", "rollouts"))
        give_mixed_rewards(run / "rollouts.jsonl")
        runs[name] = run
    _finish(tiny_run_args(tiny_model_dir, runs["clean"], *extra))
    proc = _train(tiny_run_args(tiny_model_dir, runs["killed"], *extra))
    _kill_when(proc, lambda: (runs["killed"] / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists())
    assert not (runs["killed"] / "adapter").exists()
    _finish(tiny_run_args(tiny_model_dir, runs["killed"], *extra))
    state = json.loads((runs["killed"] / "stages" / "training.json").read_text())
    assert state["done"] and state["summary"]["resumed_from"] in ("2", "4")
    a = load_file(str(runs["clean"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["killed"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_kill_during_a_sweep_resumes_at_the_unfinished_point(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    _finish(tiny_run_args(tiny_model_dir, run, "--stage", "problems"))
    _finish(tiny_run_args(tiny_model_dir, run, "--stage", "rollouts"))
    give_mixed_rewards(run / "rollouts.jsonl")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nmethod: grid\nparameters:\n  gate.k:\n    values: [2, 3]\n"
                     "  gate.mode:\n    value: topk\n")
    args = tiny_run_args(tiny_model_dir, run, "--eval.num_samples", "2", "--eval.bootstrap", "100",
                         "--eval.movement_rollouts", "4", "--sweep", str(sweep))
    first = run / "sweeps" / "s" / "gate.k=2,gate.mode=topk"
    second = run / "sweeps" / "s" / "gate.k=3,gate.mode=topk"
    proc = _train(args)
    _kill_when(proc, lambda: (first / "point.json").exists() and (second / "stages").exists())
    adapter_mtime = (first / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert not (second / "point.json").exists()
    _finish(args)
    assert (first / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime  # not redone
    rows = json.loads((run / "sweeps" / "s" / "ablation.json").read_text())["points"]
    assert [r["point"]["gate.k"] for r in rows] == [2, 3]
    assert (second / "adapter" / "adapter_config.json").exists()
