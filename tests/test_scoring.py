"""Tests for reasonmaxxer.stages.scoring against one plain full forward pass per unpadded row.

References: ``model(input_ids, attention_mask, position_ids).logits`` of each row alone,
torch.distributions.Categorical for the entropy, log_softmax + gather for the log-prob,
torch.topk of the log-softmax for the cached top-k.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Categorical

from reasonmaxxer.stages.scoring import load_scores, score_batch, score_rollouts
from reasonmaxxer.utils.sequences import pack_batch

PAD = 2
TOP_K = 5
ATOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # A fresh random head gives near-uniform distributions (entropy ~ log V at any
    # temperature); sharpen it so entropy, temperature and top-k are told apart.
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(20.0)
    return m


def _rows(seed: int, prompt_lens, completion_lens, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    completions = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in completion_lens]
    return prompts, completions


@torch.no_grad()
def _reference_row(model, prompt, completion, temperature: float, top_k: int):
    """One plain full forward of the unpadded row; statistics of the completion positions."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(ids.shape[1]).unsqueeze(0),
    ).logits[0].float()
    z = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]  # predicts completion[j]
    logp_all = torch.log_softmax(z, dim=-1)
    target = torch.tensor(completion)
    out = {
        "entropy": Categorical(logits=z / temperature).entropy(),
        "logp": logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1),
        "logp_all": logp_all,
    }
    if top_k:
        top = torch.topk(logp_all, top_k, dim=-1)
        out["topk_logp"], out["topk_ids"] = top.values, top.indices
    return out


def _check_topk(got_logp, got_ids, ref) -> None:
    """Top-k values equal the reference; the ids point at those values in the reference
    log-softmax and are distinct; ids equal the reference ids wherever no near-tie exists."""
    torch.testing.assert_close(got_logp, ref["topk_logp"], atol=ATOL, rtol=0)
    pointed = ref["logp_all"].gather(-1, got_ids.long())
    torch.testing.assert_close(pointed, ref["topk_logp"], atol=ATOL, rtol=0)
    for row in got_ids.tolist():
        assert len(set(row)) == len(row)
    vals = ref["topk_logp"]
    # Gap to the next value (the (k+1)-th for the last slot).
    nxt = torch.topk(ref["logp_all"], vals.shape[-1] + 1, dim=-1).values[:, 1:]
    clear = (vals - nxt) > 1e-3
    assert torch.equal(got_ids.long()[clear], ref["topk_ids"][clear])


PROMPT_LENS = [4, 9, 1, 6, 3]
COMPLETION_LENS = [6, 1, 8, 3, 7]  # C = 8; a one-token completion


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_score_batch_equals_unpadded_forward(model, temperature: float) -> None:
    prompts, completions = _rows(0, PROMPT_LENS, COMPLETION_LENS, model.config.vocab_size)
    batch = pack_batch(prompts, completions, PAD)
    C = max(COMPLETION_LENS)
    refs = [_reference_row(model, p, c, temperature, TOP_K) for p, c in zip(prompts, completions)]
    results = {}
    for chunk in (1, 3, C + 5):
        out = score_batch(model, batch, top_k=TOP_K, chunk_size=chunk, entropy_temperature=temperature)
        assert set(out) == {"entropy", "logp", "topk_logp", "topk_ids"}
        assert out["entropy"].shape == (len(prompts), C)
        assert out["logp"].shape == (len(prompts), C)
        assert out["topk_logp"].shape == (len(prompts), C, TOP_K)
        assert out["topk_ids"].shape == (len(prompts), C, TOP_K)
        assert out["entropy"].dtype == out["logp"].dtype == torch.float32
        for i, (c, ref) in enumerate(zip(completions, refs)):
            n = len(c)  # padding positions (n..C-1) are not compared
            torch.testing.assert_close(out["entropy"][i, :n], ref["entropy"], atol=ATOL, rtol=0)
            torch.testing.assert_close(out["logp"][i, :n], ref["logp"], atol=ATOL, rtol=0)
            _check_topk(out["topk_logp"][i, :n], out["topk_ids"][i, :n], ref)
        results[chunk] = out
    # Chunk sizes agree with each other at completion positions.
    mask = batch["completion_mask"].bool()
    for chunk in (3, C + 5):
        for key in ("entropy", "logp", "topk_logp"):
            torch.testing.assert_close(results[chunk][key][mask], results[1][key][mask], atol=1e-5, rtol=0)


