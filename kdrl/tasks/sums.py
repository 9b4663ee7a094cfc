"""Running sums: the bundled task (``sums``), a two-digit running total.

A problem starts from a number in 0..99 and adds or subtracts single digits
(1..9), left to right, in ordinary integer arithmetic.  Every intermediate
total stays inside 0..99 (the generator only draws steps that keep it there),
so numbers are written without leading zeros or signs.  The reference solution
writes every step as ``total<op>digit=new_total``, separated by single spaces,
and ends with the answer in ``\\boxed{...}``::

    prompt:    "47+8-3+9=?\\n"
    solution:  "47+8=55 55-3=52 52+9=61 \\boxed{61}"
    answer:    "61"

Splits (``SPLITS``), by the number of steps (operations):

- ``train`` and ``test_id``: 2..4 steps, disjoint by construction (a stable
  hash of the prompt sends every possible prompt to exactly one of them);
- ``test_ood``: 5..6 steps, longer than any ``train``/``test_id`` problem;
- ``sft``: the pool the bundled models are pre-trained on (kdrl.demo): the
  ``train`` bucket of 2..4-step prompts plus a small share (``sft_long_fraction``)
  of 5..6-step prompts from buckets disjoint from ``test_ood``.  The models have
  therefore seen long chains, but rarely: the teacher solves part of ``test_ood``,
  well below its in-distribution level, and RL on ``train`` prompts can change
  how much of it the student solves.

Grading: ``is_correct`` compares the last ``\\boxed{}`` with the answer (the
reward uses kdrl's math verifier on the same box); ``chain_correct`` (the process metric) also asks
that the response's steps are exactly the reference steps, in order (the whole
chain right, not only the answer).  Answers are spread over 0..99: the best
constant answer and a random in-range answer each score about 1-2% (measured
in tests/test_tasks.py), so outcome reward is not earned by guessing.

Each generated problem is ``{"id", "prompt", "answer", "solution",
"metadata": {"task": "sums", "steps", "split"}}``.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from kdrl.tasks.chains import extract_boxed

TASK_NAME = "sums"
SPLITS = ("train", "test_id", "test_ood", "sft")
MAX_TOTAL = 99  # every running total lies in 0..MAX_TOTAL


@dataclass(frozen=True)
class SumsTaskConfig:
    """Distribution of running-sum problems (see the module docstring).

    ``heldout_mod``: 1 in ``heldout_mod`` prompts (stable hash) is held out for a
    test split; the rest may be used for training.
    """

    min_steps: int = 2
    max_steps: int = 4
    ood_min_steps: int = 5
    # 6 steps and the box fit the default 64-token generation budget (at most 58 characters)
    ood_max_steps: int = 6
    sft_long_min_steps: int = 5  # the rare long chains of the sft pool span sft_long_min..ood_max steps
    sft_long_fraction: float = 0.06
    heldout_mod: int = 5

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps < self.ood_min_steps <= self.ood_max_steps:
            raise ValueError("need 1 <= min_steps <= max_steps < ood_min_steps <= ood_max_steps")
        if not self.max_steps < self.sft_long_min_steps <= self.ood_max_steps:
            raise ValueError("need max_steps < sft_long_min_steps <= ood_max_steps")
        if not 0.0 <= self.sft_long_fraction <= 1.0:
            raise ValueError("sft_long_fraction must lie in [0, 1]")
        if self.heldout_mod < 2:
            raise ValueError("heldout_mod must be >= 2")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


_PROMPT_RE = re.compile(r"^(\d+)((?:[+-]\d)+)=\?\n?$")
_TERM_RE = re.compile(r"([+-])(\d)")
_STEP_RE = re.compile(r"(\d+)([+-])(\d+)=(\d+)")


def reference_steps(prompt: str) -> list[tuple[int, str, int, int]]:
    """``"47+8-3=?\\n"`` -> ``[(47, "+", 8, 55), (55, "-", 3, 52)]``."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not a sums prompt: {prompt!r}")
    total = int(m.group(1))
    steps = []
    for op, digit in _TERM_RE.findall(m.group(2)):
        new = total + int(digit) if op == "+" else total - int(digit)
        steps.append((total, op, int(digit), new))
        total = new
    return steps


