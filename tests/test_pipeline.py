"""End to end: every stage on a tiny in-process model, skip/rerun rules, --stage."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from reasonmaxxer.cli import train_main
from reasonmaxxer.testing import tiny_run_args


def _stage_lines(out: str) -> dict[str, str]:
    lines = {}
    for line in out.splitlines():
        name = line.split(" ", 1)[0]
        if name in ("problems", "rollouts", "scoring", "selection", "training"):
            lines[name] = line
    return lines


@pytest.fixture()
def finished_run(trained_run):
    return trained_run


@pytest.mark.slow
def test_every_stage_writes_its_outputs(finished_run, tiny_model_dir):
    run = finished_run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["gate"]["tau"] == 1.4 and cfg["rollout"]["num_samples"] == 4
    problems = [json.loads(x) for x in (run / "problems.jsonl").read_text().splitlines()]
    assert sum(p["split"] == "train" for p in problems) == 6
    assert sum(p["split"] == "heldout" for p in problems) == 4
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 24
    shards = sorted((run / "scores").glob("shard-*.safetensors"))
    assert shards
    selection = [json.loads(x) for x in (run / "selection.jsonl").read_text().splitlines()]
    assert len(selection) == 24 and {round(s["advantage"], 6) for s in selection} == {1.0, -1.0}
    for stage in ("problems", "rollouts", "scoring", "selection", "training"):
        assert json.loads((run / "stages" / f"{stage}.json").read_text())["done"] is True
    log = json.loads((run / "train_log.json").read_text())
    steps = [h for h in log if "fork_fraction" in h]
    assert len(steps) == 3
    for key in ("loss", "fork_term", "kl_term", "fork_fraction", "forks_correct", "forks_wrong",
                "dlogp_pos_forks", "dlogp_neg_forks", "base_entropy_forks", "base_entropy_nonforks", "grad_norm"):
        assert all(key in h and h[key] == h[key] for h in steps), key  # present and not NaN


@pytest.mark.slow
def test_adapter_loads_with_peft_and_changed_the_model(finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, finished_run / "adapter")
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() > 0  # LoRA B is zero at init: any change means it trained


@pytest.mark.slow
def test_rerun_skips_unchanged_stages_and_redoes_changed_ones(finished_run, tiny_model_dir, capsys):
    capsys.readouterr()
    assert train_main(tiny_run_args(tiny_model_dir, finished_run)) == 0
    lines = _stage_lines(capsys.readouterr().out)
    assert all("skipped" in lines[s] for s in ("problems", "rollouts", "scoring", "selection", "training"))

    # A gate change invalidates training only: refused (the adapter would be deleted) ...
    changed = ("--gate.mode", "topk", "--gate.k", "2")
    adapter = (finished_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert train_main(tiny_run_args(tiny_model_dir, finished_run, *changed)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: output_dir: '{finished_run}' holds a run made with a "
                                               "different config (gate.k: 8 -> 2, gate.mode: 'threshold' -> 'topk')")
    assert "its training output would be deleted" in err[0] and "--overwrite" in err[0]
    assert (finished_run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    # ... and redone with --overwrite.
    assert train_main([*tiny_run_args(tiny_model_dir, finished_run, *changed), "--overwrite"]) == 0
    lines = _stage_lines(capsys.readouterr().out)
    assert all("skipped" in lines[s] for s in ("problems", "rollouts", "scoring", "selection"))
    assert "skipped" not in lines["training"]
    log = json.loads((finished_run / "train_log.json").read_text())
    assert all(h["forks"] <= 2 * 4 for h in log if "forks" in h)


def test_stage_alone_needs_its_inputs(tiny_model_dir, tmp_path, capsys):
    code = train_main(tiny_run_args(tiny_model_dir, tmp_path / "fresh", "--stage", "scoring"))
    err = capsys.readouterr().err
    assert code == 2
    assert "stage 'rollouts' has not run with this config" in err and "\n" == err[-1] and err.count("\n") == 1


def test_eval_settings_are_not_in_the_training_fingerprint():
    """Evaluation during training changes what is logged, not the adapter: no retraining for it."""
    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.jobs.pipeline import Pipeline

    plain = Pipeline(load_config(None)).fingerprints()
    evaluated = Pipeline(load_config(None, ["--eval.every_steps", "5", "--eval.during_training_problems", "3"]))
    assert evaluated.fingerprints() == plain
    assert Pipeline(load_config(None, ["--lora.r", "4"])).fingerprints()["training"] != plain["training"]


def test_unknown_stage(tiny_model_dir, tmp_path, capsys):
    assert train_main(tiny_run_args(tiny_model_dir, tmp_path / "x", "--stage", "rolouts")) == 2
    assert "unknown stage 'rolouts'" in capsys.readouterr().err


@pytest.mark.slow
def test_no_mixed_success_says_what_to_change(tiny_model_dir, tmp_path, capsys):
    code = train_main(tiny_run_args(tiny_model_dir, tmp_path / "nomix"))
    err = capsys.readouterr().err
    assert code == 2
    assert "selection: no problem has both a correct and a wrong rollout" in err
    assert "rollout.num_samples" in err


@pytest.mark.slow
def test_training_logs_fork_metrics_to_wandb_offline(finished_run, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train_main(tiny_run_args(tiny_model_dir, finished_run, "--loss.kl_coef", "0.5", "--tracking.report_to", "wandb",
                            "--tracking.project", "rm-test", "--overwrite")) == 0
    runs = sorted((finished_run / "wandb").glob("offline-run-*"))
    assert runs
    # Offline runs keep their records in a binary log (protobuf: keys are stored verbatim).
    record = next(runs[-1].glob("run-*.wandb")).read_bytes()
    for key in ("train/fork_fraction", "train/kl_term", "train/fork_term", "train/grad_norm",
                "train/dlogp_pos_forks", "train/base_entropy_forks", "training/steps", '"kl_coef":0.5'):
        assert key.encode() in record, key


def test_problems_from_a_local_file(tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    rows = [{"question": f"Tom has {i} apples and buys {i + 1}. How many?", "solution": f"so #### {2 * i + 1}"}
            for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code = train_main(["--no-progress", "--output_dir", str(run), "--stage", "problems", "--data.source", "file",
                       "--data.path", str(data), "--data.prompt_column", "question",
                       "--data.answer_column", "solution", "--data.num_train", "8", "--data.num_heldout", "3"])
    assert code == 0
    problems = [json.loads(x) for x in (run / "problems.jsonl").read_text().splitlines()]
    train = [p for p in problems if p["split"] == "train"]
    heldout = [p for p in problems if p["split"] == "heldout"]
    assert len(train) == 8 and len(heldout) == 3
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    answers = {r["question"]: r["solution"].split("####")[1].strip() for r in rows}
    assert all(p["answer"] == answers[p["prompt"]] for p in problems)


def test_malformed_row_is_one_line_with_its_line_number(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": \n')
    code = train_main(["--no-progress", "--output_dir", str(tmp_path / "run"), "--stage", "problems",
                       "--data.source", "file", "--data.path", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "bad.jsonl" in err and "line 2" in err


@pytest.mark.parametrize("model, message", [
    ("./no/such/folder", "model.name_or_path: folder './no/such/folder' does not exist"),
    ("some-org/some-model", "model.name_or_path: cannot load 'some-org/some-model' from the Hugging Face hub "
                            "(offline: HF_HUB_OFFLINE=1)"),
])
def test_bad_model_stops_before_any_work(tmp_path, capsys, model, message):
    run = tmp_path / "run"
    assert train_main(["--no-progress", "--output_dir", str(run), "--model.name_or_path", model]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not run.exists()


@pytest.mark.slow
def test_diverging_training_stops_with_one_line_and_saves_no_adapter(tiny_model_dir, tmp_path, capsys):
    from helpers import give_mixed_rewards

    run = tmp_path / "diverge"
    for stage in ("problems", "rollouts"):
        assert train_main(tiny_run_args(tiny_model_dir, run, "--stage", stage)) == 0
    give_mixed_rewards(run / "rollouts.jsonl")
    capsys.readouterr()
    code = train_main(tiny_run_args(tiny_model_dir, run, "--training.learning_rate", "1e38"))
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not progress bars
    assert code == 3
    assert len(err) == 1 and err[0].startswith("error: training: ") and "no adapter was saved" in err[0]
    assert "Traceback" not in err[0]
    assert not (run / "adapter").exists()
    assert not json.loads((run / "stages" / "training.json").read_text())["done"]


@pytest.mark.parametrize("override", [["--data.prompt_format", "plain"], ["--data.prompt_preset", "boxed"],
                                      ["--reward.function", "my_rewards:score"], ["--reward.answer_format", "boxed"],
                                      ["--data.shuffle", "true"]])
def test_prompt_and_reward_settings_redo_the_rollouts(override):
    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.jobs.pipeline import Pipeline

    before = Pipeline(load_config(None, [])).fingerprints()
    after = Pipeline(load_config(None, override)).fingerprints()
    assert after["rollouts"] != before["rollouts"]
    assert all(after[stage] != before[stage] for stage in ("scoring", "selection", "training"))


def test_scoring_summary_takes_the_share_above_tau_at_the_current_tau_on_resume(tiny_model_dir, tmp_path):
    """gate.tau is not in the scoring fingerprint (a new tau must not redo the scoring), so a
    skipped scoring stage re-takes the share from the stored entropies at the new tau."""
    from reasonmaxxer.stages.scoring import load_scores

    run = tmp_path / "run"
    for stage in ("problems", "rollouts", "scoring"):
        assert train_main(tiny_run_args(tiny_model_dir, run, "--stage", stage)) == 0
    scores_before = sorted(p.read_bytes() for p in (run / "scores").glob("*.safetensors"))
    entropy = torch.cat([s["entropy"] for s in load_scores(run / "scores", keys=("entropy",)).values()])
    taus = [round(float(entropy.quantile(q)), 3) for q in (0.2, 0.8)]
    shares = []
    for tau in taus:
        assert train_main(tiny_run_args(tiny_model_dir, run, "--stage", "scoring", "--gate.tau", str(tau))) == 0
        summary = json.loads((run / "stages" / "scoring.json").read_text())["summary"]
        assert summary["share_tau"] == tau
        assert summary["share_above_tau"] == pytest.approx(float((entropy > tau).float().mean()), abs=1e-7)
        shares.append(summary["share_above_tau"])
    assert shares[0] > shares[1]  # the two taus really give different shares
    assert sorted(p.read_bytes() for p in (run / "scores").glob("*.safetensors")) == scores_before  # not redone
