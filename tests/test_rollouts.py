"""Tests for reasonmaxxer.stages.sampling and .rollouts with the tiny model: prompts, EOS cutting, sampling, resume.

References: the ChatML text written out by hand, a greedy decode by plain full forward
passes of each unpadded prompt, reasonmaxxer.data.rewards.verify, and an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import count_device_reads
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasonmaxxer.config.loading import load_config
from reasonmaxxer.config.schema import DataConfig, RolloutConfig
from reasonmaxxer.data.builtin import builtin_arithmetic
from reasonmaxxer.data.problem import Problem
from reasonmaxxer.data.rewards import verify
from reasonmaxxer.errors import ConfigError
from reasonmaxxer.stages.rollouts import RolloutReward, run_rollouts
from reasonmaxxer.stages.sampling import (
    chat_prompt_ids,
    cut_at_eos,
    eos_token_ids,
    fast_generate,
    generate_batch,
    plain_prompt_ids,
    prompt_ids,
    resolve_prompt_format,
    sample_next,
)

CFG = RolloutConfig(num_samples=2, max_new_tokens=8, batch_size=4)
FIELDS = {"problem_id", "sample", "prompt_ids", "completion_ids", "text", "finish", "reward"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, tokenizer):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # A fresh random head almost never samples EOS in 8 tokens; sharpen it and give EOS a
    # context-dependent logit of the same scale, so completions end both ways (EOS at
    # varying lengths, and at max_new_tokens).
    with torch.no_grad():
        w = m.get_output_embeddings().weight
        w.mul_(20.0)
        w[tokenizer.eos_token_id] = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))
    return m


@pytest.fixture(scope="module")
def problems():
    return builtin_arithmetic(6, seed=0)


# --------------------------------------------------------------------------------------
# chat_prompt_ids
# --------------------------------------------------------------------------------------


def _chatml(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
        "<|im_start|>assistant\n"
    )


def test_chat_prompt_ids_default_template(tokenizer) -> None:
    problem = Problem(id="p", prompt="What is 12 + 7?", answer="19")
    data = DataConfig()
    ids = chat_prompt_ids(tokenizer, problem, data)
    user = data.user_template().replace("{question}", problem.prompt)
    assert user.startswith("What is 12 + 7?\n\n") and "Answer: <number>" in user
    want_text = _chatml([{"role": "user", "content": user}])
    assert tokenizer.decode(ids) == want_text
    assert ids == tokenizer(want_text, add_special_tokens=False)["input_ids"]
    im_start, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert ids[0] == im_start  # special tokens are single ids, no BOS added twice
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert all(isinstance(i, int) for i in ids)


def test_chat_prompt_ids_custom_template_and_system(tokenizer) -> None:
    problem = Problem(id="p", prompt="What is 3 × 4?", answer="12")
    data = DataConfig(prompt_template="Q: {question}\nA (number only):", system_prompt="Be brief.")
    ids = chat_prompt_ids(tokenizer, problem, data)
    want_text = _chatml([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: What is 3 × 4?\nA (number only):"},
    ])
    assert tokenizer.decode(ids) == want_text
    assert ids == tokenizer(want_text, add_special_tokens=False)["input_ids"]
    # A different question gives a different prompt, the same frame.
    other = chat_prompt_ids(tokenizer, Problem(id="q", prompt="What is 5 × 6?", answer="30"), data)
    assert tokenizer.decode(other) == want_text.replace("3 × 4", "5 × 6")


# --------------------------------------------------------------------------------------
# prompt formats: chat, plain (base models without a chat template), auto
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_tokenizer(tiny_model_dir: Path):
    """The tiny tokenizer as a base model's: no chat template, a BOS added to every text."""
    from tokenizers.processors import TemplateProcessing

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    tok.chat_template = None
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    return tok


