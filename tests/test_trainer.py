"""ForkGatedTrainer.compute_loss against an independent computation on the tiny model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import count_device_reads
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasonmaxxer.config.loading import load_config
from reasonmaxxer.errors import TrainingDivergedError
from reasonmaxxer.stages.scoring import score_batch
from reasonmaxxer.training.trainer import build_trainer, fsdp_save_problem, last_complete_checkpoint
from reasonmaxxer.utils.sequences import pack_batch


def _metrics(trainer, mode="train"):
    """The trainer's accumulated metrics as floats (they are kept as device tensors until logged)."""
    return {k: [float(x) for x in v] for k, v in trainer._metrics[mode].items()}


def _rollouts(tokenizer, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    out = []
    for i in range(n):
        p_len = 3 + i % 3
        c_len = 1 + (i * 5) % 9  # includes a one-token completion
        out.append({
            "prompt_ids": torch.randint(5, vocab, (p_len,), generator=g).tolist(),
            "completion_ids": torch.randint(5, vocab, (c_len,), generator=g).tolist(),
        })
    return out


def _scores(model, tokenizer, rollouts, top_k):
    packed = pack_batch([r["prompt_ids"] for r in rollouts], [r["completion_ids"] for r in rollouts],
                        tokenizer.pad_token_id)
    stats = score_batch(model, packed, top_k=top_k, chunk_size=4, entropy_temperature=1.0)
    out = {}
    for i, r in enumerate(rollouts):
        L = len(r["completion_ids"])
        out[i] = {k: v[i, :L] for k, v in stats.items()}
    return out


def _trainer(tiny_model_dir, tmp_path, overrides, top_k=None):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    rollouts = _rollouts(tokenizer)
    scores = _scores(model, tokenizer, rollouts, top_k or len(tokenizer))
    selection = [{"rollout_index": i, "advantage": (1.0 if i % 2 else -1.0)} for i in range(len(rollouts))]
    cfg = load_config(None, ["--training.max_steps", "1", "--lora.dropout", "0.0", *overrides])
    base = copy.deepcopy(model)
    trainer = build_trainer(cfg, model, tokenizer, rollouts, selection, scores, tmp_path / "ckpt",
                            entropy_temperature=1.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rollouts))])
    return trainer, batch, base


def _perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _reference(base, policy, batch, *, tau, kl_coef, floor):
    """Brute force: one plain forward per row (no padding), loops over positions."""
    total_fork, n_fork, total_kl, n_nonfork = 0.0, 0, 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][keep].unsqueeze(0)
        L = int(batch["completion_mask"][b].sum())
        with torch.no_grad():
            base_logits = base(ids).logits[0, -L - 1 : -1]
            pol_logits = policy(ids).logits[0, -L - 1 : -1]
        for t in range(L):
            tok = int(batch["completion_ids"][b, t])
            pb = torch.distributions.Categorical(logits=base_logits[t])
            pp = torch.distributions.Categorical(logits=pol_logits[t])
            if pb.entropy().item() > tau:
                logp = pp.log_prob(torch.tensor(tok)).item()
                a = float(batch["advantages"][b])
                if a < 0 and torch.exp(torch.tensor(logp)) < floor:
                    pass
                else:
                    total_fork += a * -logp
                n_fork += 1
            else:
                total_kl += torch.distributions.kl_divergence(pb, pp).item()
                n_nonfork += 1
    return total_fork / max(n_fork, 1) + kl_coef * total_kl / max(n_nonfork, 1)


