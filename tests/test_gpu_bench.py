"""bench/gpu.py, the GPU check, run with --smoke (the same code on CPU at tiny sizes) so it cannot rot.

Every figure the script's plan promises is printed as a `name=value` line and is in the
JSON, every section passes, and a bad --sections value is one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
LINE = re.compile(r"^([A-Za-z0-9_.\-]+)=(.*)$")


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_bench", module)  # its dataclass looks its module up there
    spec.loader.exec_module(sys.modules["gpu_bench"])
    return sys.modules["gpu_bench"]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OUT": str(tmp_path / "out")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_smoke_run_prints_every_figure_and_writes_the_json(tmp_path):
    done = _run(tmp_path, "--smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(m.groups() for m in map(LINE.match, done.stdout.splitlines()) if m)
    bench = _bench_module()
    expected = bench.expected_keys(bench.Plan.smoke())
    # The brief's headline names, and one of each section, whatever the plan says.
    for name in ("gpu_cached_ratio", "gpu_exact_ratio", "kernels_logprobs_grad_rel_err", "kernels_kl_grad_rel_err",
                 "scoring_qwen2.5-0.5b_tokens_per_s", "rollouts_qwen2.5-0.5b_fast_vs_hf", "e2e_training"):
        assert name in expected
    missing = [k for k in expected if k not in printed]
    assert not missing, missing
    data = json.loads((tmp_path / "out" / "gpu.json").read_text())  # $OUT/gpu.json by default
    assert set(expected) <= set(data["figures"])
    assert all(data["sections"][s]["status"] == "pass" for s in bench.SECTIONS), data["sections"]
    assert all(printed[f"e2e_{stage}"] == "pass" for stage in bench.E2E_STAGES)
    # The fused kernels agree with their fp32 references (bf16 rounding of the gradient aside).
    for name in bench.KERNEL_FIGURES:
        assert 0 <= float(printed[f"kernels_{name}_rel_err"]) < 1e-2, name
    assert float(printed["gpu_cached_ratio"]) > 0 and float(printed["rollouts_qwen2.5-0.5b_fast_vs_hf"]) > 0
    assert printed["step_qwen2.5-0.5b_T64_plain_peak_gib"] == "n/a"  # no CUDA memory on CPU: null, not 0
    assert data["figures"]["step_qwen2.5-0.5b_T64_plain_peak_gib"] is None


def test_sections_subset_and_a_bad_name(tmp_path):
    done = _run(tmp_path, "--smoke", "--sections", "env,kernels", "--json", str(tmp_path / "k.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "k.json").read_text())
    assert set(data["sections"]) == {"env", "kernels"}
    bench = _bench_module()
    assert set(bench.expected_keys(bench.Plan.smoke(), ("env", "kernels"))) <= set(data["figures"])
    bad = _run(tmp_path, "--smoke", "--sections", "env,kernals")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --sections: unknown kernals; choose from "
                                               "env, kernels, step, scoring, rollouts, e2e"]


def test_smoke_run_measures_everything_however_slow_the_cpu(tmp_path, monkeypatch, capsys):
    """The budgets bound the GPU run; on CPU (the smoke run) a section past its budget still
    measures every figure: with every budget at 0 s, the step section prints all its figures."""
    bench = _bench_module()
    monkeypatch.setattr(bench, "BUDGET_S", {name: 0 for name in bench.BUDGET_S})
    report = bench.Report(tmp_path / "g.json")
    plan = bench.Plan.smoke()
    bench.run(plan, ("step",), report)
    expected = bench.expected_keys(plan, ("step",))
    assert [k for k in expected if k not in report.figures] == []
    assert report.sections["step"]["status"] == "pass" and report.skipped == []