def solve(prompt: str) -> tuple[str, str]:
    """Reference solution and answer: ``"47+8=55 55-3=52 \\boxed{52}"``, ``"52"``."""
    steps = reference_steps(prompt)
    answer = str(steps[-1][3])
    return " ".join([f"{a}{op}{b}={c}" for a, op, b, c in steps] + [f"\\boxed{{{answer}}}"]), answer


def is_correct(problem, response: str) -> bool:
    """True when the last boxed answer of ``response`` equals the answer of a kdrl ``Problem``
    (or of a problem dict)."""
    answer = problem["answer"] if isinstance(problem, dict) else problem.answer
    got = extract_boxed(response)
    return got is not None and got.strip() == str(answer).strip()


def chain_correct(problem, response: str) -> bool:
    """The process metric (kdrl.tasks.process_metric): ``steps_correct`` of a kdrl ``Problem``
    (or a problem dict) and a response."""
    if isinstance(problem, dict):
        return steps_correct(problem["prompt"], problem["answer"], response)
    return steps_correct(problem.prompt, problem.answer, response)


def steps_correct(prompt: str, answer: str, response: str) -> bool:
    """The whole chain right: the boxed answer is right and the ``a<op>b=c`` steps written in the
    response (anywhere outside the last ``\\boxed{}``) are exactly the reference steps, in order."""
    got = extract_boxed(response)
    if got is None or got.strip() != str(answer).strip():
        return False
    box = response.rfind("\\boxed{")
    body = response[:box] + " " + response[box + len("\\boxed{") + len(got) + 1:]
    written = [(int(a), op, int(b), int(c)) for a, op, b, c in _STEP_RE.findall(body)]
    return written == reference_steps(prompt)


def _bucket(prompt: str, heldout_mod: int) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % heldout_mod


def _held_out(prompt: str, split: str, cfg: SumsTaskConfig) -> bool:
    """Whether ``prompt`` may appear in ``split``: held-out buckets (0) are test splits' only."""
    heldout = _bucket(prompt, cfg.heldout_mod) == 0
    return heldout if split in ("test_id", "test_ood") else not heldout


def _draw_prompt(rng: random.Random, steps: int) -> str:
    total = rng.randint(0, MAX_TOTAL)
    text = str(total)
    for _ in range(steps):
        moves = [(op, d) for op in "+-" for d in range(1, 10) if 0 <= (total + d if op == "+" else total - d) <= MAX_TOTAL]
        op, digit = rng.choice(moves)
        total = total + digit if op == "+" else total - digit
        text += f"{op}{digit}"
    return text + "=?\n"


def _steps_for(split: str, rng: random.Random, cfg: SumsTaskConfig) -> int:
    if split == "test_ood":
        return rng.randint(cfg.ood_min_steps, cfg.ood_max_steps)
    if split == "sft" and rng.random() < cfg.sft_long_fraction:
        return rng.randint(cfg.sft_long_min_steps, cfg.ood_max_steps)
    return rng.randint(cfg.min_steps, cfg.max_steps)


def generate_problems(split: str, n: int, seed: int, config: SumsTaskConfig | None = None) -> list[dict]:
    """``n`` distinct problems of one split, deterministic from ``seed`` (see the module docstring)."""
    _check_split(split)
    cfg = config or SumsTaskConfig()
    rng = random.Random(f"kdrl-sums/{seed}/{split}")
    seen: set[str] = set()
    problems: list[dict] = []
    for i in range(n):
        steps = _steps_for(split, rng, cfg)
        for _attempt in range(1000):
            prompt = _draw_prompt(rng, steps)
            if _held_out(prompt, split, cfg) and prompt not in seen:
                break
        else:  # pragma: no cover - the space of prompts is far larger than any split
            raise RuntimeError(f"could not draw a new {split} problem")
        seen.add(prompt)
        solution, answer = solve(prompt)
        problems.append({
            "id": f"{TASK_NAME}-{split}-{seed}-{i:05d}",
            "prompt": prompt,
            "answer": answer,
            "solution": solution,
            "metadata": {"task": TASK_NAME, "steps": steps, "split": split},
        })
    return problems
