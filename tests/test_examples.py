"""examples/: each script runs end to end on the tiny model, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def _trained_adapter(base_dir: Path, adapter_dir: Path) -> bool:
    """The adapter loads with plain PEFT on its base and has moved from its zero init."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    return any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)


def test_train_on_rollouts_reads_a_chat_jsonl(tiny_model_dir, tmp_path):
    rows = []
    for i in range(4):
        prompt = [{"role": "user", "content": f"What is {i} + {i + 3}?"}]
        for j in range(4):
            rows.append({"prompt": prompt, "reward": float(j < 2),
                         "completion": [{"role": "assistant", "content": f"It is {2 * i + 3 + j}." * (1 + j)}]})
    data = tmp_path / "rollouts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _run("train_on_rollouts.py", "--model", str(tiny_model_dir), "--data", str(data), "--output_dir",
               str(tmp_path / "adapter"), "--max_steps", "2", "--tau", "4.0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "16 rollouts, 2 steps" in out.stdout
    assert _trained_adapter(tiny_model_dir, tmp_path / "adapter")


def test_train_on_rollouts_reads_the_pipelines_rollouts(tiny_model_dir, trained_run, tmp_path):
    """train.py's own rollouts.jsonl (token ids and rewards) is a dataset the public trainer takes as is."""
    out = _run("train_on_rollouts.py", "--model", str(tiny_model_dir), "--data", str(trained_run / "rollouts.jsonl"),
               "--output_dir", str(tmp_path / "adapter"), "--max_steps", "1", "--tau", "4.0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _trained_adapter(tiny_model_dir, tmp_path / "adapter")


@pytest.mark.slow
def test_gated_grpo_swaps_the_trainer(tiny_model_dir, tmp_path):
    out = _run("gated_grpo.py", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "adapter"),
               "--max_steps", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 steps, last reward" in out.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter" / "compute.json").read_text())["total"]["trained_tokens"] > 0