def _median_base_entropy(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    scores = _scores(model, tokenizer, _rollouts(tokenizer), top_k=1)
    return torch.cat([s["entropy"] for s in scores.values()]).median().item()


@pytest.mark.parametrize("anchor", ["cached", "exact"])
def test_compute_loss_matches_brute_force(tiny_model_dir, tmp_path, anchor):
    tau = _median_base_entropy(tiny_model_dir)  # a threshold that splits the batch
    trainer, batch, base = _trainer(tiny_model_dir, tmp_path, ["--loss.kl_anchor", anchor, "--gate.tau", str(tau),
                                                               "--loss.neg_prob_floor", "0.003"])
    _perturb_lora(trainer.model)
    trainer.model.train()  # lora.dropout is 0: train mode is deterministic, and metrics go to "train"
    loss = trainer.compute_loss(trainer.model, dict(batch))
    expected = _reference(base, trainer.model, batch, tau=tau, kl_coef=0.2, floor=0.003)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    m = _metrics(trainer)
    assert 0 < m["fork_fraction"][-1] < 1  # the threshold splits this batch
    assert m["kl_term"][-1] > 0


@pytest.mark.parametrize("anchor, entropy_source", [("cached", "policy"), ("exact", "base")])
def test_compute_loss_never_asks_for_full_logits(tiny_model_dir, tmp_path, monkeypatch, anchor, entropy_source):
    """The LM head runs fused with the loss statistics: neither the model's logits nor a (B, C, V) head output."""
    from reasonmaxxer.models import forward

    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--loss.kl_anchor", anchor,
                                                             "--gate.entropy_source", entropy_source])
    _perturb_lora(trainer.model)
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, dict(batch))  # through the fused head
    monkeypatch.setattr(forward, "linear_head", lambda model: None)  # the full-logits path, for comparison
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(expected.item(), rel=1e-5)
    monkeypatch.undo()
    head = trainer.model.get_output_embeddings()
    C = batch["completion_ids"].shape[1]
    widest = []
    head.register_forward_hook(lambda module, args, out: widest.append(out.shape[1]))
    monkeypatch.setattr(forward, "completion_logits", lambda *a, **k: pytest.fail("full logits were computed"))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert max(widest) == 0 < C  # the model's own head ran on no position
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()


def test_fresh_adapter_has_zero_kl_and_zero_dlogp(tiny_model_dir, tmp_path):
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--gate.mode", "quantile", "--gate.quantile", "0.3"])
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    m = _metrics(trainer)
    assert abs(m["kl_term"][-1]) < 1e-5
    assert abs(m["dlogp_pos_forks"][-1]) < 1e-5 and abs(m["dlogp_neg_forks"][-1]) < 1e-5


def test_exact_anchor_uses_the_base_without_a_second_copy(tiny_model_dir, tmp_path):
    trainer, batch, base = _trainer(tiny_model_dir, tmp_path, ["--loss.kl_anchor", "exact"])
    n_params = sum(p.numel() for p in trainer.model.parameters())
    _perturb_lora(trainer.model)
    trainer.compute_loss(trainer.model, dict(batch))
    # Only LoRA parameters were added to the base: no reference model was created.
    lora = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert n_params - lora == sum(p.numel() for p in base.parameters())
    assert trainer.ref_model is None if hasattr(trainer, "ref_model") else True


def test_policy_entropy_source_and_backward(tiny_model_dir, tmp_path):
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--gate.entropy_source", "policy", "--gate.mode",
                                                             "topk", "--gate.k", "2"])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert _metrics(trainer)["forks"][-1] == sum(min(2, int(n)) for n in batch["completion_mask"].sum(-1))


def test_no_fork_batch_is_the_kl_term_alone(tiny_model_dir, tmp_path):
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--gate.tau", "100"])
    _perturb_lora(trainer.model)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    m = _metrics(trainer)
    assert m["no_fork"][-1] == 1.0 and m["fork_term"][-1] == 0.0
    assert loss.item() == pytest.approx(0.2 * m["kl_term"][-1], rel=1e-6)
    loss.backward()


def test_gradient_accumulation_averages_micro_batches(tiny_model_dir, tmp_path):
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--gate.mode", "quantile"])
    _perturb_lora(trainer.model)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def grads_after(steps: int) -> list[torch.Tensor]:
        trainer.model.zero_grad()
        trainer.current_gradient_accumulation_steps = steps
        n_items = batch["completion_mask"].sum() * steps  # what the Trainer passes in its loop
        for _ in range(steps):
            trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items)
        return [p.grad.clone() for p in params]

    one, two = grads_after(1), grads_after(2)
    for a, b in zip(one, two):  # two identical micro-batches, averaged: the same gradient
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def _checkpoint(folder, step, *, state_step=None, weights=True, state=True, torn_state=False):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"x")
    if torn_state:
        (path / "trainer_state.json").write_text('{"global_st')
    elif state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": state_step or step}))
    return path


