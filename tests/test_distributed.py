"""Two processes on this CPU machine, started by torchrun over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fsdp2_on_cpu, give_mixed_rewards

from reasonmaxxer.core.gate import fork_mask, quantile_threshold
from reasonmaxxer.testing import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from quantile_gate import shared_batch  # noqa: E402

pytestmark = pytest.mark.slow


def _torchrun(script: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None, full: bool = False):
    """Run ``script`` on ``nproc`` processes (``env`` added to the environment); its stdout, or with
    ``full`` the finished process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(WORKERS)]), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc if full else proc.stdout


@pytest.mark.parametrize("quantile", [0.2, 0.5, 1.0])
def test_quantile_gate_over_two_processes_equals_one_process(tmp_path, quantile):
    _torchrun(WORKERS / "quantile_gate.py", str(tmp_path), str(quantile))
    entropy, mask = shared_batch()
    single = fork_mask(entropy, mask, mode="quantile", quantile=quantile)
    single_threshold = quantile_threshold(entropy, mask, quantile)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [p["world"] for p in parts] == [2, 2]
    assert sorted(torch.cat([p["rows"] for p in parts]).tolist()) == list(range(entropy.shape[0]))
    for p in parts:
        assert torch.equal(p["forks"], single[p["rows"]])
        assert torch.equal(p["threshold"], single_threshold)
    # Each process alone would cut at its own quantile, and on this batch that differs.
    alone = [quantile_threshold(entropy[p["rows"]], mask[p["rows"]], quantile) for p in parts]
    if quantile < 1.0:
        assert any(not torch.equal(a, single_threshold) for a in alone)


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_two_processes_split_rollouts_and_scoring_and_train(tiny_model_dir, tmp_path):
    extra = ("--data.num_train", "12", "--gate.mode", "quantile", "--gate.quantile", "0.3")
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "src")}
    for stage in ("problems", "rollouts", "scoring"):
        subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_run_args(tiny_model_dir, one, *extra),
                        "--stage", stage], env=env, check=True, capture_output=True)
        _torchrun(ROOT / "train.py", *tiny_run_args(tiny_model_dir, two, *extra), "--stage", stage)

    # Rollouts: the same file as one process writes, each batch sampled by one process.
    assert _rows(two / "rollouts.jsonl") == _rows(one / "rollouts.jsonl")
    summary = json.loads((two / "stages" / "rollouts.json").read_text())["summary"]
    per_process = summary["batches_per_process"]
    assert len(per_process) == 2 and min(per_process) > 0
    assert sum(per_process) == len(_rows(one / "rollouts.jsonl")) // 4 // 2  # 4 samples, 2 problems a batch
    # Scoring: the same shards, written by both processes.
    shards = sorted(p.name for p in (one / "scores").glob("shard-*.safetensors"))
    assert shards == sorted(p.name for p in (two / "scores").glob("shard-*.safetensors")) and len(shards) > 1
    for name in shards:
        assert (one / "scores" / name).read_bytes() == (two / "scores" / name).read_bytes()

    give_mixed_rewards(two / "rollouts.jsonl")
    evaluated = ("--eval.every_steps", "2", "--eval.num_samples", "3")
    out = _torchrun(ROOT / "train.py", *tiny_run_args(tiny_model_dir, two, *extra, *evaluated))
    assert "2 processes" in out and out.count("ReasonMaxxer run in") == 1  # one report, from the main process
    state = json.loads((two / "stages" / "training.json").read_text())
    assert state["done"] and state["summary"]["steps"] == 3
    assert (two / "adapter" / "adapter_model.safetensors").exists()

    # Held-out pass@1 during training: the problems split over both processes and gathered;
    # before training (the base) it equals what one process measures.
    log = json.loads((two / "train_log.json").read_text())
    evals = {h["step"]: h for h in log if "eval_pass_at_1" in h}
    assert sorted(evals) == [0, 2, 3]
    assert evals[0]["eval_mean_completion_tokens"] == pytest.approx(_base_heldout_tokens(tiny_model_dir, two))


