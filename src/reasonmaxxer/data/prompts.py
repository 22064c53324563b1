"""The instruction around a problem's question, and how the prompt is framed for the model.

A run's user message is ``data.prompt_template`` (or its ``data.prompt_preset``'s template)
with ``{question}`` filled in; :mod:`reasonmaxxer.stages.sampling` frames it with the
model's chat template (``chat``) or as bare text (``plain``, for base models).
"""

from __future__ import annotations

import typing
from typing import Literal

PromptFormat = Literal["auto", "chat", "plain"]
"""auto: chat when the tokenizer has a chat template, plain otherwise."""

PromptPreset = Literal["answer_line", "boxed"]
"""A shipped instruction: the final answer on an 'Answer:' line, or inside ``\\boxed{}``."""

PROMPT_PRESETS: dict[str, str] = {
    "answer_line": (
        "{question}\n\nReason briefly, then give the final answer on the last line as 'Answer: <number>'."
    ),
    # The instruction Qwen2.5-Math and most MATH-style RL recipes train and evaluate with.
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.",
}
assert set(PROMPT_PRESETS) == set(typing.get_args(PromptPreset))


def user_message(template: str, question: str) -> str:
    """The user turn: ``template`` with ``{question}`` replaced (other braces kept as written)."""
    return template.replace("{question}", question)