def test_plain_prompt_is_system_blank_line_user_with_bos(base_tokenizer) -> None:
    problem = Problem(id="p", prompt="What is 3 × 4?", answer="12")
    bos = base_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    data = DataConfig(prompt_format="plain", system_prompt="You are a careful solver.")
    ids = prompt_ids(base_tokenizer, problem, data, "plain")
    want_text = ("You are a careful solver.\n\nWhat is 3 × 4?\n\nReason briefly, then give the final answer on "
                 "the last line as 'Answer: <number>'.")
    assert ids[0] == bos and bos not in ids[1:]  # the tokenizer's own BOS, once
    assert base_tokenizer.decode(ids[1:]) == want_text
    no_system = prompt_ids(base_tokenizer, problem, DataConfig(prompt_preset="boxed"), "plain")
    assert base_tokenizer.decode(no_system[1:]) == (
        "What is 3 × 4?\nPlease reason step by step, and put your final answer within \\boxed{}.")


def test_auto_format_follows_the_chat_template_and_says_so_once(tokenizer, base_tokenizer, caplog) -> None:
    problem = Problem(id="p", prompt="What is 12 + 7?", answer="19")
    with caplog.at_level(logging.INFO, logger="reasonmaxxer.stages.sampling"):
        assert resolve_prompt_format(tokenizer, DataConfig()) == "chat"
        assert resolve_prompt_format(base_tokenizer, DataConfig()) == "plain"
        assert resolve_prompt_format(tokenizer, DataConfig(prompt_format="plain")) == "plain"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["prompts: chat format (auto: the tokenizer has a chat template)",
                     "prompts: plain format (auto: the tokenizer has no chat template)",
                     "prompts: plain format (data.prompt_format)"]
    # A model with a template gets the same ids from auto as before (the chat ones).
    assert prompt_ids(tokenizer, problem, DataConfig(), "chat") == chat_prompt_ids(tokenizer, problem, DataConfig())


def test_chat_format_without_a_template_is_a_one_line_config_error(base_tokenizer) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_prompt_format(base_tokenizer, DataConfig(prompt_format="chat"))
    assert str(err.value).startswith("data.prompt_format: 'chat' needs a tokenizer with a chat template")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------
# cut_at_eos
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "eos", "want"),
    [
        ([5, 6, 2, 2, 2], {2}, ([5, 6, 2], "eos")),  # cut after the first EOS, padding gone
        ([5, 6, 7], {2}, ([5, 6, 7], "length")),
        ([2, 5, 6], {2}, ([2], "eos")),
        ([5, 6, 2], {2}, ([5, 6, 2], "eos")),  # EOS as the last allowed token
        ([5, 9, 6, 2], {2, 9}, ([5, 9], "eos")),  # any of several EOS ids
        ([], {2}, ([], "length")),
        ([5, 6], set(), ([5, 6], "length")),
    ],
)
def test_cut_at_eos(tokens, eos, want) -> None:
    got = cut_at_eos(tokens, eos)
    assert got == want
    assert all(type(t) is int for t in got[0])


def test_cut_at_eos_tensor_row() -> None:
    got = cut_at_eos(torch.tensor([4, 3, 2, 2]).tolist(), {2})
    assert got == ([4, 3, 2], "eos")


def test_eos_token_ids(model, tokenizer) -> None:
    assert eos_token_ids(model, tokenizer) == {tokenizer.eos_token_id}


# --------------------------------------------------------------------------------------
# generate_batch: a near-zero temperature reproduces a greedy decode of each prompt alone
# --------------------------------------------------------------------------------------


@torch.no_grad()
def _greedy(model, prompt, max_new, eos):
    ids = list(prompt)
    out = []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
        if tok in eos:
            return out, "eos"
    return out, "length"


def test_generate_batch_left_padded_equals_greedy_alone(model, tokenizer, problems) -> None:
    data = DataConfig()
    prompts = [chat_prompt_ids(tokenizer, p, data) for p in problems[:3]]
    assert len({len(p) for p in prompts}) > 1  # ragged: some rows are left-padded
    eos = eos_token_ids(model, tokenizer)
    cfg = replace(CFG, temperature=1e-4, top_p=1.0, max_new_tokens=10)
    got = generate_batch(model, tokenizer, prompts, cfg, eos, seed=0)
    assert len(got) == 3 and all(len(samples) == 2 for samples in got)
    finishes = set()
    for prompt, samples in zip(prompts, got):
        want = _greedy(model, prompt, 10, eos)
        finishes.add(want[1])
        for sample in samples:
            assert sample == want
    assert finishes == {"eos", "length"}, finishes  # both endings exercised


# --------------------------------------------------------------------------------------
# run_rollouts
# --------------------------------------------------------------------------------------