def test_last_complete_checkpoint_skips_and_removes_torn_ones(tmp_path):
    folder = tmp_path / "checkpoints"
    assert last_complete_checkpoint(folder) is None  # no folder yet
    _checkpoint(folder, 2)
    _checkpoint(folder, 10)  # numeric order, not string order: 10 > 4
    torn = [_checkpoint(folder, 12, state=False), _checkpoint(folder, 14, torn_state=True),
            _checkpoint(folder, 16, weights=False), _checkpoint(folder, 18, state_step=16)]
    (folder / "checkpoint-notanumber").mkdir()
    assert last_complete_checkpoint(folder) == str(folder / "checkpoint-10")
    assert not any(p.exists() for p in torn)
    assert (folder / "checkpoint-2").exists() and (folder / "checkpoint-notanumber").exists()


def test_last_complete_checkpoint_none_when_all_torn(tmp_path):
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, 4, state=False)
    assert last_complete_checkpoint(folder) is None
    assert not (folder / "checkpoint-4").exists()


def test_nonfinite_loss_is_skipped_with_zero_gradient_then_stops(tiny_model_dir, tmp_path, caplog):
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--loss.max_nonfinite_in_a_row", "2",
                                                             "--gate.mode", "all"])
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    bad = dict(batch)
    bad["advantages"] = batch["advantages"].clone()
    bad["advantages"][0] = 3e38  # times a log-prob of a few nats: the fork term is inf in float32
    for in_a_row in (1, 2):
        loss = trainer.compute_loss(trainer.model, dict(bad))
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in params)
        assert f"({in_a_row} in a row, at most 2)" in caplog.text
    assert _metrics(trainer)["nonfinite_skipped"] == [1.0, 1.0]
    # A finite batch resets the count ...
    assert torch.isfinite(trainer.compute_loss(trainer.model, dict(batch)))
    assert _metrics(trainer)["nonfinite_skipped"][-1] == 0.0
    for _ in range(2):
        trainer.compute_loss(trainer.model, dict(bad))
    # ... and the third NaN in a row stops the run, with one line that says what to change.
    with pytest.raises(TrainingDivergedError, match=r"^training: the loss was inf .* in 3 micro-batch\(es\) in a row"):
        trainer.compute_loss(trainer.model, dict(bad))


def test_nonfinite_adapter_weight_stops_before_a_checkpoint(tiny_model_dir, tmp_path):
    trainer, _, _ = _trainer(tiny_model_dir, tmp_path, [])
    with torch.no_grad():
        name, param = next((n, p) for n, p in trainer.model.named_parameters() if "lora_A" in n)
        param[0, 0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"adapter weight tensor\(s\) became NaN/inf at step 1"):
        trainer.train()
    assert not any((tmp_path / "ckpt").glob("checkpoint-*"))


def test_nan_loss_from_a_nan_weight_gives_a_zero_finite_gradient(tiny_model_dir, tmp_path):
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, [])
    trainer.model.train()
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in trainer.model.parameters() if p.requires_grad)