def test_score_batch_temperature_matters_and_no_topk(model) -> None:
    prompts, completions = _rows(1, [3, 5], [4, 2], model.config.vocab_size)
    batch = pack_batch(prompts, completions, PAD)
    cold = score_batch(model, batch, top_k=0, chunk_size=2, entropy_temperature=0.6)
    warm = score_batch(model, batch, top_k=0, chunk_size=2, entropy_temperature=1.0)
    assert set(cold) == {"entropy", "logp"}
    mask = batch["completion_mask"].bool()
    # The sharpened head makes the entropy temperature visible; logp is always at T = 1.
    assert (warm["entropy"][mask] - cold["entropy"][mask]).min() > 1e-2
    torch.testing.assert_close(cold["logp"], warm["logp"], atol=0, rtol=0)
    ref = _reference_row(model, prompts[0], completions[0], 0.6, 0)
    torch.testing.assert_close(cold["entropy"][0, :4], ref["entropy"], atol=ATOL, rtol=0)


def _rollouts(vocab: int):
    prompt_lens = [5, 2, 7, 3, 4, 6, 1]
    completion_lens = [3, 9, 1, 5, 4, 2, 6]
    prompts, completions = _rows(2, prompt_lens, completion_lens, vocab)
    return [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompts, completions)]


KW = dict(pad_id=PAD, batch_size=3, top_k=4, chunk_size=2, entropy_temperature=0.6, progress=False)


def test_score_rollouts_round_trip_and_resume(model, tmp_path: Path) -> None:
    rollouts = _rollouts(model.config.vocab_size)
    out_dir = tmp_path / "scores"
    summary = score_rollouts(model, rollouts, out_dir, **KW)
    assert summary["rollouts"] == 7
    assert summary["shards"] == 3  # ceil(7 / 3)
    assert summary["resumed_rollouts"] == 0
    shards = sorted(out_dir.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert sorted(os.listdir(out_dir)) == [p.name for p in shards]  # no temp files left

    # Stored dtypes.
    for path in shards:
        raw = load_file(str(path))
        assert raw["entropy"].dtype == torch.float32
        assert raw["logp"].dtype == torch.float32
        assert raw["topk_logp"].dtype == torch.float32
        assert raw["topk_ids"].dtype == torch.int32
        assert raw["rollout_index"].dtype == torch.int64
        assert raw["lengths"].dtype == torch.int64
        assert int(raw["lengths"].sum()) == raw["entropy"].shape[0]

    scores = load_scores(out_dir)
    assert sorted(scores) == list(range(len(rollouts)))
    for i, r in enumerate(rollouts):
        s = scores[i]
        n = len(r["completion_ids"])
        assert set(s) == {"entropy", "logp", "topk_logp", "topk_ids"}
        assert s["entropy"].shape == (n,) and s["logp"].shape == (n,)
        assert s["topk_logp"].shape == (n, 4) and s["topk_ids"].shape == (n, 4)
        # Equal to score_batch on the row alone and to the plain forward.
        alone = score_batch(model, pack_batch([r["prompt_ids"]], [r["completion_ids"]], PAD),
                            top_k=4, chunk_size=2, entropy_temperature=0.6)
        for key in ("entropy", "logp", "topk_logp"):
            torch.testing.assert_close(s[key], alone[key][0], atol=ATOL, rtol=0)
        ref = _reference_row(model, r["prompt_ids"], r["completion_ids"], 0.6, 4)
        torch.testing.assert_close(s["entropy"], ref["entropy"], atol=ATOL, rtol=0)
        torch.testing.assert_close(s["logp"], ref["logp"], atol=ATOL, rtol=0)
        _check_topk(s["topk_logp"], s["topk_ids"], ref)

    # Resume: delete one shard; only it is recomputed.
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    victim = shards[1]
    n_victim = int(load_file(str(victim))["lengths"].numel())
    victim.unlink()
    torn = out_dir / f".{victim.name}.tmp-99999"  # what a kill mid-write leaves
    torn.write_bytes(b"\x00" * 10)
    time.sleep(0.02)
    summary = score_rollouts(model, rollouts, out_dir, **KW)
    assert not torn.exists()
    assert summary["resumed_rollouts"] == len(rollouts) - n_victim
    assert victim.exists()
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out_dir.glob("shard-*.safetensors"))}
    assert set(after) == set(before)
    for name in before:
        if name != victim.name:
            assert after[name] == before[name], name
    assert sorted(os.listdir(out_dir)) == sorted(before)
    again = load_scores(out_dir)
    assert sorted(again) == sorted(scores)
    for i in scores:
        for key in scores[i]:
            assert torch.equal(again[i][key], scores[i][key]), (i, key)

    # A complete directory: nothing recomputed.
    summary = score_rollouts(model, rollouts, out_dir, **KW)
    assert summary["resumed_rollouts"] == len(rollouts)
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("shard-*.safetensors")} == after


