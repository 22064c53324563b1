"""bench/rollout_batching.py at a tiny size, so the script cannot rot: both arms run and the budget packs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_both_arms_run_and_the_budget_arm_packs_more_sequences_per_call(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout_batching.py"), "--model", "tiny",
                          "--problems", "6", "--samples", "4", "--max-new-tokens", "6", "--batch-size", "4",
                          "--budget", "100000"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    per_call = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+) .*sequences per call mean ([\d.]+)",
                                                                    out.stdout, re.M)}
    assert per_call == {"count": 4.0, "budget": 24.0}  # 1 prompt a call against all 6 in one
    assert float(out.stdout.strip().splitlines()[-1].split("=")[1]) > 0
