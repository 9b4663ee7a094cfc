"""Chain arithmetic: the bundled synthetic reasoning task.

A problem is a short expression of single digits evaluated strictly left to
right, modulo 10 (no operator precedence).  The prompt is the expression; the
reference solution writes every intermediate step and ends with the answer in
``\\boxed{...}``, so it is graded like real math data::

    prompt:    "3+4*2-5=?\\n"
    solution:  "3+4=7 7*2=4 4-5=9 \\boxed{9}"
    answer:    "9"

Each step is easy (one single-digit operation); difficulty comes from the
number of steps.  ``train`` and ``test_id`` draw chains of
``min_steps..max_steps`` operations and are disjoint by construction (a stable
hash of the prompt sends every possible problem to exactly one of them);
``test_ood`` draws longer chains (``ood_min_steps..ood_max_steps``) than any
training problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable

SPLITS = ("train", "test_id", "test_ood")
TASK = "chains"  # metadata["task"] of generated problems: picks the process metric (kdrl.tasks)

_SPLIT_SALT = {"train": 1, "test_id": 2, "test_ood": 3}


@dataclass(frozen=True)
class ChainTaskConfig:
    """Distribution of chain problems.

    ``min_steps``/``max_steps``: number of operations in train and test_id chains.
    ``ood_min_steps``/``ood_max_steps``: the same for test_ood (must exceed max_steps).
    ``difficulty``: extra operations added to every chain of every split (the
    one knob that makes the whole task harder, > 0, or easier, < 0).
    ``heldout_mod``: 1 in ``heldout_mod`` of all possible in-distribution
    prompts (by a stable hash) belongs to test_id, the rest to train.
    """

    min_steps: int = 2
    max_steps: int = 5
    modulus: int = 10
    ops: str = "+-*"
    ood_min_steps: int = 6
    ood_max_steps: int = 8
    difficulty: int = 0
    heldout_mod: int = 5

    def __post_init__(self):
        if not 1 <= self.min_steps + self.difficulty <= self.max_steps + self.difficulty:
            raise ValueError("need 1 <= min_steps + difficulty <= max_steps + difficulty")
        if not self.max_steps < self.ood_min_steps <= self.ood_max_steps:
            raise ValueError("need max_steps < ood_min_steps <= ood_max_steps")
        if not 2 <= self.modulus <= 10:
            raise ValueError("modulus must be in 2..10 (operands are single digits)")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError("ops must be a non-empty subset of '+-*'")
        if self.heldout_mod < 2:
            raise ValueError("heldout_mod must be >= 2")

    def step_range(self, split: str) -> tuple[int, int]:
        """Inclusive (min, max) number of operations for a split."""
        _check_split(split)
        if split == "test_ood":
            lo, hi = self.ood_min_steps, self.ood_max_steps
        else:
            lo, hi = self.min_steps, self.max_steps
        return lo + self.difficulty, hi + self.difficulty


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _apply(a: int, op: str, b: int, modulus: int) -> int:
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown operator {op!r}")


_EXPR_RE = re.compile(r"^\s*(\d+)((?:\s*[+\-*]\s*\d+)+)\s*=\s*\?\s*$")
_TERM_RE = re.compile(r"([+\-*])\s*(\d+)")


def solve(prompt: str, modulus: int = 10) -> tuple[str, str]:
    """Reference solver: ``"3+4*2-5=?\\n"`` -> ``("3+4=7 7*2=4 4-5=9 \\boxed{9}", "9")``."""
    m = _EXPR_RE.match(prompt)
    if m is None:
        raise ValueError(f"not a chain prompt: {prompt!r}")
    value = int(m.group(1)) % modulus
    steps = []
    for op, digits in _TERM_RE.findall(m.group(2)):
        new = _apply(value, op, int(digits), modulus)
        steps.append(f"{value}{op}{digits}={new}")
        value = new
    answer = str(value)
    return " ".join(steps + [f"\\boxed{{{answer}}}"]), answer


def make_prompt(digits: list[int], ops: list[str]) -> str:
    assert len(digits) == len(ops) + 1
    expr = str(digits[0]) + "".join(f"{o}{d}" for o, d in zip(ops, digits[1:]))
    return f"{expr}=?\n"


def _is_heldout(prompt: str, heldout_mod: int) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % heldout_mod == 0


def generate_problems(
    split: str, n: int, seed: int, config: ChainTaskConfig | None = None
) -> list[dict]:
    """``n`` distinct problems of one split, deterministic from ``seed``.

    Each is ``{"id", "prompt", "answer", "solution", "metadata": {"steps", "split", "task", "modulus"}}``.
    The number of operations is uniform over the split's step range.  Problems
    are distinct within a split as long as enough exist (short chains have few
    distinct prompts; once a step count is exhausted it is sampled with repeats).
    """
    _check_split(split)
    cfg = config or ChainTaskConfig()
    lo, hi = cfg.step_range(split)
    rng = random.Random(f"kdrl-chains/{seed}/{split}")
    seen: set[str] = set()
    problems: list[dict] = []
    for i in range(n):
        steps = rng.randint(lo, hi)
        prompt = None
        for _attempt in range(200):
            digits = [rng.randrange(10) for _ in range(steps + 1)]
            ops = [rng.choice(cfg.ops) for _ in range(steps)]
            cand = make_prompt(digits, ops)
            if split != "test_ood" and _is_heldout(cand, cfg.heldout_mod) != (split == "test_id"):
                continue  # belongs to the other in-distribution split
            prompt = cand
            if cand not in seen:
                break
        if prompt is None:  # pragma: no cover - needs an absurd heldout_mod
            raise RuntimeError("could not sample a problem for this split")
        seen.add(prompt)
        solution, answer = solve(prompt, cfg.modulus)
        problems.append(
            {
                "id": f"chains-{split}-{seed}-{i:05d}",
                "prompt": prompt,
                "answer": answer,
                "solution": solution,
                "metadata": {"steps": steps, "split": split, "task": TASK, "modulus": cfg.modulus},
            }
        )
    return problems


def export_jsonl(problems: Iterable[dict], path: str | os.PathLike) -> None:
    """Write one JSON object per line (creating parent folders)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- a tiny local grader (the real verifiers live in kdrl.rewards) ---------------

def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    if not isinstance(text, str):
        return None
    key = "\\boxed{"
    start = text.rfind(key)
    while start != -1:
        i = start + len(key)
        depth = 1
        j = i
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j]
            j += 1
        start = text.rfind(key, 0, start)  # unbalanced: try an earlier one
    return None


def is_correct(problem: dict, response: str) -> bool:
    """True when the last boxed answer of ``response`` equals ``problem["answer"]``."""
    got = extract_boxed(response)
    return got is not None and got.strip() == str(problem["answer"]).strip()


_STEP_RE = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)")


def chain_steps(text: str) -> list[tuple[int, str, int, int]]:
    """The ``a op b = c`` steps written in ``text``, in order, as numbers."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in _STEP_RE.findall(text)]


def chain_correct(problem, response: str) -> bool:
    """The process-level metric: the last boxed answer is right AND the steps written before it are
    exactly the reference chain (every intermediate result right, none missing, none extra).

    ``problem``: a kdrl ``Problem`` (``prompt``, ``answer``, ``metadata["modulus"]``, default 10).
    """
    got = extract_boxed(response)
    if got is None or got.strip() != str(problem.answer).strip():
        return False
    modulus = int(problem.metadata.get("modulus", 10))
    reference, _ = solve(problem.prompt, modulus)
    return chain_steps(response[:response.rfind("\\boxed{")]) == chain_steps(reference)
