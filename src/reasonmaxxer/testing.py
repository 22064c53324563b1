"""Helpers for tests and benchmarks: a tiny Llama model and tokenizer built offline.

The tokenizer mirrors SmolLM2-Instruct's conventions (byte-level BPE with digits split
one by one, ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>`` as ids 0/1/2, eos and pad
``<|im_end|>``, a ChatML chat template) so code exercised on it behaves the same on the
embedded default.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch

from .models.loading import CHATML_TEMPLATE

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def arithmetic_lines(n: int = 400, *, seed: int = 0) -> list[str]:
    """Return ``n`` lines of generated arithmetic text (questions, answers, chat turns)."""
    rng = random.Random(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    templates = (
        "What is {a} {op} {b}? Answer: {c}",
        "Question: what is {a} {op} {b}? Reason briefly. {a} {op} {b} = {c}. Answer: {c}",
        "To compute {a} {op} {b}, we get {c}. The final answer is {c}.",
        "user\nWhat is {a} {op} {b}?\nassistant\nThe answer is {c}.\n#### {c}",
    )
    lines = []
    for _ in range(n):
        op = rng.choice(list(ops))
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        lines.append(rng.choice(templates).format(a=a, op=op, b=b, c=ops[op](a, b)))
    return lines


def build_tiny_tokenizer(*, vocab_size: int = 320, seed: int = 0):  # -> PreTrainedTokenizerFast
    """Train a small byte-level BPE tokenizer in-process and wrap it for transformers.

    The 256-byte alphabet and the 3 special tokens are always present, so the vocabulary
    holds at least 259 entries whatever ``vocab_size`` says; the rest are merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def batches() -> Iterator[list[str]]:
        lines = arithmetic_lines(400, seed=seed)
        for i in range(0, len(lines), 100):
            yield lines[i : i + 100]

    tok.train_from_iterator(batches(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model_dir(
    path: str | Path,
    *,
    vocab_size: int = 320,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build a tiny ``LlamaForCausalLM`` plus tokenizer and save both (safetensors) to ``path``.

    Runs offline in about a second. The model has 4 heads, 2 kv heads, intermediate size
    2 × hidden, untied embeddings and a seeded random init; the global RNG is untouched.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, seed=seed)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def tiny_run_args(model_dir: str | Path, run_dir: str | Path, *extra: str) -> list[str]:
    """train.py/eval.py arguments for a run on the tiny model that takes seconds."""
    return [
        "--no-progress",
        "--model.name_or_path", str(model_dir),
        "--output_dir", str(run_dir),
        "--data.num_train", "6", "--data.num_heldout", "4",
        "--rollout.num_samples", "4", "--rollout.max_new_tokens", "12", "--rollout.batch_size", "8",
        "--scoring.top_k", "8", "--scoring.chunk_size", "5",
        "--training.max_steps", "3", "--training.per_device_train_batch_size", "4",
        "--training.save_steps", "2",
        *extra,
    ]


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes (gloo), for tests and benchmarks.

    accelerate 1.16 turns ``ACCELERATE_USE_FSDP`` into FSDP only for GPU-like distributed
    types, so on CPU processes the Trainer runs DDP. This lifts that one check, before the
    Trainer builds its accelerator, by presenting the CPU launch to it as a multi-device
    one; everything after is accelerate's and torch's real FSDP2 (wrapping, mixed
    precision, state dicts, distributed checkpoints). Call it once, before the Trainer.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "allows_fsdp_on_cpu", False):
        return

    def lifted(self, *args, **kwargs):
        if not AcceleratorState._shared_state and PartialState._shared_state.get(
                "distributed_type") == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # read by the FSDP branch
        init(self, *args, **kwargs)

    lifted.allows_fsdp_on_cpu = True
    AcceleratorState.__init__ = lifted
