"""Sweeps: W&B grid expansion, validation, reuse of shared stages, resume, agent mode."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from reasonmaxxer.config.loading import parse_overrides
from reasonmaxxer.errors import ConfigError
from reasonmaxxer.jobs.sweep import expand_grid, load_sweep, point_args, sweep_configs
from reasonmaxxer.testing import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path, parameters, **extra):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": parameters, **extra}))
    return path


def test_grid_expands_like_wandb():
    params = {"lora.r": {"value": 8}, "gate.tau": {"values": [1.0, 2.0]},
              "gate.mode": {"values": ["threshold", "random"]}}
    # W&B: parameters sorted by name, Cartesian product with the last name varying fastest.
    expected = []
    for mode in ["threshold", "random"]:
        for tau in [1.0, 2.0]:
            expected.append({"gate.mode": mode, "gate.tau": tau, "lora.r": 8})
    assert expand_grid(params) == expected


def test_grid_expands_int_and_q_uniform():
    assert [p["lora.r"] for p in expand_grid({"lora.r": {"min": 2, "max": 4}})] == [2, 3, 4]
    taus = [p["gate.tau"] for p in expand_grid({"gate.tau": {"min": 1.0, "max": 2.0, "q": 0.25}})]
    assert taus == pytest.approx([1.0, 1.25, 1.5, 1.75])


def test_point_args_are_what_the_cli_takes():
    point = {"gate.tau": 1.4, "gate.mode": "random", "tracking.tags": ["a"], "selection.drop_truncated": True}
    args = point_args(point)
    assert "--gate.tau=1.4" in args
    assert parse_overrides(args) == {"gate": {"tau": 1.4, "mode": "random"}, "tracking": {"tags": ["a"]},
                                     "selection": {"drop_truncated": True}}


def test_shipped_sweeps_validate_against_the_demo():
    demo = str(ROOT / "configs" / "demo.yaml")
    tau = sweep_configs(demo, [], load_sweep(ROOT / "configs" / "sweeps" / "tau.yaml"))
    assert len(tau) == 12
    assert {(c.gate.mode, c.gate.tau) for _, c in tau} == {(m, t) for m in ("threshold", "random", "all")
                                                          for t in (1.4, 1.8, 2.2, 2.6)}
    rho = sweep_configs(demo, [], load_sweep(ROOT / "configs" / "sweeps" / "rho.yaml"))
    assert [c.gate.quantile for _, c in rho] == [0.05, 0.1, 0.2, 0.4]
    assert all(c.gate.mode == "quantile" for _, c in rho)


@pytest.mark.parametrize("params, extra, message", [
    ({"gate.tua": {"values": [1.0]}}, {}, "gate.tua: unknown key (did you mean 'tau'?)"),
    ({"gate.tau": {"values": [-1.0]}}, {}, "gate.tau: must be >= 0"),
    ({"gate.tau": {"values": []}}, {}, "'values' must be a non-empty list"),
    ({"gate.tau": {"distribution": "normal"}}, {}, "is not usable in a grid"),
    ({"gate.tau": {"values": [1.0]}}, {"method": "bayes"}, "method 'bayes' cannot run locally"),
])
def test_bad_sweep_files_fail_before_any_work(tmp_path, params, extra, message):
    path = _sweep_file(tmp_path, params, **extra)
    with pytest.raises(ConfigError) as err:
        sweep_configs(None, [], load_sweep(path))
    assert message in str(err.value) and f"sweep file '{path}'" in str(err.value)


def test_effective_gate_ignores_unused_fields():
    from reasonmaxxer.config.loading import load_config

    a = load_config(None, ["--gate.mode", "all", "--gate.tau", "1.0"]).gate.effective()
    b = load_config(None, ["--gate.mode", "all", "--gate.tau", "2.0"]).gate.effective()
    assert a == b == {"mode": "all"}
    r = load_config(None, ["--gate.mode", "random", "--gate.tau", "1.8"]).gate.effective()
    assert r == {"mode": "random", "tau": 1.8, "entropy_source": "base", "reference": "threshold"}


# ----------------------------------------------------------------------------- seeds


def _row(point, delta_by_problem, *, kl, ci=(None, None), **extra):
    deltas = dict(delta_by_problem)
    return {"point": point, "seed": point.get("seed", 0), "delta_pass_at_1": float(np.mean(list(deltas.values()))),
            "delta_ci95": list(ci), "per_problem_delta": deltas, "kl_mean_all": kl, "fork_fraction": 0.2,
            "kl_ratio": 3.0, "top1_agreement_nonfork": 0.9, "pass_at_1_base": 0.5, "pass_at_1_adapter": 0.6,
            "train_seconds": 10.0, **extra}


def test_points_that_differ_only_in_seed_form_one_group():
    from reasonmaxxer.evaluation.ablation import group_over_seeds

    rows = []
    for mode in ("threshold", "all"):
        for seed in (0, 1, 2):
            # Seeds hold different numbers of problems: the group mean is over seeds, not pooled problems.
            deltas = {f"p{i}": (seed + 1) * (0.1 if mode == "threshold" else -0.1) * (i % 2) for i in range(2 + seed)}
            rows.append(_row({"gate.mode": mode, "gate.tau": 1.4, "seed": seed}, deltas, kl=0.01 * (seed + 1)))
    rows.append(dict(rows[0]))  # seed 0 of threshold listed twice (a repeated grid value): counted once
    groups = group_over_seeds(rows, resamples=500, seed=0)
    assert [g["point"] for g in groups] == [{"gate.mode": "threshold", "gate.tau": 1.4},
                                            {"gate.mode": "all", "gate.tau": 1.4}]
    assert [g["label"] for g in groups] == ["mode=threshold", "mode=all"]  # tau is the same everywhere
    threshold = groups[0]
    assert threshold["seeds"] == [0, 1, 2] and threshold["interval_over"] == "seeds and problems"
    per_seed = [np.mean([(s + 1) * 0.1 * (i % 2) for i in range(2 + s)]) for s in (0, 1, 2)]
    assert [s["delta_pass_at_1"] for s in threshold["per_seed"]] == pytest.approx(per_seed)
    assert threshold["delta_pass_at_1"] == pytest.approx(np.mean(per_seed))
    assert threshold["kl_mean_all"] == pytest.approx(0.02)
    lo, hi = threshold["delta_ci95"]
    assert lo <= threshold["delta_pass_at_1"] <= hi and lo < hi


def test_paired_differences_pair_by_seed_and_problem():
    from reasonmaxxer.evaluation.ablation import paired_differences

    gate_a = {0: {"p1": 0.5, "p2": 0.0, "p3": 0.25}, 1: {"q1": 1.0, "q2": -0.5}, 2: {"r1": 0.75}}
    gate_b = {0: {"p3": 0.0, "p1": 0.25, "p2": 0.5}, 1: {"q2": -0.25, "q1": 0.5, "q9": 1.0},  # no seed 2
              3: {"s1": 0.5}}  # seed 3: no problem in common with gate_a (which has no seed 3 either)
    rows = [_row({"gate.mode": "threshold", "seed": s}, d, kl=0.1) for s, d in gate_a.items()]
    rows += [_row({"gate.mode": "random", "seed": s}, d, kl=0.1) for s, d in gate_b.items()]
    rows.append(_row({"gate.mode": "threshold", "seed": 4}, {"t1": 0.5}, kl=0.1))
    rows.append(_row({"gate.mode": "random", "seed": 4}, {"u1": 0.0}, kl=0.1))  # seed 4: no common problem
    (diff,) = paired_differences(rows, resamples=400, seed=0)
    assert (diff["a"], diff["b"], diff["seeds"]) == ("mode=threshold", "mode=random", [0, 1])
    # By hand: only problems both gates answered, in the seeds both ran (q9 and seed 2 drop out).
    by_seed = [[0.5 - 0.25, 0.0 - 0.5, 0.25 - 0.0], [1.0 - 0.5, -0.5 + 0.25]]
    assert diff["problems"] == 5
    assert diff["delta_pass_at_1"] == pytest.approx(np.mean([np.mean(d) for d in by_seed]))
    lo, hi = diff["delta_ci95"]
    assert lo <= diff["delta_pass_at_1"] <= hi and lo < hi
    # A constant per-problem difference gives a point interval, whatever each gate's own spread.
    shifted = [_row({"gate.mode": "random", "seed": s}, {p: v - 0.125 for p, v in d.items()}, kl=0.1)
               for s, d in gate_a.items()]
    (same,) = paired_differences([r for r in rows if r["point"]["gate.mode"] == "threshold" and r["seed"] < 3]
                                 + shifted, resamples=400, seed=0)
    assert same["delta_pass_at_1"] == pytest.approx(0.125) and same["delta_ci95"] == pytest.approx([0.125, 0.125])


def test_a_group_of_one_seed_keeps_the_paired_interval_over_problems():
    from reasonmaxxer.evaluation.ablation import group_over_seeds

    rows = [_row({"gate.tau": t}, {"a": 0.5, "b": -0.25}, kl=0.1, ci=(-0.3, 0.4)) for t in (1.0, 2.0)]
    groups = group_over_seeds(rows, resamples=500, seed=0)
    assert [g["label"] for g in groups] == ["tau=1.0", "tau=2.0"]
    assert groups[0]["delta_ci95"] == [-0.3, 0.4] and groups[0]["interval_over"] == "problems"
    assert groups[0]["delta_pass_at_1"] == pytest.approx(0.125) and groups[0]["seeds"] == [0]


def test_hierarchical_bootstrap_with_one_seed_is_the_paired_bootstrap():
    from reasonmaxxer.evaluation.accuracy import hierarchical_bootstrap_delta, paired_bootstrap_delta

    rng = np.random.default_rng(5)
    base = {f"p{i}": rng.integers(0, 2, 8).tolist() for i in range(30)}
    adapter = {f"p{i}": rng.integers(0, 2, 8).tolist() for i in range(30)}
    paired = paired_bootstrap_delta(base, adapter, resamples=40000, seed=1)
    deltas = [np.mean(adapter[i]) - np.mean(base[i]) for i in sorted(base)]
    hier = hierarchical_bootstrap_delta([deltas], resamples=40000, seed=2)
    assert hier["mean"] == pytest.approx(paired["mean"])
    assert hier["ci95"] == pytest.approx(paired["ci95"], abs=0.01)


def test_hierarchical_bootstrap_collapses_on_constant_deltas_and_is_seeded():
    from reasonmaxxer.evaluation.accuracy import hierarchical_bootstrap_delta

    out = hierarchical_bootstrap_delta([[0.25] * 5, [0.25] * 3, [0.25] * 9], resamples=300, seed=0)
    assert out["mean"] == pytest.approx(0.25) and out["ci95"] == pytest.approx([0.25, 0.25])
    data = [[0.1, -0.3, 0.5], [0.2, 0.0], [1.0, -1.0, 0.0, 0.5]]
    a = hierarchical_bootstrap_delta(data, resamples=300, seed=4)
    assert a == hierarchical_bootstrap_delta(data, resamples=300, seed=4)
    assert a["ci95"] != hierarchical_bootstrap_delta(data, resamples=300, seed=5)["ci95"]
    # The mean over seeds of per-seed means, not the mean of the pooled problems.
    assert a["mean"] == pytest.approx(np.mean([np.mean(d) for d in data]))
    assert a["mean"] != pytest.approx(np.mean(sum(data, [])))
    assert hierarchical_bootstrap_delta([[], []], resamples=300, seed=0)["mean"] is None


def test_hierarchical_bootstrap_matches_the_enumerated_distribution():
    """Two seeds (2 and 3 problems): every seed draw and problem resample, weighted exactly."""
    from reasonmaxxer.evaluation.accuracy import hierarchical_resample_means

    groups = [np.array([0.0, 1.0]), np.array([0.5, -1.0, 2.0])]

    def slot_means(diff):  # each drawn seed: all n^n equally likely problem resamples
        return [np.mean(diff[list(idx)]) for idx in itertools.product(range(len(diff)), repeat=len(diff))]

    exact, weights = [], []
    for drawn in itertools.product(range(2), repeat=2):  # which seed fills each of the two slots
        a, b = slot_means(groups[drawn[0]]), slot_means(groups[drawn[1]])
        for x, y in itertools.product(a, b):
            exact.append((x + y) / 2)
            weights.append(0.25 / (len(a) * len(b)))
    exact, weights = np.array(exact), np.array(weights)
    mean = float(np.sum(weights * exact))
    var = float(np.sum(weights * (exact - mean) ** 2))
    boots = hierarchical_resample_means(groups, resamples=200_000, rng=np.random.default_rng(0))
    assert boots.mean() == pytest.approx(mean, abs=0.01)
    assert boots.var() == pytest.approx(var, rel=0.02)
    order = np.argsort(exact)
    cdf = np.cumsum(weights[order])

    def quantile(q):
        return exact[order][np.searchsorted(cdf, q)]

    lo, hi = np.percentile(boots, [2.5, 97.5])
    assert quantile(0.02) <= lo <= quantile(0.03) and quantile(0.97) <= hi <= quantile(0.98)


def test_shipped_seed_sweep_shares_stages_per_seed():
    from reasonmaxxer.jobs.sweep import shared_stage_configs

    demo = str(ROOT / "configs" / "demo.yaml")
    spec = load_sweep(ROOT / "configs" / "sweeps" / "demo_seeds.yaml")
    points = sweep_configs(demo, [], spec)
    assert len(points) == 9
    assert {(c.seed, c.gate.mode) for _, c in points} == {(s, m) for s in (0, 1, 2) for m in ("threshold", "random",
                                                                                             "all")}
    assert all(c.gate.tau == 2.2 and c.gate.reference == "threshold" for _, c in points)
    shared = shared_stage_configs(demo, ["--output_dir", "runs/x"], spec, points)
    assert {s: c.output_dir for s, c in shared.items()} == {0: "runs/x", 1: "runs/x/seeds/seed=1",
                                                            2: "runs/x/seeds/seed=2"}
    # The sweep's constants reach the shared stages; seed is each folder's own.
    assert all(c.seed == s and not c.eval.greedy for s, c in shared.items())
    assert all(c.training["max_steps"] == 20 and c.eval.num_samples == 3 and c.eval.movement_rollouts == 32
               for _, c in points)


def test_shipped_tau_seed_sweep_reuses_the_seed_ablations_rollouts():
    """demo_tau_seeds runs tau 1.4, 2.2 and 3.0 at demo_seeds' seeds with the README's tau-table sizing;
    its problems, rollouts, scoring and selection are demo_seeds' (same folders, same fingerprints)."""
    from reasonmaxxer.jobs.pipeline import Pipeline
    from reasonmaxxer.jobs.sweep import shared_stage_configs

    demo = str(ROOT / "configs" / "demo.yaml")
    seeds_spec = load_sweep(ROOT / "configs" / "sweeps" / "demo_seeds.yaml")
    tau_spec = load_sweep(ROOT / "configs" / "sweeps" / "demo_tau_seeds.yaml")
    tau_points = sweep_configs(demo, [], tau_spec)
    assert {(c.gate.tau, c.seed) for _, c in tau_points} == {(t, s) for t in (1.4, 2.2, 3.0) for s in (0, 1, 2)}
    assert all(c.gate.mode == "threshold" and c.training["max_steps"] == 30 and c.eval.num_samples == 4
               and c.eval.movement_rollouts == 64 and not c.eval.greedy for _, c in tau_points)
    out = ["--output_dir", "runs/x"]
    mine = shared_stage_configs(demo, out, tau_spec, tau_points)
    theirs = shared_stage_configs(demo, out, seeds_spec, sweep_configs(demo, [], seeds_spec))
    assert {s: c.output_dir for s, c in mine.items()} == {s: c.output_dir for s, c in theirs.items()}
    shared = ("problems", "rollouts", "scoring", "selection")
    for s in (0, 1, 2):
        a, b = Pipeline(mine[s]).fingerprints(), Pipeline(theirs[s]).fingerprints()
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    # ... while the eval settings differ, so each sweep keeps its own base eval samples.
    assert mine[0].eval.num_samples != theirs[0].eval.num_samples


