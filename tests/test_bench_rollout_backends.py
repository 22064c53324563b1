"""bench/rollout_backends.py at a tiny size, so the script cannot rot: every backend here runs on the same
prompts, vLLM is skipped with a line where it is not installed, and the ratios are printed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fast_and_hf_sample_the_same_prompts_and_the_ratio_is_printed(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout_backends.py"), "--problems", "3",
                          "--max-new-tokens", "6", "--model.name_or_path", str(tiny_model_dir),
                          "--model.dtype", "float32"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "3 prompts x 8 samples" in out.stdout
    tokens = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+): (\d+) tokens", out.stdout, re.M)}
    assert set(tokens) >= {"fast", "hf"} and all(0 < n <= 3 * 8 * 6 for n in tokens.values())
    if importlib.util.find_spec("vllm") is None:
        assert "vllm: skipped (vLLM is not installed here)" in out.stdout
    ratios = dict(kv.split("=") for kv in out.stdout.strip().splitlines()[-1].split())
    assert "fast_vs_hf" in ratios and float(ratios["fast_vs_hf"]) > 0
