"""A user reward for tests on random tiny models, which never write a correct answer: it gives
varied rewards within a group so every policy-gradient method has a signal to follow."""


def char_parity(problem, response: str) -> float:
    return float(sum(map(ord, response)) % 2)