def test_agent_points_of_different_seeds_get_their_own_folders(tmp_path, monkeypatch):
    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.jobs.sweep import agent_run_dir, agent_shared_dir

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    folders = {}
    for seed in (0, 3):
        overrides = ["--output_dir", str(tmp_path), "--gate.mode=all", f"--seed={seed}"]
        cfg = load_config(None, overrides)
        folders[seed] = (agent_run_dir(cfg, overrides), agent_shared_dir(None, overrides, cfg))
    assert folders[0][0] != folders[3][0] and "seed=3" in folders[3][0].name
    assert folders[0][1] == tmp_path and folders[3][1] == tmp_path / "seeds" / "seed=3"


# ----------------------------------------------------------------------------- end to end


@pytest.fixture()
def mixed_verify(monkeypatch):
    """A random tiny model solves nothing: reward by a hash of the text so problems are mixed."""
    import zlib

    import reasonmaxxer.stages.rollouts as rollouts_module

    monkeypatch.setattr(rollouts_module, "verify", lambda text, answer, *_: (float(zlib.crc32(text.encode()) % 2), None))


def _count(monkeypatch, cls_or_module, name):
    calls = []
    original = getattr(cls_or_module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls_or_module, name, wrapper)
    return calls


@pytest.mark.slow
def test_local_sweep_reuses_rollouts_and_resumes(tiny_model_dir, tmp_path, monkeypatch, mixed_verify, capsys):
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.jobs import sweep as sweep_module
    from reasonmaxxer.jobs.pipeline import Pipeline

    sweep = _sweep_file(tmp_path, {"gate.mode": {"values": ["topk", "all"]}, "gate.k": {"values": [2, 3]}},
                        name="t")
    args = [*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--eval.num_samples", "2", "--eval.bootstrap", "100",
            "--eval.movement_rollouts", "4", "--sweep", str(sweep)]
    rollout_stages = _count(monkeypatch, Pipeline, "stage_rollouts")
    real_run_point = sweep_module.run_point
    trained = []

    def run_point_then_die(point, cfg, base_dir, progress):
        trained.append(point)
        if len(trained) == 2:
            raise KeyboardInterrupt  # a kill during the second point
        return real_run_point(point, cfg, base_dir, progress)

    monkeypatch.setattr(sweep_module, "run_point", run_point_then_die)
    assert train_main(args) == 130
    assert len(rollout_stages) == 1 and trained == [{"gate.k": 2, "gate.mode": "topk"},
                                                    {"gate.k": 2, "gate.mode": "all"}]
    monkeypatch.setattr(sweep_module, "run_point", real_run_point)
    points = _count(monkeypatch, sweep_module, "run_point")
    assert train_main(args) == 0
    # Resumed at the first unfinished point; gate.mode=all at k=3 is the same run as at k=2.
    assert len(points) == 2
    assert len(rollout_stages) == 1  # rollouts were generated once, for the whole sweep
    sweep_dir = tmp_path / "run" / "sweeps" / "t"
    rows = json.loads((sweep_dir / "ablation.json").read_text())["points"]
    assert [r["point"] for r in rows] == [{"gate.k": 2, "gate.mode": "topk"}, {"gate.k": 2, "gate.mode": "all"},
                                          {"gate.k": 3, "gate.mode": "topk"}, {"gate.k": 3, "gate.mode": "all"}]
    assert rows[3]["same_as"] == {"gate.k": 2, "gate.mode": "all"}
    assert rows[1]["fork_fraction"] == pytest.approx(1.0)
    assert 0 < rows[0]["fork_fraction"] < 1
    for r in rows:
        assert {"delta_pass_at_1", "delta_ci95", "kl_ratio", "top1_agreement_nonfork", "train_seconds"} <= set(r)
    for name in ("ablation.md", "ablation.png"):
        assert (sweep_dir / name).stat().st_size > 0
    point_dir = Path(rows[0]["run_dir"])
    assert (point_dir / "rollouts.jsonl").is_symlink()  # shared, not copied or regenerated
    assert (point_dir / "adapter" / "adapter_config.json").exists() and (point_dir / "movement.json").exists()
    # The base's eval samples do not depend on the point: sampled once, in the base run.
    assert (tmp_path / "run" / "eval_samples" / "base_samples.jsonl").exists()
    assert not list(sweep_dir.glob("*/eval_samples/base_samples.jsonl"))
    assert all((Path(r["run_dir"]) / "eval_samples" / "adapter_samples.jsonl").exists() for r in rows)


