"""bench/step.py at a tiny size, so the script cannot rot, and its recomputing-backward switch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_step_bench_runs_every_kind_and_prints_its_ratios(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--model", "tiny", "--batch", "2",
                          "--prompt-len", "6", "--completion-len", "10", "--reps", "1", "--ab-backward"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    timed = {line.split(":")[0].strip() for line in lines if ": median " in line}
    assert timed == {"plain", "cached", "exact", "cached_recompute", "exact_recompute"}
    paired = dict(kv.split("=") for kv in lines[-2].split())
    last = dict(kv.split("=") for kv in lines[-1].split())
    assert set(paired) == {"factored_vs_recompute_cached", "factored_vs_recompute_exact"}
    assert set(last) == {"cached_ratio", "exact_ratio"}
    assert all(float(v) > 0 for v in (*paired.values(), *last.values()))


def test_recomputing_runs_the_step_with_the_recomputing_backward_and_restores_the_default():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    forward_module = bench_step.forward_module
    default = forward_module.fused_head_logprobs
    seen = []

    def step():
        seen.append(forward_module.fused_head_logprobs.keywords)
        raise RuntimeError("a step that fails")

    with pytest.raises(RuntimeError):
        bench_step.recomputing(step)()
    assert seen == [{"factor_backward": False}] and forward_module.fused_head_logprobs is default