def test_batches_are_grouped_by_length(tiny_model_dir, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer, _, _ = _trainer(tiny_model_dir, tmp_path, ["--training.per_device_train_batch_size", "2"])
    ds = trainer.train_dataset
    assert ds["length"] == [len(p) + len(c) for p, c in zip(ds["prompt_ids"], ds["completion_ids"])]
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    padded = [b["input_ids"].numel() for b in trainer.get_train_dataloader()]
    in_order = [max(ds["length"][i : i + 2]) * len(ds["length"][i : i + 2]) for i in range(0, len(ds), 2)]
    assert sum(padded) <= sum(in_order)


def test_log_turns_metric_tensors_into_step_means(tiny_model_dir, tmp_path):
    """Metrics stay tensors per micro-batch; log() averages them into floats (one host sync)."""
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--gate.mode", "quantile", "--gate.quantile", "0.3"])
    _perturb_lora(trainer.model)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    half = {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
    trainer.compute_loss(trainer.model, half)
    raw = trainer._metrics["train"]
    assert all(isinstance(x, torch.Tensor) for x in raw["kl_term"])
    expected = {k: sum(float(x) for x in v) / len(v) for k, v in raw.items()}
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    for key in ("kl_term", "fork_fraction", "forks", "base_entropy_forks"):
        assert isinstance(logged[key], float) and logged[key] == pytest.approx(expected[key], rel=1e-6), key
    assert trainer._metrics["train"] == {}


def test_compute_loss_syncs_with_the_device_once(tiny_model_dir, tmp_path, monkeypatch):
    """Our code syncs with the device once per micro-batch (the finiteness check); statistics stay on it.

    Every way a tensor's value reaches Python (item, tolist, bool, float, int) from
    ReasonMaxxer's own code is counted (transformers' attention-mask checks inside the
    model's forward are not ours to remove).
    """
    trainer, batch, _ = _trainer(tiny_model_dir, tmp_path, ["--gate.tau", "1.0"])
    _perturb_lora(trainer.model)
    trainer.model.train()
    reads = count_device_reads(monkeypatch)
    trainer.compute_loss(trainer.model, dict(batch))
    monkeypatch.undo()
    assert reads == [("__bool__", "trainer.py")], reads


@pytest.mark.parametrize("overrides, repo", [
    ([], "my-run"),
    (["--tracking.run_name", "named"], "named"),
    (["--tracking.run_name", "named", "--training.hub_model_id", "org/chosen"], "org/chosen"),
])
def test_push_to_hub_goes_to_the_runs_repo_not_checkpoints(tiny_model_dir, tmp_path, overrides, repo):
    run = tmp_path / "my-run"
    trainer, _, _ = _trainer(tiny_model_dir, tmp_path, ["--output_dir", str(run), "--training.push_to_hub", "true",
                                                        *overrides])
    assert trainer.args.hub_model_id == repo
    # The Trainer would upload checkpoints/ at every save: train_adapter pushes adapter/ with its card instead.
    assert trainer.args.push_to_hub is False


def test_trl_card_in_checkpoints_names_the_base_and_the_run(tiny_model_dir, tmp_path):
    trainer, _, _ = _trainer(tiny_model_dir, tmp_path, ["--output_dir", str(tmp_path / "my-run"),
                                                        "--model.name_or_path", str(tiny_model_dir)])
    trainer.create_model_card(model_name="my-run")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "[None]" not in card and "None" not in card.split("## Quick start")[1].split("```")[1]
    assert f"fine-tuned version of [{tiny_model_dir.name}]" in card and 'model="my-run"' in card
    assert trainer.model.config._name_or_path == str(tiny_model_dir)  # restored after writing


def _paper_reference(base, policy, batch, *, tau_pos, tau_neg, kl_coef, floor, prompt=True):
    """The paper's adv_ce with prompt positions anchored: one plain forward per row, loops over positions."""
    fork_sum, n_eff, kl_sum, n_anchor = 0.0, 0, 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][keep].unsqueeze(0)
        L = int(batch["completion_mask"][b].sum())
        a = float(batch["advantages"][b])
        with torch.no_grad():
            base_logits = base(ids).logits[0, :-1]  # column j predicts token j + 1
            pol_logits = policy(ids).logits[0, :-1]
        first_completion = ids.shape[1] - L - 1
        for j in range(ids.shape[1] - 1):
            pb = torch.distributions.Categorical(logits=base_logits[j])
            pp = torch.distributions.Categorical(logits=pol_logits[j])
            kl = torch.distributions.kl_divergence(pb, pp).item()
            if j < first_completion:  # predicts a prompt token: anchored
                if prompt:
                    kl_sum, n_anchor = kl_sum + kl, n_anchor + 1
                continue
            logp = pp.log_prob(ids[0, j + 1]).item()
            is_fork = pb.entropy().item() > (tau_pos if a > 0 else tau_neg)
            floored = a < 0 and floor > 0 and torch.exp(torch.tensor(logp)).item() <= floor
            if is_fork and not floored:
                fork_sum, n_eff = fork_sum + a * -logp, n_eff + 1
            else:
                kl_sum, n_anchor = kl_sum + kl, n_anchor + 1
    return fork_sum / max(n_eff, 1) + kl_coef * kl_sum / max(n_anchor, 1)


def test_paper_options_in_compute_loss_match_brute_force(tiny_model_dir, tmp_path):
    """tau_pos/tau_neg, floored forks anchored, and the prompt positions in the anchor."""
    tau = _median_base_entropy(tiny_model_dir)
    trainer, batch, base = _trainer(tiny_model_dir, tmp_path, [
        "--loss.kl_anchor", "exact", "--loss.kl_on_prompt", "true", "--loss.floored_forks", "anchor",
        "--loss.neg_prob_floor", "0.003", "--gate.tau_pos", str(tau * 0.98), "--gate.tau_neg", str(tau * 1.02)])
    _perturb_lora(trainer.model)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    expected = _paper_reference(base, trainer.model, batch, tau_pos=tau * 0.98, tau_neg=tau * 1.02,
                                kl_coef=0.2, floor=0.003)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # without the prompt positions the value differs: the option is not a no-op here
    without = _paper_reference(base, trainer.model, batch, tau_pos=tau * 0.98, tau_neg=tau * 1.02,
                               kl_coef=0.2, floor=0.003, prompt=False)
    assert abs(expected - without) > 1e-4
    loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- the public trainer on a user's own rollouts
def _user_rows(n_prompts=3, per_prompt=4):
    """TRL-style conversational rows, several completions per prompt, mixed rewards."""
    rows = []
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"What is {i + 2} + {i + 5}?"}]
        for j in range(per_prompt):
            text = f"The sum is {i + 7 + j % 2}." + " Let me check." * (j % 3)
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text}],
                         "reward": float(j % 2 == 0)})
    return rows