def _base_heldout_tokens(model_dir: Path, run: Path) -> float:
    """Mean completion tokens of the base on the run's held-out problems, at step 0's seed, in this process."""
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.data.problem import read_split
    from reasonmaxxer.training.heldout_eval import sample_heldout, step_seed

    cfg = load_config(None, tiny_run_args(model_dir, run)[1:])
    problems = read_split(run / "problems.jsonl", "heldout")[: cfg.eval.during_training_problems]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sampling = dataclasses.replace(cfg.rollout, num_samples=3, backend="fast")
    found = sample_heldout(model, AutoTokenizer.from_pretrained(model_dir), problems, cfg.data, sampling,
                           seed=step_seed(cfg.seed, 0))
    tokens = [n for p in found.values() for n in p["tokens"]]
    return sum(tokens) / len(tokens)


@pytest.mark.parametrize("quantile", ["0.3"])
def test_online_trainer_under_torchrun_gates_and_advantages_over_both_processes(tiny_model_dir, tmp_path, quantile):
    """method online with two processes: every micro-batch's quantile cut is the one over both
    processes' completion tokens, each process's advantages are its slice of the group advantages
    of the rewards gathered over both, and the compute totals are summed over both."""
    from reasonmaxxer.core.advantages import group_advantages

    _torchrun(WORKERS / "online_steps.py", str(tiny_model_dir), str(tmp_path), quantile)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [2, 2]

    calls = [r["gate_calls"] for r in ranks]
    assert len(calls[0]) == len(calls[1]) >= 2
    for ours, theirs in zip(*calls):  # the same micro-batch on both processes
        width = max(ours["mask"].shape[1], theirs["mask"].shape[1])

        def pad(t, value=0):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        entropy = torch.cat([pad(ours["entropy"]), pad(theirs["entropy"])])
        mask = torch.cat([pad(ours["mask"]), pad(theirs["mask"])])
        together = fork_mask(entropy, mask, mode="quantile", quantile=float(quantile))
        rows = ours["mask"].shape[0]
        assert torch.equal(pad(ours["forks"], False), together[:rows])
        assert torch.equal(pad(theirs["forks"], False), together[rows:])
    # Each process alone would cut at its own quantile; on these batches that differs somewhere.
    assert any(not torch.equal(fork_mask(c["entropy"], c["mask"], mode="quantile", quantile=float(quantile)),
                               c["forks"]) for r in calls for c in r)

    gens = [r["generations"] for r in ranks]
    assert len(gens[0]) == len(gens[1]) >= 1
    n = ranks[0]["num_generations"]
    for ours, theirs in zip(*gens):
        assert torch.equal(ours["rewards"], theirs["rewards"])  # gathered: the same on both
        groups = ours["rewards"].sum(dim=1).float().view(-1, n)
        expected = torch.cat([group_advantages(g, 2.5) for g in groups])
        assert torch.allclose(torch.cat([ours["advantages"], theirs["advantages"]]), expected)

    tokens = [{k: r["compute"][k] for k in ("forward_tokens", "trained_tokens", "flops")} for r in ranks]
    assert tokens[0] == tokens[1]  # summed over processes (wall seconds are each process's own)
    completion_tokens = sum(int(c["mask"].sum()) for r in calls for c in r)
    assert ranks[0]["compute"]["trained_tokens"] > completion_tokens  # prompts + completions, both processes


