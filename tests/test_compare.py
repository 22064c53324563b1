"""Head-to-head on equal compute: compare files, the compute ratio, offline compute.json, an end-to-end compare."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from reasonmaxxer.errors import ConfigError
from reasonmaxxer.evaluation.comparison import (
    AT_FIRST,
    NOT_REACHED,
    REACHED,
    _interval_text,
    bootstrap_ratio,
    compute_ratio,
    compute_to_reach,
    percentile_with_inf,
    ratio_text,
)
from reasonmaxxer.jobs.compare import load_compare
from reasonmaxxer.testing import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]


def _compare_file(tmp_path, **content):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_compute_to_reach_interpolates_the_first_crossing():
    flops, deltas, wall = [1.0, 2.0, 4.0], [0.0, 0.1, 0.3], [10.0, 20.0, 40.0]
    hit = compute_to_reach(flops, deltas, 0.2, wall)
    # between (2, 0.1) and (4, 0.3): t = (0.2 - 0.1) / 0.2 = 0.5 -> 2 + 0.5 * 2 = 3 FLOPs, 20 + 0.5 * 20 = 30 s
    assert hit == {"flops": pytest.approx(3.0), "wall_seconds": pytest.approx(30.0), "status": REACHED}
    assert compute_to_reach(flops, deltas, 0.5, wall) == {"flops": 4.0, "wall_seconds": 40.0, "status": NOT_REACHED}
    assert compute_to_reach(flops, deltas, -0.1, wall)["status"] == AT_FIRST
    # a dip after the first crossing does not matter: the first crossing counts
    assert compute_to_reach([1, 2, 3], [0.0, 0.4, 0.1], 0.2)["flops"] == pytest.approx(1.5)


def test_spent_lines_warn_when_an_arm_is_off_the_budget():
    from reasonmaxxer.evaluation.comparison import spent_lines

    spent = {"tokens_per_sample_estimate": 192, "tokens_per_sample_measured": 96.4,
             "arms": {"grpo": {"fraction_by_seed": {"0": 0.5, "1": 0.52}}, "offline": {"fraction_by_seed": {"0": 1.0}}}}
    text = "\n".join(spent_lines(4e13, spent))
    assert "| grpo | 0.50 to 0.52 |" in text and "| offline | 1.00 |" in text
    assert "Tokens per sample: 192 estimated, 96 measured by the RL runs." in text
    assert "**grpo spent more than 25% off the budget of 4e+13 FLOPs**: set `tokens_per_sample: 96`" in text
    spent["arms"]["grpo"]["fraction_by_seed"] = {"0": 0.76, "1": 1.24}  # within 25% either way: no warning
    assert "spent more than" not in "\n".join(spent_lines(4e13, spent))


def test_compute_ratio_and_its_lower_bound():
    reference = {"flops": [2.0, 5.0], "delta": [0.05, 0.2], "wall_seconds": [100.0, 200.0]}
    arm = {"flops": [1.0, 2.0, 4.0], "delta": [0.0, 0.1, 0.3], "wall_seconds": [10.0, 20.0, 40.0]}
    r = compute_ratio(arm, reference)
    assert r["ratio"] == pytest.approx(3.0 / 5.0) and r["wall_ratio"] == pytest.approx(30.0 / 200.0)
    assert ratio_text(r) == "0.6×"
    # the reverse: the reference must reach 0.3, which it never does within its 5 FLOPs
    back = compute_ratio(reference, arm)
    assert back["status"] == NOT_REACHED and back["ratio"] == pytest.approx(5.0 / 4.0)
    assert ratio_text(back) == "> 1.2×"


def test_percentile_with_inf_matches_numpy_and_is_infinite_where_an_infinity_weighs():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40, 1000):
        values = rng.normal(size=n)
        for q in (0.0, 2.5, 50.0, 97.5, 100.0):
            assert percentile_with_inf(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    # 40 values, 4 of them infinite: position (40 - 1) * 0.975 = 38.025 lies between two infinities,
    # position 39 * 0.025 = 0.975 between the two smallest finite values
    values = np.array([np.inf] * 4 + list(range(36)), dtype=float)
    assert percentile_with_inf(values, 97.5) == np.inf
    assert percentile_with_inf(values, 2.5) == pytest.approx(0.975)
    # one infinity with weight 0.025 still makes the bound infinite; with weight 0 it does not
    values = np.array(list(range(39)) + [np.inf], dtype=float)
    assert percentile_with_inf(values, 97.5) == np.inf and percentile_with_inf(values, 100 * 38 / 39) == 38.0
    assert percentile_with_inf(np.full(5, np.inf), 2.5) == np.inf


def _brute_force_ratio_interval(arm_by_seed, ref_by_seed, arm_flops, ref_flops, resamples, seed):
    """The hierarchical bootstrap written out with loops: the same draws, the crossing found by
    walking the curve point by point, the 2.5/97.5 percentiles by sorting."""
    rng = np.random.default_rng(seed)
    n = len(arm_by_seed)
    ratios = []
    for _ in range(resamples):
        arm_curve = [0.0] * arm_by_seed[0].shape[0]
        ref_curve = [0.0] * ref_by_seed[0].shape[0]
        for s in rng.integers(0, n, size=n):
            q = arm_by_seed[s].shape[1]
            cols = rng.integers(0, q, size=q)
            for i in range(len(arm_curve)):
                arm_curve[i] += sum(arm_by_seed[s][i, c] for c in cols) / q / n
            for i in range(len(ref_curve)):
                ref_curve[i] += sum(ref_by_seed[s][i, c] for c in cols) / q / n
        target, ratio = ref_curve[-1], float("inf")
        for i, y in enumerate(arm_curve):
            if y >= target:
                x = arm_flops[0] if i == 0 else arm_flops[i - 1] + (target - arm_curve[i - 1]) / (
                    y - arm_curve[i - 1]) * (arm_flops[i] - arm_flops[i - 1])
                ratio = x / ref_flops[-1]
                break
        ratios.append(ratio)
    ratios.sort()
    bounds = []
    for q in (0.025, 0.975):
        h = (resamples - 1) * q
        lo = int(h)
        frac = h - lo
        bound = ratios[lo] if frac == 0 else (
            float("inf") if ratios[lo + 1] == float("inf") else ratios[lo] + frac * (ratios[lo + 1] - ratios[lo]))
        bounds.append(None if bound == float("inf") else bound)
    return bounds


def test_bootstrap_ratio_matches_a_brute_force_bootstrap():
    rng = np.random.default_rng(1)
    # two seeds of 12 and 9 problems; the arm's curve has 3 points, the reference's 2. The arm
    # sometimes misses the reference's final Δ, so some replicates are infinite.
    arm_by_seed = [rng.choice([-1.0, 0.0, 0.0, 1.0], size=(3, q)) + np.array([[0.0], [0.1], [0.3]]) for q in (12, 9)]
    ref_by_seed = [rng.choice([-1.0, 0.0, 1.0], size=(2, q)) + np.array([[0.0], [0.2]]) for q in (12, 9)]
    arm_flops, ref_flops = [1.0, 2.0, 4.0], [2.0, 5.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN from inf - inf inside a percentile
        got = bootstrap_ratio(arm_by_seed, ref_by_seed, arm_flops, ref_flops, resamples=400, seed=7)
        back = bootstrap_ratio(ref_by_seed, arm_by_seed, ref_flops, arm_flops, resamples=400, seed=7)
    for result, args in ((got, (arm_by_seed, ref_by_seed, arm_flops, ref_flops)),
                         (back, (ref_by_seed, arm_by_seed, ref_flops, arm_flops))):
        expected = _brute_force_ratio_interval(*args, resamples=400, seed=7)
        assert [b is None for b in result] == [b is None for b in expected]
        assert [b for b in result if b is not None] == pytest.approx([b for b in expected if b is not None])
    assert got[0] is not None  # a finite lower bound, so the test exercised the interpolation


def test_bootstrap_ratio_edge_cases():
    flat_arm = [np.full((2, 5), 0.1), np.full((2, 4), 0.1)]
    flat_ref = [np.tile([[0.0], [0.2]], 5), np.tile([[0.0], [0.2]], 4)]
    # no replicate reaches the reference's final 0.2: both bounds infinite, shown as "∞ to ∞"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        never = bootstrap_ratio(flat_arm, flat_ref, [1.0, 2.0], [1.0, 4.0], resamples=50, seed=0)
    assert never == [None, None] and _interval_text(never) == "∞ to ∞"
    # every problem the same: every replicate is the point estimate, so the interval collapses onto it
    up = [np.tile([[0.1], [0.3]], 5), np.tile([[0.1], [0.3]], 4)]
    point = compute_ratio({"flops": [1.0, 3.0], "delta": [0.1, 0.3]}, {"flops": [1.0, 4.0], "delta": [0.0, 0.2]})
    interval = bootstrap_ratio(up, flat_ref, [1.0, 3.0], [1.0, 4.0], resamples=50, seed=0)
    assert interval == pytest.approx([point["ratio"], point["ratio"]]) and point["ratio"] == pytest.approx(2.0 / 4.0)
    # nothing to resample: no interval at all, shown as a dash (not as an unbounded one)
    assert bootstrap_ratio([], [], [1.0], [1.0], resamples=10, seed=0) is None
    assert bootstrap_ratio(up, flat_ref[:1], [1.0, 3.0], [1.0, 4.0], resamples=10, seed=0) is None
    assert _interval_text(None) == "–" and _interval_text([0.5, None]) == "0.5 to ∞"


@pytest.mark.parametrize("content, message", [
    ({"budget": 1e9, "arms": [{"name": "a"}], "seedz": [0]}, "seedz: unknown key (did you mean 'seeds'?)"),
    ({"arms": [{"name": "a"}]}, "budget: missing"),
    ({"budget": -1, "arms": [{"name": "a"}]}, "budget: must be > 0"),
    ({"budget": "lots", "arms": [{"name": "a"}]}, "budget: expected a number"),
    ({"budget": 1e9, "arms": []}, "arms: expected a non-empty list"),
    ({"budget": 1e9, "arms": [{"name": "a"}, {"name": "a"}]}, "arms[1]: name 'a' is used twice"),
    ({"budget": 1e9, "arms": [{"name": "a", "overrides": {"lora.r": 4}}]}, "arms[0] (a): lora.r: arms must share"),
    ({"budget": 1e9, "arms": [{"name": "a", "overrides": {"rollout": {"temperature": 1.0}}}]},
     "arms[0] (a): rollout.temperature: arms must share"),
    ({"budget": 1e9, "arms": [{"name": "a", "overrides": {"training.max_steps": 5}}]},
     "arms[0] (a): training.max_steps: arms must share"),
    ({"budget": 1e9, "checkpoints": [0.5, 2], "arms": [{"name": "a"}]}, "checkpoints: fractions of the budget"),
    ({"budget": 1e9, "seeds": [0, 0], "arms": [{"name": "a"}]}, "seeds: a seed is listed twice"),
    ({"budget": 1e9, "reference": "b", "arms": [{"name": "a"}]}, "reference: 'b' is not an arm"),
])
def test_bad_compare_files_fail_with_one_line(tmp_path, capsys, content, message):
    from reasonmaxxer.cli import train_main

    path = _compare_file(tmp_path, **content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_compare(path)
    assert train_main(["--compare", str(path), "--plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"compare file '{path}'" in err and message in err


def test_a_bad_arm_key_names_the_compare_file(tmp_path, capsys, tiny_model_dir):
    from reasonmaxxer.cli import train_main

    path = _compare_file(tmp_path, budget=1e9, n_params=1000, arms=[{"name": "a", "overrides": {"gate.tua": 1}}])
    assert train_main([*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--compare", str(path), "--plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: compare file '{path}': gate.tua: unknown key (did you mean 'tau'?)"


def test_shipped_compare_files_validate():
    """Every arm loads against the schema; the grpo/online arms where the schema has ``method``."""
    import dataclasses

    from reasonmaxxer.config import Config
    from reasonmaxxer.jobs.compare import plan_runs

    has_method = "method" in {f.name for f in dataclasses.fields(Config)}
    for name in ("demo.yaml", "qwen2.5-0.5b.yaml"):
        spec = load_compare(ROOT / "configs" / "compare" / name)
        assert [a.name for a in spec.arms] == ["offline-forks", "offline-dense", "grpo", "grpo-80-20", "online-forks"]
        assert spec.reference == "offline-forks"
        if not has_method:
            spec.arms = [a for a in spec.arms if "method" not in a.overrides]
        runs = plan_runs(spec, [], n_params=spec.n_params or 134_515_008)
        offline = [r for r in runs if r.method == "offline"]
        assert offline and all(len(r.runs) == len(spec.checkpoints) for r in offline)
        # the largest scale spends about the budget (the estimate the scales are chosen from)
        assert offline[0].runs[-1][1] > offline[0].runs[0][1]


def test_plan_prints_without_running(tiny_model_dir, tmp_path, capsys):
    from reasonmaxxer.cli import train_main

    path = _compare_file(tmp_path, name="t", budget=1e9, seeds=[0, 1], checkpoints=2, offline_scales=[0.5, 1],
                         arms=[{"name": "forks"}, {"name": "dense", "overrides": {"gate.mode": "all"}}])
    assert train_main([*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--compare", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "compare t: 2 arms x 2 seed(s)" in out and "budget 1e+09 FLOPs" in out
    assert "scale=0.5 (data.num_train 3, training.max_steps 2" in out  # tiny run: 6 problems, 3 steps
    assert out.count("to run") == 8 and "estimated time" in out
    assert not (tmp_path / "run").exists()


@pytest.fixture()
def mixed_verify(monkeypatch):
    """A random tiny model solves nothing: reward by a hash of the text so problems are mixed."""
    import zlib

    import reasonmaxxer.stages.rollouts as rollouts_module

    monkeypatch.setattr(rollouts_module, "verify", lambda text, answer, *_: (float(zlib.crc32(text.encode()) % 2), None))


@pytest.mark.slow
def test_compare_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path, monkeypatch, mixed_verify, capsys):
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.jobs import compare as compare_module
    from reasonmaxxer.training.trainer import ForkGatedTrainer

    trained_batches: list[tuple[str, int]] = []  # (run's checkpoints folder, non-padding positions) per micro-batch
    real_loss = ForkGatedTrainer.compute_loss

    def counting_loss(self, model, inputs, *args, **kwargs):
        trained_batches.append((self.args.output_dir, int(inputs["attention_mask"].sum())))
        return real_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ForkGatedTrainer, "compute_loss", counting_loss)
    path = _compare_file(tmp_path, name="t", budget=1e9, seeds=[0], checkpoints=[0.5, 1.0], offline_scales=[0.5, 1],
                         arms=[{"name": "forks"}, {"name": "dense", "overrides": {"gate.mode": "all"}}])
    args = [*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--eval.num_samples", "2", "--eval.bootstrap", "100",
            "--eval.movement_rollouts", "4", "--eval.greedy", "false", "--compare", str(path)]
    assert train_main(args) == 0
    root = tmp_path / "run" / "compare" / "t"
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (root / name).stat().st_size > 0
    result = json.loads((root / "compare.json").read_text())
    assert set(result["curves"]) == {"forks", "dense"} and len(result["curves"]["forks"]) == 2
    assert [r["arm"] for r in result["ratios"]] == ["dense"]
    md = (root / "compare.md").read_text()
    assert "| dense |" in md and "× reference" in md

    # compute.json of the scale-1 fork-gated run, by hand
    run_dir = root / "runs" / "forks" / "seed=0" / "scale=1"
    record = json.loads((run_dir / "compute.json").read_text())
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    sequence_tokens = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rollouts)
    batches = [n for folder, n in trained_batches if Path(folder) == run_dir / "checkpoints"]
    assert len(batches) == 3  # 3 steps of one micro-batch
    assert record["total"]["forward_tokens"] == 2 * sequence_tokens  # rollouts + scoring (kl_anchor cached)
    assert record["total"]["trained_tokens"] == sum(batches)
    n = record["n_params"]
    assert record["total"]["flops"] == pytest.approx(2 * n * 2 * sequence_tokens + 6 * n * sum(batches))
    by_step = {c["step"]: c for c in record["checkpoints"]}
    assert by_step[2]["trained_tokens"] == sum(batches[:2])  # save_steps 2
    assert 0 < by_step[2]["wall_seconds"] < record["total"]["wall_seconds"]
    points = result["points"]["forks"]
    movement = json.loads((root / "evals" / "forks" / "seed=0" / "scale=1" / "movement.json").read_text())
    assert points[-1]["fork_shifted"] == movement["fork"]["shifted"] is not None
    assert points[-1]["kl_share_top20_entropy"] == movement["kl_share_top20_entropy"] is not None
    assert [p["flops"] for p in points][-1] == pytest.approx(record["total"]["flops"])
    # every arm of the seed is evaluated on the same held-out problems and the same base samples
    assert {tuple(sorted(p["per_problem_delta"])) for ps in result["points"].values() for p in ps} .__len__() == 1
    assert (root / "seeds" / "seed=0" / "eval_samples" / "base_samples.jsonl").exists()

    # a rerun redoes nothing
    calls = []
    monkeypatch.setattr(compare_module, "_eval_point", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(compare_module, "_run_pipeline", lambda *a, **k: calls.append(1))
    assert train_main(args) == 0
    assert calls == []
    assert json.loads((root / "compare.json").read_text())["curves"] == result["curves"]


@pytest.mark.slow
def test_compare_with_a_grpo_arm_resumes_and_refuses_changed_settings(tiny_model_dir, tmp_path, monkeypatch,
                                                                       mixed_verify, capsys):
    """An RL arm is trained once, evaluated at its checkpoints, reused by a rerun; a point or run made
    with other settings stops the compare with one line instead of being reused."""
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.jobs import compare as compare_module
    from reasonmaxxer.models.loading import load_model

    n_params = sum(p.numel() for p in load_model(str(tiny_model_dir), dtype="float32", device="cpu").parameters())
    # 4 steps of 4 samples at the estimate's 40 tokens each (8N per token: generated and trained)
    budget = 4 * 8 * n_params * 4 * 40
    path = _compare_file(tmp_path, name="t", budget=budget, seeds=[0], checkpoints=[0.5, 1.0], offline_scales=[1],
                         tokens_per_sample=40,
                         arms=[{"name": "forks"}, {"name": "grpo", "overrides": {
                             "method": "grpo", "grpo.gradient_checkpointing": False}}])
    args = [*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--rollout.max_new_tokens", "8", "--eval.num_samples", "2", "--eval.bootstrap", "100",
            "--eval.movement_rollouts", "4", "--eval.greedy", "false", "--compare", str(path)]
    assert train_main(args) == 0
    root = tmp_path / "run" / "compare" / "t"
    result = json.loads((root / "compare.json").read_text())
    run_dir = root / "runs" / "grpo" / "seed=0"
    record = json.loads((run_dir / "compute.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [1, 2, 3, 4]  # save_steps: 4 steps // (2 x 2 fractions)
    grpo_points = result["points"]["grpo"]
    assert grpo_points and all(p["method"] == "grpo" and p["fingerprint"] for p in grpo_points)
    by_step = {c["step"]: c["flops"] for c in record["checkpoints"]}
    for p in grpo_points:  # each point is the checkpoint nearest its fraction of the budget
        assert p["flops"] == by_step[p["step"]]
        assert abs(p["flops"] - p["fraction"] * budget) == min(abs(f - p["fraction"] * budget)
                                                              for f in by_step.values())
    md = (root / "compare.md").read_text()
    assert "| grpo |" in md and "## Budget spent" in md
    spent = result["spent"]
    assert spent["tokens_per_sample_estimate"] == 40
    assert spent["tokens_per_sample_measured"] == pytest.approx(record["total"]["trained_tokens"] / (4 * 4))
    assert spent["arms"]["grpo"]["fraction_by_seed"] == {"0": pytest.approx(record["total"]["flops"] / budget)}
    assert spent["arms"]["forks"]["fraction_by_seed"]["0"] == pytest.approx(
        result["points"]["forks"][-1]["flops"] / budget)

    # a rerun trains and evaluates nothing
    calls = []
    real_eval, real_pipeline = compare_module._eval_point, compare_module._run_pipeline
    monkeypatch.setattr(compare_module, "_eval_point", lambda *a, **k: calls.append("eval"))
    monkeypatch.setattr(compare_module, "_run_pipeline", lambda *a, **k: calls.append("run"))
    assert train_main(args) == 0 and calls == []
    monkeypatch.setattr(compare_module, "_eval_point", real_eval)
    monkeypatch.setattr(compare_module, "_run_pipeline", real_pipeline)
    capsys.readouterr()

    # evaluated otherwise: the finished offline point is not reused
    changed_eval = [a if a != "2" or args[i - 1] != "--eval.num_samples" else "3" for i, a in enumerate(args)]
    assert train_main(changed_eval) == 2
    err = capsys.readouterr().err.strip()
    point = root / "points" / "forks" / "seed=0" / "scale=1.json"
    assert err.count("\n") == 0 and f"'{point}' was made with other settings" in err

    # another budget: the GRPO run would train other steps; its folder is not silently reused
    (path.write_text(path.read_text().replace(f"budget: {budget}", f"budget: {2 * budget}")))
    assert f"budget: {2 * budget}" in path.read_text()
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"'{run_dir}' holds a run made with a different config" in err
    assert "max_steps" in err
