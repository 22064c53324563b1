"""Answer extraction and verification for rollouts.

:func:`extract_answer` pulls the final answer out of a completion; :func:`verify` turns
it into a 0/1 reward against the gold answer. Comparison is exact-numeric first (cheap,
covers the built-in arithmetic task) and falls back to ``math_verify`` for symbolic
answers (``\\frac{1}{2}`` vs ``0.5``). Nothing here raises on model text.
"""

from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction
from typing import Any, Literal

__all__ = ["AnswerFormat", "answers_equal", "extract_answer", "verify"]

AnswerFormat = Literal["any", "boxed"]
"""What counts as a completion's final answer: ``any`` (a box, an "Answer:" line or the
last number) or ``boxed`` (only the last ``\\boxed{...}``; a completion without one has no answer)."""

NUMERIC_TOLERANCE = 1e-6
"""Two numeric answers closer than this are equal."""

# math_verify's own timeout uses signal.alarm, which only works on the main thread; off
# it we run without one and rely on _looks_expensive() to keep sympy out of trouble.
_MATH_VERIFY_TIMEOUT_S = 2
_MAX_SYMBOLIC_CHARS = 200

# A number as written in prose: optional sign (not a hyphen between words or operands),
# thousands separators, decimals, a simple fraction; never the "5" of "5th".
_NUMBER = re.compile(
    r"(?:(?<![\w)\].])-)?"
    r"(?<![\w.])"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:\.\d+)?"
    r"(?:/\d+(?!\.\d))?"
    r"(?!st\b|nd\b|rd\b|th\b)"
)
_FULL_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_MARKER = re.compile(r"(?:\banswer\b\s*(?:is(?!n)\b|:|=)|####)[\s:*]*([^\n]*)", re.IGNORECASE)
_MATH_SPAN = re.compile(r"\$([^$]+)\$|\\\((.+?)\\\)")
_LATEX_END = re.compile(r"\.\s|,\s|\s+(?=[A-Za-z]{2,}\b)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_UNICODE_MINUS = str.maketrans({"\u2212": "-"})


def _clean(candidate: str) -> str | None:
    """Strip spaces, ``$`` and trailing periods; drop thousands separators of a number."""
    text = candidate.strip().strip("$").strip()
    text = text.removeprefix("\\$").rstrip(".").strip()
    if _FULL_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    return text or None


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces (or ``\\boxed 5``)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for pos in range(start, len(text)):
                if text[pos] == "{":
                    depth += 1
                elif text[pos] == "}":
                    depth -= 1
                    if depth == 0:
                        content = _clean(text[start + 1 : pos])
                        if content:
                            return content
                        break
        else:
            token = re.match(r"[^\s$]+", text[start:])
            if token and (content := _clean(token.group(0))):
                return content
    return None


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return _clean(match.group(0)) if match else None


def _from_marker_rest(rest: str) -> str | None:
    """The answer in what follows an "Answer:"-style marker, if it holds one."""
    rest = rest.strip().strip("*`_").strip()
    if rest.startswith(("<", "[")):  # an echoed format placeholder, "Answer: <number>"
        return None
    span = _MATH_SPAN.search(rest)
    if span:
        math = (span.group(1) or span.group(2)).strip()
        if "=" in math:
            math = math.rsplit("=", 1)[1]
        if "\\" in math or _FULL_NUMBER.fullmatch(_clean(math) or ""):
            return _clean(math)
    if rest.startswith("\\"):
        return _clean(_LATEX_END.split(rest, maxsplit=1)[0].rstrip(",;"))
    if "=" in rest:
        after = rest.rsplit("=", 1)[1]
        if (number := _first_number(after)) is not None:
            return number
    return _first_number(rest)


def _last_marked(text: str) -> str | None:
    """The answer after the last "Answer: X" / "answer is X" / "#### X" that has one."""
    for match in reversed(list(_MARKER.finditer(text))):
        candidate = _from_marker_rest(match.group(1))
        if candidate:
            return candidate
    return None


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return _clean(matches[-1]) if matches else None


def extract_answer(text: str, answer_format: AnswerFormat = "any") -> str | None:
    """The final answer of a completion, or None where it has none.

    With ``answer_format="any"``, tried in order: the last ``\\boxed{...}`` (balanced
    braces); the last "Answer: X", "answer is X" or "#### X" (case-insensitive) followed
    by a number or LaTeX; the last number in the text (integers, decimals, negatives,
    ``1,234`` -> ``"1234"``). With ``"boxed"`` only the last box counts, so a completion
    that ends on a stray number without a box has no answer.
    Surrounding ``$`` and trailing periods are stripped.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text.translate(_UNICODE_MINUS)
    finders = (_last_boxed,) if answer_format == "boxed" else (_last_boxed, _last_marked, _last_number)
    for find in finders:
        candidate = find(text)
        if candidate:
            return candidate
    return None


def _as_fraction(text: str) -> Fraction | None:
    """``text`` as an exact number if it is a plain one (``-3``, ``0.5``, ``1,234``, ``1/2``)."""
    text = text.strip().strip("$").strip()
    if _FULL_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _normal_form(text: str) -> str:
    return re.sub(r"\s+", "", text).strip("$").rstrip(".")


def _looks_expensive(text: str) -> bool:
    """Whether sympy could spend unbounded time on it: towers, factorials, huge powers."""
    return (
        len(text) > _MAX_SYMBOLIC_CHARS
        or "!" in text
        or text.count("^") > 1
        or "**" in text
        or re.search(r"\^\s*\{?\s*-?\d{4,}", text) is not None
    )


@functools.lru_cache(maxsize=8192)
def _symbolic_parse(text: str, timeout: int | None) -> tuple[Any, ...]:
    from math_verify import parse

    return tuple(parse(f"${text}$", parsing_timeout=timeout))


def _symbolic_equal(predicted: str, gold: str) -> bool:
    """math_verify's verdict; False on any failure, timeout or missing package."""
    on_main = threading.current_thread() is threading.main_thread()
    timeout = _MATH_VERIFY_TIMEOUT_S if on_main else None
    try:
        from math_verify import verify as math_verify

        gold_parsed = _symbolic_parse(gold, timeout)
        predicted_parsed = _symbolic_parse(predicted, timeout)
        if not gold_parsed or not predicted_parsed:
            return False
        return bool(math_verify(list(gold_parsed), list(predicted_parsed), timeout_seconds=timeout))
    except Exception:  # math_verify/sympy can raise anything on odd input
        return False


def answers_equal(predicted: str, gold: str) -> bool:
    """Whether an extracted answer equals the gold one, numerically or symbolically."""
    if _normal_form(predicted) == _normal_form(gold):
        return True
    predicted_number, gold_number = _as_fraction(predicted), _as_fraction(gold)
    if predicted_number is not None and gold_number is not None:
        return abs(predicted_number - gold_number) <= NUMERIC_TOLERANCE
    if _looks_expensive(predicted):
        return False
    return _symbolic_equal(predicted.strip().strip("$"), gold.strip().strip("$"))


def _gold_text(answer: str) -> str:
    """The gold answer itself, also when given as ``\\boxed{...}`` or ``... #### X``."""
    answer = str(answer).strip()
    if "\\boxed" in answer or "\\fbox" in answer:
        return _last_boxed(answer) or answer
    if "####" in answer:
        return _clean(answer.rsplit("####", 1)[1]) or answer
    return answer


def verify(completion: str, answer: str, answer_format: AnswerFormat = "any") -> tuple[float, str | None]:
    """Reward of a completion: ``(1.0, extracted)`` if its final answer (as
    :func:`extract_answer` finds it with ``answer_format``) equals ``answer``, else
    ``(0.0, extracted)``; ``extracted`` is None where no answer was found.
    Never raises on model text."""
    extracted = None
    try:
        extracted = extract_answer(completion, answer_format)
        if extracted is None:
            return 0.0, None
        return (1.0 if answers_equal(extracted, _gold_text(answer)) else 0.0), extracted
    except Exception:  # a reward must never crash a rollout loop
        return 0.0, extracted