def test_score_rollouts_without_topk(model, tmp_path: Path) -> None:
    rollouts = _rollouts(model.config.vocab_size)[:4]
    kw = dict(KW, top_k=0, batch_size=8)
    score_rollouts(model, rollouts, tmp_path, **kw)
    scores = load_scores(tmp_path)
    assert sorted(scores) == [0, 1, 2, 3]
    for i, r in enumerate(rollouts):
        assert set(scores[i]) == {"entropy", "logp"}
        ref = _reference_row(model, r["prompt_ids"], r["completion_ids"], 0.6, 0)
        torch.testing.assert_close(scores[i]["logp"], ref["logp"], atol=ATOL, rtol=0)


def test_score_rollouts_stops_at_a_nan_entropy_naming_rollout_and_position(model, tmp_path: Path) -> None:
    """A model that produces NaN logits is a one-line error (exit 3), not silently 'no forks'."""
    import copy

    from reasonmaxxer.errors import NonFiniteScoresError

    broken = copy.deepcopy(model)
    calls = []

    def overflow_once(module, args, out):  # the head's 2nd chunk (positions 2-3): +inf at position 3 of row 1
        calls.append(1)
        if len(calls) == 2:
            out = out.clone()
            out[1, -1, 0] = float("inf")
        return out

    broken.get_output_embeddings().register_forward_hook(overflow_once)
    rollouts = [
        {"prompt_ids": [3, 4, 5], "completion_ids": [6, 7, 8, 9]},
        {"prompt_ids": [4, 5], "completion_ids": [6, 7, 10, 8, 9]},
    ]
    with pytest.raises(NonFiniteScoresError) as err:
        score_rollouts(broken, rollouts, tmp_path / "scores", **dict(KW, batch_size=8, chunk_size=2))
    assert err.value.exit_code == 3
    assert str(err.value).startswith("scoring: rollout 1, completion position 3: the base model's entropy is nan")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "scores").glob("shard-*"))
    # the healthy model scores the same rollouts
    score_rollouts(model, rollouts, tmp_path / "ok", **dict(KW, batch_size=8))


def test_lazy_scores_equal_the_eager_loader_and_read_only_what_is_asked(model, tmp_path: Path, monkeypatch) -> None:
    """LazyScores (the training stage's loader) gives load_scores's tensors, rollout by rollout.

    Building it reads only each shard's index; a lookup reads that rollout's slices of
    one shard. It survives pickling (data-loader workers) and feeds the collator the same
    batch as the eager dict. ``keys`` narrows load_scores to the stored keys asked for.
    """
    import pickle

    import safetensors

    from reasonmaxxer.stages.scoring import LazyScores
    from reasonmaxxer.training.dataset import ForkCollator

    rollouts = _rollouts(model.config.vocab_size)
    score_rollouts(model, rollouts, tmp_path, **dict(KW, batch_size=3))  # several shards
    eager = load_scores(tmp_path)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) > 1

    sliced: list[str] = []
    real_open = safetensors.safe_open

    class CountingOpen:  # records every tensor the lazy loader reads, whole or sliced
        def __init__(self, *args, **kwargs):
            self._inner = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, key):
            sliced.append(f"whole {key}")
            return self._inner.get_tensor(key)

        def get_slice(self, key):
            sliced.append(f"slice {key}")
            return self._inner.get_slice(key)

    monkeypatch.setattr("reasonmaxxer.stages.scoring.safe_open", CountingOpen)
    lazy = LazyScores(tmp_path)
    assert set(sliced) == {"whole lengths", "whole rollout_index"}  # the index, nothing of the scores
    sliced.clear()
    first = lazy[3]
    assert sorted(sliced) == sorted(f"slice {k}" for k in eager[3])  # one rollout's slices
    monkeypatch.undo()

    assert sorted(lazy) == sorted(eager) and len(lazy) == len(eager)
    for i in eager:
        got = lazy[i]
        assert set(got) == set(eager[i])
        for key in eager[i]:
            assert torch.equal(got[key], eager[i][key]), (i, key)
    for key in first:
        assert torch.equal(first[key], eager[3][key])

    copy = pickle.loads(pickle.dumps(lazy))
    assert all(torch.equal(copy[i]["entropy"], eager[i]["entropy"]) for i in eager)

    rows = [{"rollout_index": i, "advantage": 1.0, **rollouts[i]} for i in (4, 0, 2)]
    from_lazy = ForkCollator(PAD, lazy)(rows)
    from_eager = ForkCollator(PAD, eager)(rows)
    assert from_lazy.keys() == from_eager.keys()
    assert all(torch.equal(from_lazy[k], from_eager[k]) for k in from_eager)

    only_entropy = load_scores(tmp_path, keys=("entropy",))
    assert all(set(v) == {"entropy"} and torch.equal(v["entropy"], eager[i]["entropy"])
               for i, v in only_entropy.items())