def _read(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count_generate(model, monkeypatch):
    """Count the sampling calls (any backend) and the prompts in each."""
    import reasonmaxxer.stages.rollouts as rollouts_module

    calls = []
    original = rollouts_module.generate_batch

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(rollouts_module, "generate_batch", counting)
    return calls


def test_run_rollouts_records(model, tokenizer, problems, tmp_path: Path) -> None:
    data = DataConfig()
    path = tmp_path / "rollouts.jsonl"
    summary = run_rollouts(model, tokenizer, problems, data, CFG, path, seed=0, progress=False)
    records = _read(path)
    assert summary["rollouts"] == len(records) == 12
    assert summary["problems"] == 6
    assert summary["resumed_from"] == 0
    eos = eos_token_ids(model, tokenizer)
    by_problem = {p.id: p for p in problems}
    seen = {}
    for r in records:
        assert FIELDS <= set(r), set(r)
        seen.setdefault(r["problem_id"], []).append(r["sample"])
        problem = by_problem[r["problem_id"]]
        assert r["prompt_ids"] == chat_prompt_ids(tokenizer, problem, data)
        c = r["completion_ids"]
        assert 1 <= len(c) <= CFG.max_new_tokens
        # Ends with an EOS id iff finish == "eos"; no EOS before the end.
        assert r["finish"] in ("eos", "length")
        assert (c[-1] in eos) == (r["finish"] == "eos")
        assert not any(t in eos for t in c[:-1])
        if r["finish"] == "length":
            assert len(c) == CFG.max_new_tokens
        assert r["text"] == tokenizer.decode(c, skip_special_tokens=True)
        assert r["reward"] in (0, 1)
        assert (r["reward"], r["extracted"]) == tuple(verify(r["text"], problem.answer))
    assert {pid: sorted(s) for pid, s in seen.items()} == {p.id: [0, 1] for p in problems}
    assert {r["finish"] for r in records} == {"eos", "length"}  # both endings exercised
    assert summary["new_tokens_this_run"] == sum(len(r["completion_ids"]) for r in records)
    assert summary["mean_reward"] == pytest.approx(sum(r["reward"] for r in records) / 12)
    # Samples differ: not one completion copied num_samples times everywhere.
    assert len({tuple(r["completion_ids"]) for r in records}) > 6

    # Same seed, fresh file: identical rollouts. Another seed: different ones.
    again = tmp_path / "again.jsonl"
    run_rollouts(model, tokenizer, problems, data, CFG, again, seed=0, progress=False)
    assert _read(again) == records
    other = tmp_path / "other.jsonl"
    run_rollouts(model, tokenizer, problems, data, CFG, other, seed=1, progress=False)
    assert [r["completion_ids"] for r in _read(other)] != [r["completion_ids"] for r in records]


class _Stop(KeyboardInterrupt):
    pass


def _key(records):
    return {(r["problem_id"], r["sample"]): r["completion_ids"] for r in records}


def test_run_rollouts_resume_after_interrupt(model, tokenizer, problems, tmp_path: Path, monkeypatch) -> None:
    data = DataConfig()
    path_a, path_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    calls = _count_generate(model, monkeypatch)
    run_rollouts(model, tokenizer, problems, data, CFG, path_a, seed=3, progress=False)
    full = _read(path_a)
    n_batches = len(calls)
    per_call = CFG.batch_size // CFG.num_samples
    assert n_batches == -(-len(problems) // per_call) == 3
    assert calls == [per_call] * n_batches  # prompts per generate call

    def stop_after_first(b: int) -> None:
        raise _Stop

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_rollouts(model, tokenizer, problems, data, CFG, path_b, seed=3, progress=False,
                     on_batch=stop_after_first)
    assert len(calls) == 1
    partial = _read(path_b)
    assert len(partial) == per_call * CFG.num_samples
    assert partial == full[: len(partial)]  # the first batch, written whole

    calls.clear()
    summary = run_rollouts(model, tokenizer, problems, data, CFG, path_b, seed=3, progress=False)
    assert summary["resumed_from"] == len(partial)
    assert len(calls) == n_batches - 1  # only the missing batches were generated
    final = _read(path_b)
    assert _key(final) == _key(full)
    assert final == full

    # A finished file: nothing generated.
    calls.clear()
    summary = run_rollouts(model, tokenizer, problems, data, CFG, path_b, seed=3, progress=False)
    assert calls == []
    assert summary["resumed_from"] == len(full) and summary["new_tokens_this_run"] == 0
    assert _read(path_b) == full


def test_run_rollouts_resume_after_torn_batch_write(model, tokenizer, problems, tmp_path: Path) -> None:
    """A kill in the middle of a batch's write leaves part of that batch (and a torn line):
    the resumed run must still give every problem num_samples rollouts, as uninterrupted."""
    data = DataConfig()
    path_a, path_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_rollouts(model, tokenizer, problems, data, CFG, path_a, seed=4, progress=False)
    full_bytes = path_a.read_bytes()
    full = _read(path_a)
    lines = full_bytes.splitlines(keepends=True)
    per_batch = (CFG.batch_size // CFG.num_samples) * CFG.num_samples  # 4 records
    # Batch 0 complete, then batch 1 torn inside its last record (3 whole lines + half).
    torn = b"".join(lines[: per_batch + 3]) + lines[per_batch + 3][:20]
    path_b.write_bytes(torn)
    run_rollouts(model, tokenizer, problems, data, CFG, path_b, seed=4, progress=False)
    final = _read(path_b)
    counts = {}
    for r in final:
        counts[r["problem_id"]] = counts.get(r["problem_id"], 0) + 1
    assert counts == {p.id: CFG.num_samples for p in problems}, counts
    assert _key(final) == _key(full)


# ----------------------------------------------------------------------------- fast backend



def _nucleus_reference(logits, temperature, top_p):
    """HF-style nucleus by a loop: sort, keep the smallest prefix with mass >= top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True)
    kept, mass = [], 0.0
    for i in order.tolist():
        if mass >= top_p:
            break
        kept.append(i)
        mass += probs[i].item()
    out = torch.zeros_like(probs)
    out[kept] = probs[kept] / probs[kept].sum()
    return out


@pytest.mark.parametrize("candidates", [3, 256])  # 3: forces the full-sort fallback
def test_sample_next_matches_the_nucleus_distribution(candidates):
    torch.manual_seed(0)
    logits = torch.randn(2, 12) * 2
    logits[1] = logits[1] * 0.1  # flat row: the nucleus is wide
    g = torch.Generator().manual_seed(1)
    draws = 20000
    counts = torch.zeros(2, 12)
    for _ in range(draws // 500):
        batch = logits.repeat(500, 1)
        toks = sample_next(batch, temperature=0.7, top_p=0.9, generator=g, candidates=candidates).view(500, 2)
        for row in range(2):
            counts[row] += torch.bincount(toks[:, row], minlength=12)
    for row in range(2):
        expected = _nucleus_reference(logits[row], 0.7, 0.9)
        empirical = counts[row] / draws
        assert torch.all(empirical[expected == 0] == 0)  # nothing outside the nucleus
        assert torch.allclose(empirical, expected.float(), atol=0.015)


def test_sample_next_greedy_and_top_p_one():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 2.0]])
    assert sample_next(logits, temperature=1.0, top_p=0.9, generator=None, do_sample=False).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    toks = sample_next(logits.repeat(4000, 1), temperature=1.0, top_p=1.0, generator=g).view(4000, 2)
    freq = torch.bincount(toks[:, 0], minlength=3).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)


def test_fast_generate_greedy_equals_hf_generate(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # make some rows end early: EOS likely after a few tokens
        model.lm_head.weight[tokenizer.eos_token_id] += 0.6 * model.lm_head.weight.mean(0)
    prompts = [tokenizer("What is 12 + 7?")["input_ids"], tokenizer("3 * 4 =")["input_ids"],
               tokenizer("Compute 100 - 1 and say the answer")["input_ids"]]
    eos = {tokenizer.eos_token_id}
    fast_cfg = RolloutConfig(num_samples=1, max_new_tokens=10, backend="fast")
    hf_cfg = RolloutConfig(num_samples=1, max_new_tokens=10, backend="hf")
    fast = generate_batch(model, tokenizer, prompts, fast_cfg, eos, seed=0, do_sample=False)
    hf = generate_batch(model, tokenizer, prompts, hf_cfg, eos, seed=0, do_sample=False)
    assert fast == hf
    assert {f for rows in fast for _, f in rows} <= {"eos", "length"}


def test_fast_generate_samples_are_seeded_and_shaped(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer("What is 1 + 1?")["input_ids"], tokenizer("2 * 2")["input_ids"]]
    cfg = RolloutConfig(num_samples=3, max_new_tokens=6, temperature=1.0, top_p=0.95)
    a = fast_generate(model, prompts, cfg, {tokenizer.eos_token_id}, tokenizer.pad_token_id, seed=5)
    b = fast_generate(model, prompts, cfg, {tokenizer.eos_token_id}, tokenizer.pad_token_id, seed=5)
    c = fast_generate(model, prompts, cfg, {tokenizer.eos_token_id}, tokenizer.pad_token_id, seed=6)
    assert a == b and a != c
    assert len(a) == 2 and all(len(rows) == 3 for rows in a)
    for rows in a:
        for toks, finish in rows:
            assert 1 <= len(toks) <= 6
            assert (finish == "eos") == (toks[-1] == tokenizer.eos_token_id)


@pytest.mark.parametrize("do_sample, top_p", [(True, 0.9), (True, 1.0), (False, 1.0)])
def test_fast_generate_reads_the_device_at_most_once_per_step(model, tokenizer, monkeypatch, do_sample, top_p):
    """One small read per decode step (finished and nucleus-fallback flags) plus one of the tokens at the end.

    Decode steps are counted as the model's forward calls (the prefill is the first).
    Before, the loop read the tokens, the live rows, the finished rows and two any/all
    flags each step, and the sampler its fallback flag: 5 to 7 reads per step.
    """
    prompts = [tokenizer("What is 12 + 7?")["input_ids"], tokenizer("3 * 4 =")["input_ids"]]
    cfg = RolloutConfig(num_samples=4 if do_sample else 1, max_new_tokens=8, temperature=1.0, top_p=top_p)
    # Sampling: the first seed where rows left the batch early and others ran to the end, so
    # both paths of the loop ran (which seed that is depends on torch's random streams).
    for seed in range(3, 43):
        forwards = []
        hook = model.register_forward_hook(lambda *_: forwards.append(1))
        reads = count_device_reads(monkeypatch)
        try:
            out = fast_generate(model, prompts, cfg, {tokenizer.eos_token_id}, tokenizer.pad_token_id, seed=seed,
                                do_sample=do_sample)
        finally:
            monkeypatch.undo()
            hook.remove()
        finishes = [f for rows in out for _, f in rows]
        if not do_sample or ("eos" in finishes and "length" in finishes):
            break
    if do_sample:
        assert "eos" in finishes and "length" in finishes and len(forwards) == cfg.max_new_tokens, seed
    assert set(reads) <= {("tolist", "sampling.py")}, reads
    assert len(reads) <= len(forwards) + 1, (len(reads), len(forwards))


# --------------------------------------------------------------------------------------
# run_rollouts with a base model's plain prompts and with a user reward function
# --------------------------------------------------------------------------------------


def test_run_rollouts_with_a_base_tokenizer_uses_plain_prompts(model, base_tokenizer, problems, tmp_path) -> None:
    data = DataConfig()  # prompt_format auto; before it, apply_chat_template raised ValueError here
    path = tmp_path / "plain.jsonl"
    run_rollouts(model, base_tokenizer, problems[:2], data, CFG, path, seed=0, progress=False)
    records = _read(path)
    assert len(records) == 4
    by_id = {p.id: p for p in problems}
    for r in records:
        assert r["prompt_ids"] == plain_prompt_ids(base_tokenizer, by_id[r["problem_id"]], data)


REWARD_MODULE = """
calls = []

def parity(prompts, completions, completion_ids, answer, kind, problem_id, **kwargs):
    calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                  "answer": answer, "kind": kind, "problem_id": problem_id})
    return [float(len(ids) % 2 == 0) if len(ids) > 3 else None for ids in completion_ids]
"""


def test_run_rollouts_calls_the_reward_function_once_per_batch(model, tokenizer, problems, tmp_path,
                                                                monkeypatch) -> None:
    (tmp_path / "parity_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "parity_rewards", raising=False)
    cfg = load_config(None, ["--reward.function", "parity_rewards:parity"])
    reward = RolloutReward.from_config(cfg)
    module = sys.modules["parity_rewards"]
    data = DataConfig()
    path = tmp_path / "custom.jsonl"
    summary = run_rollouts(model, tokenizer, problems, data, CFG, path, seed=0, progress=False, reward=reward)
    records = _read(path)
    per_call = CFG.batch_size // CFG.num_samples
    assert len(module.calls) == -(-len(problems) // per_call)  # one call per sampled batch
    assert sum(len(c["completions"]) for c in module.calls) == len(records) == 12
    by_id = {p.id: p for p in problems}
    call_rows = {(pid, tuple(ids)): (prompt, text, answer, kind)
                 for c in module.calls
                 for prompt, text, ids, answer, kind, pid in zip(c["prompts"], c["completions"], c["completion_ids"],
                                                                 c["answer"], c["kind"], c["problem_id"])}
    for r in records:
        problem = by_id[r["problem_id"]]
        n = len(r["completion_ids"])
        assert r["reward"] == (float(n % 2 == 0) if n > 3 else 0.0)  # None counts as 0
        assert r["extracted"] is None
        prompt, text, answer, kind = call_rows[(problem.id, tuple(r["completion_ids"]))]
        assert prompt == data.user_template().replace("{question}", problem.prompt)
        assert (text, answer, kind) == (r["text"], problem.answer, problem.kind)
    assert {r["reward"] for r in records} == {0.0, 1.0}
    assert summary["mean_reward"] == pytest.approx(sum(r["reward"] for r in records) / 12)


def test_boxed_preset_makes_the_verifier_require_a_box(model, tokenizer, problems, tmp_path, monkeypatch) -> None:
    import reasonmaxxer.stages.rollouts as rollouts_module

    assert RolloutReward.from_config(load_config(None, [])).answer_format == "any"
    boxed = RolloutReward.from_config(load_config(None, ["--data.prompt_preset", "boxed"]))
    assert boxed.answer_format == "boxed"
    assert RolloutReward.from_config(load_config(None, ["--data.prompt_preset", "boxed",
                                                        "--reward.answer_format", "any"])).answer_format == "any"
    seen = []
    monkeypatch.setattr(rollouts_module, "verify", lambda text, answer, fmt: seen.append(fmt) or (0.0, None))
    run_rollouts(model, tokenizer, problems[:2], DataConfig(prompt_preset="boxed"), CFG, tmp_path / "b.jsonl",
                 seed=0, progress=False, reward=boxed)
    assert seen == ["boxed"] * 4


@pytest.mark.parametrize(("budget", "num_samples", "max_new_tokens"), [(0, 8, 16), (2000, 8, 16), (600, 20, 10),
                                                                         (100, 8, 16), (10**6, 4, 32)])
def test_rollout_batches_fill_the_token_budget_greedily(budget, num_samples, max_new_tokens):
    """Against the rule itself: every call fits (or is one prompt), none could take the next prompt,
    and the calls cover the prompts in order; without a budget, batch_size // num_samples prompts."""
    import random

    from reasonmaxxer.config import RolloutConfig
    from reasonmaxxer.data.problem import Problem
    from reasonmaxxer.stages.rollouts import rollout_batches

    rng = random.Random(budget)
    lengths = sorted(rng.randint(5, 60) for _ in range(37))
    order = [Problem(id=f"p{i}", prompt="q", answer="1", kind="add") for i in range(len(lengths))]
    cfg = RolloutConfig(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=32, batch_tokens=budget)
    batches = rollout_batches(order, lengths, cfg)
    assert [p for b in batches for p in b] == order
    index = {p.id: i for i, p in enumerate(order)}

    def cost(batch):
        return len(batch) * num_samples * (max(lengths[index[p.id]] for p in batch) + max_new_tokens)

    if budget == 0:
        assert [len(b) for b in batches[:-1]] == [max(1, 32 // num_samples)] * (len(batches) - 1)
        return
    for b, nxt in zip(batches, batches[1:] + [None]):
        assert len(b) == 1 or cost(b) <= budget
        if nxt is not None:
            assert cost(b + nxt[:1]) > budget  # greedy: the next prompt would not have fit
