"""The vLLM rollout backend: its missing-package error, and how its outputs become completions."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from reasonmaxxer.cli import train_main
from reasonmaxxer.stages.vllm_backend import completions_from_outputs

EOS = {2, 7}


def _out(index, tokens, finish, stop_reason=None):
    return SimpleNamespace(index=index, token_ids=tuple(tokens), finish_reason=finish, stop_reason=stop_reason)


def test_completions_keep_or_restore_the_stop_token_and_sample_order():
    outputs = [
        SimpleNamespace(outputs=[
            _out(1, [5, 6, 7], "stop", 7),       # stop token kept by vLLM
            _out(0, [5, 6], "stop", 7),          # left out: put back from stop_reason
        ]),
        SimpleNamespace(outputs=[
            _out(0, [9, 9], "stop", None),       # the model's own EOS, left out: the smallest EOS id
            _out(1, [9, 9, 9], "length"),        # ran out of tokens
            _out(2, [4, 2, 4], "stop", None),    # tokens after an EOS are cut
            _out(3, [], "stop", 2),              # EOS as the first token
        ]),
    ]
    assert completions_from_outputs(outputs, EOS) == [
        [([5, 6, 7], "eos"), ([5, 6, 7], "eos")],
        [([9, 9, 2], "eos"), ([9, 9, 9], "length"), ([4, 2], "eos"), ([2], "eos")],
    ]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_missing_vllm_is_one_line_before_any_work(tiny_model_dir, tmp_path, capsys):
    from reasonmaxxer.testing import tiny_run_args

    code = train_main(tiny_run_args(tiny_model_dir, tmp_path / "run", "--rollout.backend", "vllm"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: rollout.backend: 'vllm' needs the vllm package, which is not installed; "
                   "pip install 'reasonmaxxer[vllm]' on a CUDA machine, or use rollout.backend: fast"]
    assert not (tmp_path / "run" / "problems.jsonl").exists()
