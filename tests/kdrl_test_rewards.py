"""A user reward for tests on random tiny models, which never write a correct answer: it gives
varied rewards within a group so every policy-gradient method has a signal to follow."""


def char_parity(problem, response: str) -> float:
    return float(sum(map(ord, response)) % 2)


def even_answer(problem, response: str) -> float:
    """1 when the last boxed answer is an even number: easy for the bundled student to learn."""
    import re

    answers = re.findall(r"\\boxed\{(\d+)\}", response)
    return 1.0 if answers and int(answers[-1]) % 2 == 0 else 0.0


def rank_zero_solves_all(problem, response: str) -> float:
    """Rank 0's groups all succeed, the others' are graded by math: under two processes only one
    rank has all-failed groups (the case that made ghpo and ampo wait on different collectives)."""
    import os

    from kdrl.rewards import math_reward

    return 1.0 if os.environ.get("RANK", "0") == "0" else math_reward(problem, response)


def times_out(problem, response: str) -> float:
    """Counts a verifier timeout for every row, as a loaded machine's math verification would."""
    from kdrl.rewards.stats import _count

    _count("timeouts")
    return 0.0


def returns_none(problem, response: str):
    return None