@pytest.mark.parametrize("launch", ["torchrun", "fsdp.yaml"])
def test_public_trainer_scores_and_trains_on_two_processes(tiny_model_dir, tmp_path, launch):
    """examples/train_on_rollouts.py under torchrun: each process scores its share of the base
    scores, which equal one process's, and the adapter trains and saves once. With fsdp.yaml's
    environment (cpu_ram_efficient_loading) the trainer is given the model by name and loads it
    after the process group exists, where transformers 5.16 leaves zeros outside process 0: it
    gives every process process 0's weights before its base pass."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from reasonmaxxer.stages.scoring import load_scores

    rows = []
    for i in range(6):
        prompt = [{"role": "user", "content": f"What is {i} + {i + 3}?"}]
        rows += [{"prompt": prompt, "reward": float(j % 2), "completion": [
            {"role": "assistant", "content": f"It is {2 * i + 3 + j}." * (1 + j)}]} for j in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for nproc in (1, 2):
        out_dir = tmp_path / f"p{nproc}"
        if launch == "fsdp.yaml":
            out = _torchrun(WORKERS / "public_trainer_by_name.py", str(tiny_model_dir), str(data), str(out_dir),
                            nproc=nproc, env=_launch_env(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
        else:
            out = _torchrun(ROOT / "examples" / "train_on_rollouts.py", "--model", str(tiny_model_dir), "--data",
                            str(data), "--output_dir", str(out_dir), "--max_steps", "2", "--tau", "4.0", nproc=nproc)
        assert out.count("24 rollouts, 2 steps") == nproc
        (folder,) = (out_dir / "base_scores").iterdir()
        runs[nproc] = load_scores(folder)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out_dir))
        assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)
    assert sorted(runs[1]) == sorted(runs[2]) == list(range(24))
    for i in runs[1]:
        for key in runs[1][i]:
            assert torch.equal(runs[1][i][key], runs[2][i][key]), (i, key)


def test_one_and_two_processes_train_on_the_same_rows_per_step(tiny_model_dir, tmp_path):
    """The config's batch is the global batch: on 2 processes each step trains on the rows (and so the
    tokens) one process trains on, with length grouping on; TRL alone would take twice as many."""
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    # Enough rows (400 rollouts) that transformers' length grouping cuts them into megabatches of 50 of one
    # process's batches: grouped by that batch, 1 and 2 processes would order them differently.
    extra = ("--data.num_train", "100", "--training.max_steps", "4", "--training.per_device_train_batch_size", "2",
             "--training.save_steps", "10")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "src")}
    for stage in ("problems", "rollouts"):
        subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_run_args(tiny_model_dir, one, *extra),
                        "--stage", stage], env=env, check=True, capture_output=True)
    give_mixed_rewards(one / "rollouts.jsonl")
    # A length of its own for every row (the tiny model's prompts are alike and its completions all run to
    # max_new_tokens), so the tokens of a step say which rows it trained on.
    rows = [json.loads(line) for line in _rows(one / "rollouts.jsonl")]
    for i, r in enumerate(rows):
        r["prompt_ids"] = (r["prompt_ids"] * 3)[: 20 + i]
        r["completion_ids"], r["finish"] = r["completion_ids"][: 1 + i % 12], "eos"
    (one / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(one, two)
    out_one = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_run_args(tiny_model_dir, one, *extra)],
                             env=env, check=True, capture_output=True, text=True).stdout
    out_two = _torchrun(ROOT / "train.py", *tiny_run_args(tiny_model_dir, two, *extra))
    assert "global batch 2 = 1 process x 2 per device x 1 accumulation" in out_one
    assert "global batch 2 = 2 processes x 1 per device x 1 accumulation" in out_two

    def tokens_per_step(run):
        seen = [h["num_input_tokens_seen"] for h in json.loads((run / "train_log.json").read_text())
                if "loss" in h]
        return [b - a for a, b in zip([0, *seen], seen)]

    assert len(tokens_per_step(one)) == 4 and tokens_per_step(two) == tokens_per_step(one)


def test_collectives_wait_as_long_as_training_ddp_timeout(tmp_path):
    """dist.init(timeout_s) (training.ddp_timeout) bounds a barrier: 6 s late passes a 60 s timeout and
    fails a 2 s one, after about 2 s rather than the 30-minute default."""
    import re

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(WORKERS)])}

    def run(timeout_s, late_s):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(WORKERS / "collective_timeout.py"), str(timeout_s), str(late_s)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    ok = run(60, 6)
    assert ok.returncode == 0, ok.stderr[-2000:]
    waited = float(re.search(r"rank 0 waited ([\d.]+) s", ok.stdout).group(1))
    assert 4 < waited < 30
    # dist.close() (the end of every finished run) leaves the group: gloo threads left behind can abort at exit.
    assert "rank 0 left the group: True" in ok.stdout and "rank 1 left the group: True" in ok.stdout
    short = run(2, 20)
    assert short.returncode != 0
    gave_up = float(re.search(r"rank 0 gave up after ([\d.]+) s", short.stdout).group(1))
    assert gave_up < 10


@pytest.mark.parametrize("launch", [None, "deepspeed_zero3.yaml"])
def test_a_nan_in_one_processs_adapter_stops_every_process(tiny_model_dir, tmp_path, launch):
    """FiniteAdapterCheck combines the processes' verdicts: both stop at step 1, none waits for the other.
    Under ZeRO-3 each process checks its own partition of the weights (the parameter is a placeholder)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(WORKERS)]),
           **(_launch_env(ROOT / "configs" / "accelerate" / launch) if launch else {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKERS / "nonfinite_rank.py"), str(tiny_model_dir), str(tmp_path / "out"),
           "bf16" if launch else "fp32"]  # the ZeRO configs ask for bf16
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped at step 1: training: 1 adapter weight tensor(s) became NaN" in proc.stdout, \
            proc.stdout + proc.stderr[-2000:]
    # The base scores the trainer computed: with the real weights on both processes (ZeRO-3 loads them
    # partitioned; they are gathered for the base pass), equal to one process's.
    import re

    from transformers import AutoModelForCausalLM

    from reasonmaxxer.stages.scoring import score_batch
    from reasonmaxxer.utils.sequences import pack_batch

    sums = [float(x) for x in re.findall(r"base entropy sum ([\d.]+)", proc.stdout)]
    rows = [{"prompt_ids": [5, 6, 7 + i], "completion_ids": [8 + j, 9, 10 + i]} for i in range(4) for j in range(4)]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    packed = pack_batch([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], 2)
    want = float(score_batch(base, packed, top_k=1, chunk_size=8, entropy_temperature=1.0)["entropy"].double().sum())
    assert len(sums) == 2 and all(abs(s - want) < 1e-3 * want for s in sums), (sums, want)


