"""Tests for reasonmaxxer.data.rewards: answer extraction and verification."""

from __future__ import annotations

import threading
import time

import pytest

from reasonmaxxer.data.rewards import answers_equal, extract_answer, verify

# Realistic SmolLM2-135M-style completions: rambling, several numbers, rarely a format.
EXTRACTION_CASES = [
    ("To find the total, we add 12 and 30. 12 + 30 = 42. So Sam has 42 apples.", "42"),
    ("Let's think step by step.\n7 × 8 is 56.\nAnswer: 56", "56"),
    ("The product of 9 and 6: 9 + 9 + 9 + 9 + 9 + 9 = 54.\nThe answer is 54.", "54"),
    ("ANSWER: 17\nI hope this helps! Let me know if you have 2 more questions.", "17"),
    ("**Answer:** 96", "96"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 1,234", "1234"),
    ("For all 3 items the total cost is $1,234.50.", "1234.50"),
    ("So the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("First \\boxed{3}, then corrected: \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("x = \\boxed{5}. Check: 2 * 5 = 10.", "5"),
    ("The final answer is: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The answer is $42$.", "42"),
    ("The answer is 12 (since 3 × 4 = 12).", "12"),
    ("Answer: 3 × 4 = 12", "12"),
    ("The temperature dropped to -5 degrees.", "-5"),
    ("Step 1: 7 - 10 = -3", "-3"),
    ("The difference is \u22127.", "-7"),
    ("We compute 10-5 and get 5, then 5-3", "3"),
    ("That gives 3.5.", "3.5"),
    ("Half of it is 1/2.", "1/2"),
    ("Answer: <number>. Let me think: 3 times 4 is 12", "12"),
    ("The answer isn't 5, it is 6", "6"),
    ("I'm not sure how to solve this problem.", None),
    ("He came 2nd and she came 7th.", None),
    ("\\boxed{}", None),
    ("", None),
]


@pytest.mark.parametrize(("completion", "expected"), EXTRACTION_CASES)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_boxed_wins_over_later_numbers_and_markers():
    text = "Answer: 7\nso \\boxed{12} and then 99 more words 100"
    assert extract_answer(text) == "12"


def test_marker_wins_over_later_numbers():
    assert extract_answer("Answer: 42\nThere were 3 steps and 2 checks.") == "42"


def test_extract_answer_ignores_non_text():
    assert extract_answer(None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("completion", "gold", "reward"),
    [
        ("So the answer is 0.5", "1/2", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("Answer: 1/2", "\\frac{1}{2}", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("Answer: 42.0", "42", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("Total: 1234", "1,234", 1.0),
        ("12 + 30 = 42", "42", 1.0),
        ("The result is 0.3333333", "1/3", 1.0),
        ("Answer: 41", "42", 0.0),
        ("12 + 30 = 43", "42", 0.0),
        ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("Answer: -42", "42", 0.0),
        ("no numbers here", "42", 0.0),
    ],
)
def test_verify(completion, gold, reward):
    got, extracted = verify(completion, gold)
    assert got == reward
    assert (extracted is None) == (completion == "no numbers here")


def test_verify_returns_extracted_answer():
    assert verify("Let me see, 6 × 7 = 42.", "42") == (1.0, "42")
    assert verify("nothing", "42") == (0.0, None)


def test_verify_gold_in_gsm8k_or_boxed_form():
    assert verify("Answer: 72", "48 + 24 = 72\n#### 72")[0] == 1.0
    assert verify("Answer: 1/2", "so it is \\boxed{\\frac12}")[0] == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{(10^{100})!}",
        "\\boxed{10^{1000000000}}",
        "\\boxed{\\frac{1}{0}}",
        "\\boxed{{{{}}}",
        "Answer: $$$$",
        "\\boxed{\\left( \\right.}",
        "}{" * 500 + "\\boxed{" + "{" * 300,
        "\x00\x01 ∞ 🙂 ½ NaN inf 1e999999",
        "1" * 5000,
    ],
)
def test_verify_never_raises_and_stays_fast(completion):
    start = time.perf_counter()
    reward, _ = verify(completion, "5")
    assert reward == 0.0
    assert time.perf_counter() - start < 1.0


def test_verify_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(verify("\\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join(timeout=30)
    assert results == [(1.0, "\\frac{1}{2}")]


def test_numeric_path_is_fast():
    text = "We add 12 and 30 to get 42, then check 42 - 12 = 30. " * 4 + "Answer: 42"
    start = time.perf_counter()
    for _ in range(2000):
        assert verify(text, "42")[0] == 1.0
    assert time.perf_counter() - start < 2.0


def test_answers_equal():
    assert answers_equal("0.5", "1/2")
    assert answers_equal(" 42 ", "42")
    assert answers_equal("x + 1", "1 + x")
    assert not answers_equal("x + 2", "1 + x")
    assert not answers_equal("7", "8")


# --------------------------------------------------------------------------------------
# answer_format="boxed": only the last \boxed{...} is the answer (the MATH-style preset)
# --------------------------------------------------------------------------------------

BOXED_CASES = [
    # (completion, what the boxed format extracts)
    ("So x = 1/2, and the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
    ("Try \\boxed{3}. No wait, recheck: \\boxed{4}. Then 4 + 1 = 5 is unrelated.", "4"),  # last box wins
    ("The area is \\boxed{\\sqrt{\\frac{3}{4}}} square units, about 0.87", "\\sqrt{\\frac{3}{4}}"),
    ("We get $\\boxed{-7}$ after 3 steps.", "-7"),
    ("Reasoning... so the answer is 12, step 13.", None),  # stray numbers, no box
    ("Answer: 12", None),  # an Answer: line is not the boxed form
    ("\\boxed{}", None),  # an empty box holds nothing
]


@pytest.mark.parametrize(("completion", "want"), BOXED_CASES)
def test_extract_answer_boxed_reads_only_the_last_box(completion, want):
    assert extract_answer(completion, "boxed") == want


def test_boxed_format_rejects_a_correct_number_outside_a_box():
    # The same completion is right under the lenient format and has no answer under boxed.
    text = "6 × 7 gives 42, so 42"
    assert verify(text, "42") == (1.0, "42")
    assert verify(text, "42", "boxed") == (0.0, None)
    boxed = "6 × 7 gives \\boxed{42}. Then 43 is the next number."
    assert verify(boxed, "42", "boxed") == (1.0, "42")
    assert verify(boxed, "42")[0] == 1.0  # the default also prefers the box


def test_boxed_format_compares_symbolically_with_the_gold():
    assert verify("\\boxed{\\frac{1}{2}}", "0.5", "boxed")[0] == 1.0
    assert verify("first \\boxed{\\frac{1}{2}}, final \\boxed{\\frac{1}{3}}", "1/2", "boxed")[0] == 0.0
    assert verify("done: \\boxed{\\frac{2}{4}}", "\\boxed{\\frac12}", "boxed")[0] == 1.0