def _public_trainer(tiny_model_dir, tmp_path, rows, **fields):
    import datasets
    import peft

    import reasonmaxxer as rm

    args = rm.ForkGatedConfig(str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", anchor_top_k=16,
                              scoring_batch_size=3, scoring_chunk_size=4, max_steps=2,
                              per_device_train_batch_size=4, **fields)
    return rm.ForkGatedTrainer(str(tiny_model_dir), args, train_dataset=datasets.Dataset.from_list(rows),
                               peft_config=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


def test_public_trainer_scores_the_base_itself_and_reuses_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    """The trainer's own base scores equal an independent base pass; a second trainer reads them back."""
    import reasonmaxxer.stages.scoring as scoring

    rows = _user_rows()
    trainer = _public_trainer(tiny_model_dir, tmp_path, rows)
    ds = trainer.train_dataset
    assert len(ds) == 12 and sorted(set(ds["advantage"])) == [-1.0, 1.0]
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    packed = pack_batch(ds["prompt_ids"], ds["completion_ids"], tokenizer.pad_token_id)
    assert torch.equal(packed["input_ids"], batch["input_ids"])
    want = score_batch(base, packed, top_k=16, chunk_size=7, entropy_temperature=1.0)
    mask = packed["completion_mask"].bool()
    for key, column in (("entropy", "base_entropy"), ("logp", "base_logp"), ("topk_logp", "topk_logp")):
        assert torch.allclose(batch[column][mask], want[key][mask], atol=1e-5), key
    assert torch.equal(batch["topk_ids"][mask], want["topk_ids"][mask].long())
    folders = list((tmp_path / "out" / "base_scores").iterdir())
    assert len(folders) == 1

    calls = []
    real = scoring.score_batch
    monkeypatch.setattr(scoring, "score_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _public_trainer(tiny_model_dir, tmp_path, rows)
    assert calls == []  # read back: no base pass
    assert torch.equal(again.data_collator([ds[i] for i in range(len(ds))])["base_entropy"], batch["base_entropy"])
    # Killed mid-scoring: a missing shard (12 rows in batches of 3: 4 shards) is the only batch scored again.
    shards = sorted(folders[0].glob("shard-*.safetensors"))
    assert len(shards) == 4
    shards[2].unlink()
    resumed = _public_trainer(tiny_model_dir, tmp_path, rows)
    assert len(calls) == 1 and shards[2].is_file()
    assert torch.equal(resumed.data_collator([ds[i] for i in range(len(ds))])["topk_logp"], batch["topk_logp"])
    _public_trainer(tiny_model_dir, tmp_path, rows[:-1])  # other rows: other folder, scored anew
    assert len(calls) > 1 and len(list((tmp_path / "out" / "base_scores").iterdir())) == 2


def test_public_trainer_reads_score_columns_to_the_same_loss(tiny_model_dir, tmp_path):
    """Base scores given as columns give the batch and the loss of the scores the trainer computes."""
    rows = _user_rows()
    computed = _public_trainer(tiny_model_dir, tmp_path / "a", rows)
    ds = computed.train_dataset
    scores = computed.data_collator.scores
    given = []
    for r in ds:
        s = scores[r["rollout_index"]]
        given.append({"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"],
                      "advantage": r["advantage"], "base_entropy": s["entropy"].tolist(),
                      "base_logp": s["logp"].tolist(), "topk_ids": s["topk_ids"].tolist(),
                      "topk_logp": s["topk_logp"].tolist()})
    from_columns = _public_trainer(tiny_model_dir, tmp_path / "b", given)
    assert not (tmp_path / "b" / "out" / "base_scores").exists()
    losses = []
    for trainer in (computed, from_columns):
        _perturb_lora(trainer.model)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ds))])
        trainer.model.train()
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] != 0