@pytest.mark.slow
def test_wandb_agent_point_runs_in_its_own_folder_and_logs_to_wandb(tiny_model_dir, tmp_path, monkeypatch,
                                                                     mixed_verify, caplog):
    from helpers import wandb_records, wandb_summary_and_history

    from reasonmaxxer.cli import train_main

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # tracking.report_to stays at its default, none, as in the demo config the shipped sweeps use.
    args = [*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--eval.num_samples", "2", "--eval.bootstrap", "100",
            "--eval.movement_rollouts", "4", "--gate.mode=topk", "--gate.k=2"]
    with caplog.at_level(logging.INFO, logger="reasonmaxxer.jobs.sweep"):
        assert train_main(args) == 0
    assert len([r for r in caplog.records if "tracking switched on" in r.getMessage()]) == 1
    points = list((tmp_path / "run" / "sweeps" / "abc123").iterdir())
    assert len(points) == 1 and "gate.k=2" in points[0].name
    assert (points[0] / "adapter" / "adapter_config.json").exists()
    assert (points[0] / "accuracy.json").exists()
    assert (tmp_path / "run" / "rollouts.jsonl").exists()  # shared stages live in the base run
    assert not list((tmp_path / "run").glob("wandb"))  # the agent's one W&B run is the point's

    # The point's offline W&B run: part of the sweep, with the sweep's metric and the Trainer's logs.
    (run_file,) = (points[0] / "wandb").glob("offline-run-*/run-*.wandb")
    (run_record,) = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert run_record.sweep_id == "abc123"
    summary, history = wandb_summary_and_history(run_file)
    metrics = {load_sweep(path).metric["name"] for path in (ROOT / "configs" / "sweeps").glob("*.yaml")}
    accuracy = json.loads((points[0] / "accuracy.json").read_text())
    for metric in metrics:  # accuracy/delta_pass_at_1
        assert summary[metric] == pytest.approx(accuracy["delta_pass_at_1"]["mean"])
    train_log = json.loads((points[0] / "train_log.json").read_text())
    logged_losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(logged_losses) == 3  # training.max_steps with logging_steps 1
    assert logged_losses == pytest.approx([h["loss"] for h in train_log if "loss" in h])


