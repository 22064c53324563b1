"""bench/head.py on CPU at a tiny size, so the script cannot rot: every path runs and agrees with the unfused one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_path_matches_the_unfused_head_and_the_last_line_has_the_ratios(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "head.py"), "--device", "cpu", "--batch", "2",
                          "--length", "24", "--hidden", "16", "--vocab", "300", "--top-k", "8", "--reps", "1",
                          "--chunk-mb", "1,256"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    fused = [line for line in lines if "fused," in line]
    # 2 anchors x 2 chunk sizes x (factored, recomputed)
    assert len(fused) == 8 and sum("recomputed" in line for line in fused) == 4
    for line in fused:
        diffs = [float(x) for x in re.findall(r"(?:logp|top-k|kl|grad_hidden) ([0-9.e+-]+)", line)]
        assert len(diffs) == 3 and max(diffs) < 1e-5, line
    last = dict(kv.split("=") for kv in lines[-1].split())
    assert set(last) == {"fused_time_ratio", "factored_vs_recompute", "fused_memory_multiple"}
    assert float(last["fused_time_ratio"]) > 0 and float(last["factored_vs_recompute"]) > 0
    assert last["fused_memory_multiple"] == "nan"  # no peak memory is read on CPU
