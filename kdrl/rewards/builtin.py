"""The built-in rewards: math equivalence, exact match, format. Each is pure, deterministic,
never raises on any response string and never evaluates model text as code."""
from __future__ import annotations

import logging
from typing import Any

from kdrl.rewards.extract import _last_box, _normalize, extract_last_boxed
from kdrl.rewards.mathcheck import _VerifyTimeout
from kdrl.rewards.stats import _count, _should_log
from kdrl.rewards import timelimit
from kdrl.rewards.timelimit import _check_timeout
from kdrl.rewards.simple import grade_simple
from kdrl.rewards.types import DEFAULT_TIMEOUT_S, MAX_ANSWER_CHARS, MAX_RESPONSE_CHARS, ProblemLike

logger = logging.getLogger("kdrl.rewards")

def _tail(response: Any) -> Any:
    """The part of a response a reward reads: its last ``MAX_RESPONSE_CHARS`` characters."""
    return response[-MAX_RESPONSE_CHARS:] if isinstance(response, str) else response


def _gold(problem: Any) -> str:
    answer = getattr(problem, "answer", None)
    return "" if answer is None else str(answer)


def math_reward(problem: "ProblemLike", response: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the last boxed answer is mathematically equivalent to ``problem.answer``.

    Equal strings (after TeX normalisation) and simple numbers (``kdrl.rewards.simple``) are
    graded at once, with no time limit; anything else by math-verify
    (``verify(parse(gold), parse(pred))``) under a limit of ``timeout_s`` CPU seconds. No boxed
    answer, a timeout, or any failure scores 0.0.
    """
    try:
        pred = extract_last_boxed(_tail(response))
        if pred is None or not pred.strip():
            return 0.0
        gold = _gold(problem)
        if not gold.strip():
            return 0.0
        _count("math_calls")
        norm_pred, norm_gold = _normalize(pred), _normalize(gold)
        if norm_pred == norm_gold:
            _count("fast_path")
            return 1.0
        simple = grade_simple(norm_gold, norm_pred)
        if simple is not None:
            _count("fast_path")
            return 1.0 if simple else 0.0
        if len(pred) > MAX_ANSWER_CHARS:
            _count("too_long")
            return 0.0
        try:
            timeout_s = _check_timeout(timeout_s)
        except ValueError:
            timeout_s = DEFAULT_TIMEOUT_S
        res = timelimit._verify_guarded(gold, pred, timeout_s)
        if res == "T":
            n = _count("timeouts")
            if _should_log(n):
                logger.warning("math verification timed out after %.3g s (problem %s; %d timeouts so far)",
                               timeout_s, getattr(problem, "id", "?"), n)
            return 0.0
        if res == "E":
            _count("errors")
            return 0.0
        return 1.0 if res == "1" else 0.0
    except _VerifyTimeout:  # defensive: cannot escape _verify_with_alarm in practice
        _count("timeouts")
        return 0.0
    except Exception:
        n = _count("errors")
        if _should_log(n):
            logger.warning("math_reward failed; scoring 0.0", exc_info=True)
        return 0.0


def exact_match_reward(problem: "ProblemLike", response: str) -> float:
    """1.0 if the last boxed answer (else the last non-empty line) equals ``problem.answer``
    after stripping surrounding whitespace."""
    try:
        if not isinstance(response, str):
            return 0.0
        response = _tail(response)
        pred = extract_last_boxed(response)
        if pred is None:
            tail = response.rstrip()
            cut = max(tail.rfind("\n"), tail.rfind("\r"))
            pred = tail[cut + 1 :]
        pred = pred.strip()
        return 1.0 if pred and pred == _gold(problem).strip() else 0.0
    except Exception:
        n = _count("errors")
        if _should_log(n):
            logger.warning("exact_match_reward failed; scoring 0.0", exc_info=True)
        return 0.0


# What may follow the final box: closing math delimiters, a full stop, end-of-text markers.
END_MARKERS = (
    "$", "\\]", "\\)", ".", "</answer>", "</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>",
    "<|end|>", "<eos>", "<end_of_turn>", "<｜end▁of▁sentence｜>",
)


def _only_end_markers(text: str, i: int) -> bool:
    n = len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        for m in END_MARKERS:
            if text.startswith(m, i):
                i += len(m)
                break
        else:
            return False
    return True


def format_reward(problem: "ProblemLike", response: str) -> float:
    """1.0 if the response has exactly one well-formed, non-empty ``\\boxed{...}`` and
    nothing but whitespace / end markers (``END_MARKERS``) after it."""
    try:
        if not isinstance(response, str):
            return 0.0
        if response.count("\\boxed") + response.count("\\fbox") != 1:  # C speed on any length
            return 0.0
        response = _tail(response)
        found = _last_box(response)
        if found is None:
            return 0.0
        _, end, content, brace_form = found
        if not brace_form or not content.strip():
            return 0.0
        return 1.0 if _only_end_markers(response, end) else 0.0
    except Exception:
        n = _count("errors")
        if _should_log(n):
            logger.warning("format_reward failed; scoring 0.0", exc_info=True)
        return 0.0