def _launch_env(config_file: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file FILE --num_processes 2`` gives each process,
    computed by accelerate itself."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes", "2",
                                                str(ROOT / "train.py")])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # what accelerate's launch_command sets before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    env = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


# How each config trains on 2 CPU processes: (strategy, wrapper, sharded trainable tensors, adapter tolerance).
# DeepSpeed keeps bf16 weights and sums the gradients in bf16; one process trains fp32 weights under autocast.
LAUNCHES = {
    "ddp.yaml": ("MULTI_CPU", "DistributedDataParallel", "0/28", 1e-3),
    "fsdp.yaml": ("MULTI_CPU", "DistributedDataParallel", "0/28", 1e-3),  # accelerate: FSDP on accelerators only
    "deepspeed_zero2.yaml": ("DEEPSPEED", "DeepSpeedEngine", "0/28", 5e-3),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "DeepSpeedEngine", "28/28", 5e-3),
}


@pytest.mark.parametrize("config_file", list(LAUNCHES))
def test_launch_config_runs_every_stage_on_two_processes_as_one_process_does(tiny_model_dir, tmp_path, config_file):
    """Each shipped accelerate config, on 2 CPU processes (torchrun with accelerate's own environment for
    it): both processes sample and score with the real weights (rollouts and score shards byte-equal to
    one process's, with process 1's batches among them), training records how it ran, the adapter
    matches one process's and loads with plain PEFT. On CPU accelerate runs FSDP as DDP: the run says so."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    launch = _launch_env(ROOT / "configs" / "accelerate" / config_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "src")}
    runs = {1: tmp_path / "one", 2: tmp_path / "two"}
    outputs = {}
    for n, run in runs.items():
        args = tiny_run_args(tiny_model_dir, run)
        for stage in ("problems", "rollouts"):
            if n == 1:
                subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--stage", stage], env=env, check=True,
                               capture_output=True)
            else:
                _torchrun(ROOT / "train.py", *args, "--stage", stage, env=launch)
        give_mixed_rewards(run / "rollouts.jsonl")
        if n == 1:
            outputs[n] = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=env, check=True,
                                        capture_output=True, text=True)
        else:
            outputs[n] = _torchrun(ROOT / "train.py", *args, env=launch, full=True)
    one, two = runs[1], runs[2]
    assert _rows(two / "rollouts.jsonl") == _rows(one / "rollouts.jsonl")
    assert json.loads((two / "stages" / "rollouts.json").read_text())["summary"]["batches_per_process"][1] > 0
    shards = sorted(p.name for p in (one / "scores").glob("shard-*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (two / "scores").glob("shard-*.safetensors"))
    assert all((one / "scores" / s).read_bytes() == (two / "scores" / s).read_bytes() for s in shards)

    parallel = json.loads((two / "stages" / "training.json").read_text())["summary"]["parallel"]
    strategy, wrapper, sharded, tolerance = LAUNCHES[config_file]
    assert (parallel["strategy"], parallel["processes"], parallel["wrapper"], parallel["sharded"]) == (
        strategy, 2, wrapper, sharded)
    asked_fsdp = launch.get("ACCELERATE_USE_FSDP") == "true"
    assert asked_fsdp == (config_file == "fsdp.yaml")
    assert ("mismatch" in parallel) == asked_fsdp
    assert ("the launch asked for FSDP but the trainer runs MULTI_CPU" in outputs[2].stderr) == asked_fsdp

    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (one, two))
    diff = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a) ** 0.5
    relative = float(diff / sum((a[k].float() ** 2).sum() for k in a) ** 0.5)
    print(f"{config_file}: adapter relative difference from one process {relative:.2e}")
    assert a.keys() == b.keys() and relative < tolerance
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(two / "adapter"))
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)
    # The last stage, eval.py (one process), on the 2-process run's adapter.
    args = tiny_run_args(tiny_model_dir, two)
    args[args.index("--output_dir")] = "--run_dir"
    evaluated = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args, "--eval.num_samples", "2",
                                "--eval.movement_rollouts", "6", "--eval.bootstrap", "200"],
                               env=env, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((two / "movement.json").read_text())["positions"]["fork"] > 0


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _fsdp_launch(state_dict_type: str) -> dict[str, str]:
    """fsdp.yaml's environment (its state dict type: sharded), with ``state_dict_type``."""
    shipped = _launch_env(ROOT / "configs" / "accelerate" / "fsdp.yaml")
    assert shipped["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    return {**shipped, "FSDP_STATE_DICT_TYPE": state_dict_type}


def _check_fsdp_run(run: Path, model_dir: Path, state_dict_type: str) -> dict[str, torch.Tensor]:
    """A 3-step run under FSDP2 on 2 processes with checkpoints at steps 2 and 3: every checkpoint holds
    accelerate's resume state (one file per process when sharded, nothing gathered) and the whole adapter
    in PEFT format; the final adapter is the last checkpoint's and loads with plain PEFT. Returns it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = json.loads((run / "stages" / "training.json").read_text())["summary"]
    assert summary["parallel"] == {"strategy": "FSDP", "processes": 2, "wrapper": "FSDPPeftModelForCausalLM",
                                   "sharded": "28/28"}
    final = _adapter(run / "adapter")
    for step in (2, 3):
        checkpoint = run / "checkpoints" / f"checkpoint-{step}"
        if state_dict_type == "SHARDED_STATE_DICT":
            assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
                "__0_0.distcp", "__1_0.distcp"]
            assert not (checkpoint / "pytorch_model_fsdp.bin").exists()
        else:
            assert (checkpoint / "pytorch_model_fsdp.bin").is_file()
        assert (checkpoint / "adapter_config.json").is_file() and _adapter(checkpoint).keys() == final.keys()
    last = _adapter(run / "checkpoints" / "checkpoint-3")
    assert all(torch.equal(final[k], last[k]) for k in final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(run / "adapter"))
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)
    return final


def _resume_from_step_2(run: Path, resumed: Path, args: list[str], launch: dict[str, str]) -> dict[str, torch.Tensor]:
    """``run`` as if killed after its step-2 checkpoint, copied to ``resumed`` and rerun there with ``args``
    (which name ``resumed`` as the output folder): it resumes from that checkpoint (accelerate's FSDP load).
    Returns its final adapter."""
    import shutil

    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-3")
    shutil.rmtree(resumed / "adapter")
    (resumed / "stages" / "training.json").unlink()
    _torchrun(WORKERS / "fsdp_on_cpu.py", str(ROOT / "train.py"), *args, env=launch)
    assert json.loads((resumed / "stages" / "training.json").read_text())["summary"]["resumed_from"] == "2"
    return _adapter(resumed / "adapter")


@fsdp2_on_cpu
@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp2_checkpoints_hold_the_adapter_and_resume_exactly(tiny_model_dir, tmp_path, state_dict_type):
    """fsdp.yaml's environment on 2 CPU processes with accelerate's FSDP really on (the worker lifts its
    GPU-only check): the LoRA weights are DTensors, checkpoints and the final folder hold the whole adapter,
    which matches one process's, and a run resumed from the step-2 checkpoint ends bit-equal."""
    import shutil

    launch = _fsdp_launch(state_dict_type)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "src")}
    two, one = tmp_path / "two", tmp_path / "one"
    args = tiny_run_args(tiny_model_dir, two)  # 3 steps, a checkpoint at steps 2 and 3
    for stage in ("problems", "rollouts"):
        subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--stage", stage], env=env, check=True,
                       capture_output=True)
    give_mixed_rewards(two / "rollouts.jsonl")
    shutil.copytree(two, one)
    _torchrun(WORKERS / "fsdp_on_cpu.py", str(ROOT / "train.py"), *args, env=launch)
    final = _check_fsdp_run(two, tiny_model_dir, state_dict_type)

    # One process, same stored rollouts and scores: FSDP's bf16 compute against autocast's.
    subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_run_args(tiny_model_dir, one)], env=env, check=True,
                   capture_output=True)
    reference = _adapter(one / "adapter")
    diff = sum(((final[k].float() - reference[k].float()) ** 2).sum() for k in final) ** 0.5
    relative = float(diff / sum((reference[k].float() ** 2).sum() for k in final) ** 0.5)
    print(f"FSDP2 {state_dict_type}: adapter relative difference from one process {relative:.2e}")
    assert final.keys() == reference.keys() and relative < 1e-3
    # Both processes scored with the real weights (fsdp.yaml loads with cpu_ram_efficient_loading).
    shards = sorted(p.name for p in (one / "scores").glob("shard-*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (two / "scores").glob("shard-*.safetensors"))
    assert all((one / "scores" / s).read_bytes() == (two / "scores" / s).read_bytes() for s in shards)

    resumed = tmp_path / "resumed"
    again = _resume_from_step_2(two, resumed, tiny_run_args(tiny_model_dir, resumed), launch)
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


@fsdp2_on_cpu
def test_online_method_under_fsdp2_checkpoints_and_resumes_exactly(tiny_model_dir, tmp_path):
    """method online (TRL's GRPOTrainer, gated) under fsdp.yaml as shipped, FSDP really on: it samples
    through the sharded model, saves sharded checkpoints with the whole adapter, and a run resumed from
    the step-2 checkpoint samples and trains to the same adapter, bit for bit."""
    launch = _fsdp_launch("SHARDED_STATE_DICT")
    run = tmp_path / "run"
    args = ["--no-progress", "--method", "online", "--model.name_or_path", str(tiny_model_dir),
            "--data.num_train", "8", "--data.num_heldout", "4", "--rollout.num_samples", "4",
            "--rollout.max_new_tokens", "8", "--training.per_device_train_batch_size", "4",
            "--training.max_steps", "3", "--training.save_steps", "2", "--training.learning_rate", "0.05",
            "--grpo.gradient_checkpointing", "false", "--reward.function", "online_steps:odd_token_reward"]
    _torchrun(WORKERS / "fsdp_on_cpu.py", str(ROOT / "train.py"), *args, "--output_dir", str(run), env=launch)
    final = _check_fsdp_run(run, tiny_model_dir, "SHARDED_STATE_DICT")
    resumed = tmp_path / "resumed"
    again = _resume_from_step_2(run, resumed, [*args, "--output_dir", str(resumed)], launch)
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


@fsdp2_on_cpu
def test_policy_statistics_under_fsdp2_equal_the_unsharded_ones(tiny_model_dir):
    """FSDP2 (torch's fully_shard, per decoder layer and root) on 2 processes: the LM head is a sharded
    DTensor, so the fused head steps aside and the statistics run through the module, equal to the
    unsharded model's, and backward runs. A NaN in one process's shard of the adapter stops both."""
    out = _torchrun(WORKERS / "fsdp2_head.py", str(tiny_model_dir))
    for rank in (0, 1):
        assert f"rank {rank}: fused head not used, logp diff 0.00e+00, kl diff 0.00e+00" in out, out
        assert f"rank {rank}: NaN in a shard stops this process" in out, out  # FiniteAdapterCheck on DTensors


def test_vllm_rollouts_on_several_processes_are_refused_with_the_way_to_run_them(tiny_model_dir, tmp_path):
    """rollout.backend vllm on N ranks: one engine in one process samples (tensor parallel over its GPUs);
    under torchrun the rollouts stage stops in one line that says how to run it, before it samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *tiny_run_args(tiny_model_dir, run, "--rollout.backend", "vllm", "--stage", "rollouts")]
    subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_run_args(tiny_model_dir, run, "--stage", "problems")],
                   env=env, check=True, capture_output=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: rollout.backend: vllm uses the GPUs of one process; run `--stage rollouts` with `python "
            "train.py`, then the other stages with torchrun") in proc.stderr
    assert not (run / "rollouts.jsonl").exists()