def test_public_trainer_trains_evaluates_and_needs_an_adapter(tiny_model_dir, tmp_path):
    import datasets
    import peft

    import reasonmaxxer as rm
    from reasonmaxxer.errors import ConfigError

    rows = _user_rows()
    args = rm.ForkGatedConfig(str(tmp_path / "out"), use_cpu=True, report_to="none", anchor_top_k=8, max_steps=2,
                              per_device_train_batch_size=4, learning_rate=1e-2, gate_mode="quantile",
                              gate_quantile=0.3)
    trainer = rm.ForkGatedTrainer(str(tiny_model_dir), args, train_dataset=datasets.Dataset.from_list(rows),
                                  eval_dataset=datasets.Dataset.from_list(_user_rows(2, 2)),
                                  peft_config=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    assert trainer.state.global_step == 2
    logged = next(h for h in trainer.state.log_history if "fork_fraction" in h)
    assert 0 < logged["fork_fraction"] < 1
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_fork_fraction" in metrics
    trainer.save_model(str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)

    with pytest.raises(ConfigError, match="peft_config: ForkGatedTrainer trains a LoRA adapter"):
        rm.ForkGatedTrainer(str(tiny_model_dir), args, train_dataset=datasets.Dataset.from_list(rows))
    with pytest.raises(TypeError, match="ForkGatedConfig"):
        from trl import SFTConfig

        rm.ForkGatedTrainer(str(tiny_model_dir), SFTConfig(str(tmp_path / "x"), use_cpu=True),
                            train_dataset=datasets.Dataset.from_list(rows))


@pytest.mark.parametrize(("version", "state_dict_type", "refused"), [
    (1, "SHARDED_STATE_DICT", True), (1, "LOCAL_STATE_DICT", True), (1, "FULL_STATE_DICT", False),
    (2, "SHARDED_STATE_DICT", False), (2, "FULL_STATE_DICT", False),
])
def test_an_fsdp_setup_that_would_save_no_adapter_is_refused_in_one_line(version, state_dict_type, refused):
    """transformers saves an FSDP1 model only with a full state dict; FSDP2 saves the adapter itself
    (tests/test_distributed.py runs it). accelerate's own plugin objects, as its launcher builds them."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type=state_dict_type)
    problem = fsdp_save_problem(plugin)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(f"fsdp_state_dict_type: {state_dict_type} with fsdp_version 1 saves no adapter")
        assert "\n" not in problem
    assert fsdp_save_problem(None) is None  # not FSDP


def test_the_adapter_starts_from_the_seed_whatever_ran_before(tiny_model_dir, tmp_path):
    """The LoRA A matrices are random: two trainers with one seed start from the same adapter even when
    different work drew from the generators first (TRL before 1.16 did not seed before creating it)."""
    starts = []
    for draws in (0, 7):
        torch.rand(draws)
        trainer = _public_trainer(tiny_model_dir, tmp_path / str(draws), _user_rows())
        starts.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n})
    assert starts[0].keys() == starts[1].keys() and starts[0]
    assert all(torch.equal(starts[0][n], starts[1][n]) for n in starts[0])