@pytest.mark.slow
def test_sweep_over_seeds_shares_stages_per_seed_and_aggregates(tiny_model_dir, tmp_path, monkeypatch, mixed_verify):
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.jobs.pipeline import Pipeline

    sweep = _sweep_file(tmp_path, {"gate.mode": {"values": ["topk", "all"]}, "gate.k": {"value": 2},
                                   "seed": {"values": [0, 1]}}, name="s")
    args = [*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--eval.num_samples", "2", "--eval.bootstrap", "100",
            "--eval.movement_rollouts", "4", "--eval.greedy", "false", "--sweep", str(sweep)]
    rollout_stages = _count(monkeypatch, Pipeline, "stage_rollouts")
    assert train_main(args) == 0
    assert len(rollout_stages) == 2  # once per seed, shared by that seed's two points
    run = tmp_path / "run"
    shared = {0: run, 1: run / "seeds" / "seed=1"}
    out = json.loads((run / "sweeps" / "s" / "ablation.json").read_text())
    points, groups = out["points"], out["groups"]
    assert [(r["point"]["gate.mode"], r["seed"]) for r in points] == [("topk", 0), ("topk", 1), ("all", 0), ("all", 1)]
    for r in points:
        point_dir = Path(r["run_dir"])
        assert (point_dir / "rollouts.jsonl").resolve() == (shared[r["seed"]] / "rollouts.jsonl").resolve()
        assert (shared[r["seed"]] / "eval_samples" / "base_samples.jsonl").exists()
        accuracy = json.loads((point_dir / "accuracy.json").read_text())
        assert len(r["per_problem_delta"]) == accuracy["delta_pass_at_1"]["n"] == 4
        assert np.mean(list(r["per_problem_delta"].values())) == pytest.approx(accuracy["delta_pass_at_1"]["mean"])
    heldout = {s: {json.loads(line)["prompt"] for line in (d / "problems.jsonl").read_text().splitlines()
                   if json.loads(line)["split"] == "heldout"} for s, d in shared.items()}
    assert heldout[0] != heldout[1]  # each seed its own problems: deltas are paired within a seed
    assert [g["label"] for g in groups] == ["mode=topk", "mode=all"]
    for g, members in zip(groups, (points[:2], points[2:])):
        assert g["seeds"] == [0, 1] and g["interval_over"] == "seeds and problems"
        assert g["delta_pass_at_1"] == pytest.approx(np.mean([m["delta_pass_at_1"] for m in members]))
        assert g["kl_mean_all"] == pytest.approx(np.mean([m["kl_mean_all"] for m in members]))
        assert g["per_seed"][1]["delta_pass_at_1"] == members[1]["delta_pass_at_1"]
    table = (run / "sweeps" / "s" / "ablation.md").read_text()
    assert "| mode=topk | 0, 1 |" in table and "| mode=all | 0, 1 |" in table
    assert (run / "sweeps" / "s" / "ablation.png").stat().st_size > 0


def test_plan_lists_seeds_and_points_without_doing_anything(tmp_path, capsys):
    from reasonmaxxer.cli import train_main

    out_dir = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(out_dir),
            "--sweep", str(ROOT / "configs" / "sweeps" / "demo_seeds.yaml"), "--plan"]
    assert train_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sweep demo_seeds: 9 points"
    assert [ln.strip() for ln in lines[1:4]] == [f"seed 0: shared stages in {out_dir} (to run)",
                                                 f"seed 1: shared stages in {out_dir}/seeds/seed=1 (to run)",
                                                 f"seed 2: shared stages in {out_dir}/seeds/seed=2 (to run)"]
    assert len(lines) == 13 and all(ln.endswith("to train and evaluate") for ln in lines[4:])
    assert not out_dir.exists()
    assert train_main(["--config", str(ROOT / "configs" / "demo.yaml"), "--plan"]) == 2
    assert "--plan prints what a sweep or comparison would do" in capsys.readouterr().err
