"""Tests for reasonmaxxer.utils.sequences against brute-force layouts and plain unpadded forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reasonmaxxer.utils.sequences import pack_batch, pad_ragged

PAD = 7

# Ragged prompts and completions: a one-token completion, a one-token prompt, the longest
# prompt and the longest completion in different rows.
PROMPTS = [[11, 12, 13], [21], [31, 32, 33, 34, 35], [41, 42]]
COMPLETIONS = [[101, 102], [201, 202, 203, 204], [301], [401, 402, 403]]


def _brute_layout(prompts, completions, pad):
    """Row by row with Python lists: [pads | prompt | completion | pads]."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    ids, att, pos, comp, cmask = [], [], [], [], []
    for p, c in zip(prompts, completions):
        left = P - len(p)
        right = C - len(c)
        ids.append([pad] * left + list(p) + list(c) + [pad] * right)
        att.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        # Positions as a generation of the unpadded row would see them; padding columns get
        # whatever a cumulative count gives (0 on the left, the last position on the right).
        real = list(range(len(p) + len(c)))
        pos.append([0] * left + real + [real[-1]] * right)
        comp.append(list(c) + [pad] * right)
        cmask.append([1] * len(c) + [0] * right)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "attention_mask": t(att), "position_ids": t(pos),
            "completion_ids": t(comp), "completion_mask": t(cmask)}


def test_pack_batch_matches_brute_force_layout() -> None:
    got = pack_batch(PROMPTS, COMPLETIONS, PAD)
    want = _brute_layout(PROMPTS, COMPLETIONS, PAD)
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == torch.long, key
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), (key, got[key], want[key])
    P, C = 5, 4
    assert got["input_ids"].shape == (4, P + C)
    # Completion token j of every row sits at column P + j.
    for i, c in enumerate(COMPLETIONS):
        for j, tok in enumerate(c):
            assert got["input_ids"][i, P + j] == tok


def test_pack_batch_accepts_tensors_and_single_row() -> None:
    prompts = [torch.tensor(p) for p in PROMPTS]
    completions = [torch.tensor(c) for c in COMPLETIONS]
    got = pack_batch(prompts, completions, PAD)
    want = _brute_layout(PROMPTS, COMPLETIONS, PAD)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    one = pack_batch([[5, 6]], [[9]], PAD)
    assert one["input_ids"].tolist() == [[5, 6, 9]]
    assert one["attention_mask"].tolist() == [[1, 1, 1]]
    assert one["position_ids"].tolist() == [[0, 1, 2]]
    assert one["completion_ids"].tolist() == [[9]]
    assert one["completion_mask"].tolist() == [[1]]


def test_pack_batch_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        pack_batch([[1, 2]], [[3], [4]], PAD)


def test_position_ids_of_padded_row_equal_unpadded_row() -> None:
    batch = pack_batch(PROMPTS, COMPLETIONS, PAD)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        alone = pack_batch([p], [c], PAD)
        real = batch["attention_mask"][i].bool()
        assert int(real.sum()) == len(p) + len(c)
        # The alone row has no padding at all.
        assert bool(alone["attention_mask"].all())
        assert torch.equal(batch["input_ids"][i][real], alone["input_ids"][0])
        assert torch.equal(batch["position_ids"][i][real], alone["position_ids"][0])
        assert torch.equal(alone["position_ids"][0], torch.arange(len(p) + len(c)))


def test_padded_batch_logits_equal_unpadded_forward(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompt_lens, completion_lens = [3, 9, 1, 6], [5, 1, 7, 2]
    prompts = [torch.randint(3, V, (n,), generator=gen).tolist() for n in prompt_lens]
    completions = [torch.randint(3, V, (n,), generator=gen).tolist() for n in completion_lens]
    batch = pack_batch(prompts, completions, pad_id=2)
    P = max(prompt_lens)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([p + c])
            ref = model(input_ids=ids).logits[0]  # plain forward, no padding, default positions
            # Logits predicting completion token j: column len(p) + j - 1 alone, P + j - 1 padded.
            want = ref[len(p) - 1 : len(p) + len(c) - 1]
            got = logits[i, P - 1 : P + len(c) - 1]
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        # The check can fail: attending to the padding (mask of ones) changes the padded rows.
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["attention_mask"]),
                      position_ids=batch["position_ids"]).logits
        assert (leaky[2, P - 1 : P + 6] - logits[2, P - 1 : P + 6]).abs().max() > 1e-3
    # RoPE is shift-invariant, so this forward check cannot see a constant position
    # offset; the exact position_ids are checked by the tensor tests above.


def test_pad_ragged_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randn(n, 3, generator=gen) for n in (2, 0, 5, 1)]
    out = pad_ragged(rows, 6, value=-9.0)
    assert out.shape == (4, 6, 3)
    assert out.dtype == torch.float32
    for i, r in enumerate(rows):
        for t in range(6):
            want = r[t] if t < r.shape[0] else torch.full((3,), -9.0)
            assert torch.equal(out[i, t], want), (i, t)

    ints = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    out = pad_ragged(ints, 4, value=0)
    assert out.dtype == torch.int64
    assert out.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]

    bools = [torch.tensor([True]), torch.tensor([True, True])]
    out = pad_ragged(bools, 3, value=False)
    assert out.dtype == torch.bool
    assert out.tolist() == [[True, False, False], [True, True, False]]
    # Default padding value is 0.
    assert pad_ragged([torch.ones(1)], 2).tolist() == [[1.0, 0.0]]
