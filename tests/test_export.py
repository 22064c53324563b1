"""train.py --merge: the base with the adapter folded in, loadable without PEFT."""

from __future__ import annotations

import shutil

import pytest
import torch

from reasonmaxxer.cli import train_main
from reasonmaxxer.testing import tiny_run_args


def test_merge_without_a_trained_adapter_is_one_line_and_runs_nothing(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "fresh"
    assert train_main(tiny_run_args(tiny_model_dir, run, "--stage", "problems", "--merge")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: --merge: no trained adapter in '{run / 'adapter'}'; run training first "
                   "(train.py without --stage, or --stage training)"]
    assert not (run / "problems.jsonl").exists()


@pytest.mark.slow
def test_merged_model_equals_base_plus_adapter(trained_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # A copy: the shared run stays as other tests expect it. Its own config.yaml gives the settings
    # it was trained with, so every stage is skipped and only the merge runs.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # Merged in float32 (model.dtype is in no stage's fingerprint): base + adapter is then exact to compare.
    code = train_main(["--config", str(run / "config.yaml"), "--output_dir", str(run), "--no-progress", "--merge",
                       "--model.dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"merged model (base + adapter, loads without PEFT): {run / 'merged'}/" in out
    assert all("skipped" in line for line in out.splitlines() if line.startswith("training"))

    merged_dir = run / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.randint(3, merged.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = policy(ids).logits
        got = merged.eval()(ids).logits
        with policy.disable_adapter():
            plain = policy(ids).logits
    assert (expected - plain).abs().max() > 1e-4  # the adapter changes the logits, so the match below means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # The adapter folder's card is ReasonMaxxer's, not PEFT's placeholder.
    card = (run / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "Fork-gated LoRA" in card and "Steps: 3;" in card
