"""Held-out evaluation: greedy accuracy, avg@k, unbiased pass@k, maj@k, the task's process metric
(chain_correct), response length, per set; per-problem results for paired comparisons."""
from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any, Callable, Optional

import torch

from kdrl.rewards import extract_last_boxed
from kdrl.rollout import SamplingParams
from kdrl.tasks import process_metric
from kdrl.types import Problem

# a run's per-problem results of its final evaluation: {set: [{"id", "correct": [0/1 per sample],
# "chain_correct": [...] where the task has a process metric}]}, read by kdrl bench's paired comparison
EVAL_PROBLEMS_FILE = "eval_after_problems.json"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # the product form avoids huge binomials
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_answer(answers: list[Optional[str]]) -> Optional[str]:
    """Most frequent extracted answer; ties go to the answer seen first (deterministic)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


@torch.no_grad()
def evaluate_problems(engine: Any, problems: list[Problem], reward_fn: Callable[[Problem, str], float],
                      samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                      correct_threshold: float = 1.0, batch_size: int = 256,
                      details: Optional[list[dict]] = None, detail_responses: bool = False) -> dict[str, float]:
    """One problem set: k samples per problem (k = 1 and temperature 0 is greedy accuracy).

    ``chain_correct`` (avg over samples and problems) is reported when the set's problems belong
    to a task with a process metric (kdrl.tasks.process_metric), over those problems. ``details``,
    if given, receives one record per problem: its id and, per sample, whether the answer (and
    the chain) was right, so that two runs can be compared problem by problem (kdrl.bench);
    with ``detail_responses``, also the response texts (``"responses"``).
    """
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    per_problem_correct: list[list[bool]] = []
    per_problem_chain: list[list[bool]] = []
    majority_correct: list[bool] = []
    lengths: list[float] = []
    truncated = 0
    prompts_per_call = max(1, batch_size // samples)
    for start in range(0, len(problems), prompts_per_call):
        chunk = problems[start:start + prompts_per_call]
        rollouts = engine.generate(chunk, samples, sampling)
        lengths.extend(rollouts.response_mask.sum(-1).tolist())
        truncated += int(rollouts.truncated.sum())
        for index, problem in enumerate(chunk):
            texts = rollouts.response_texts[index * samples:(index + 1) * samples]
            correct = [reward_fn(problem, text) >= correct_threshold for text in texts]
            per_problem_correct.append(correct)
            metric = process_metric(problem)
            chain = None if metric is None else [bool(metric(problem, text)) for text in texts]
            if chain is not None:
                per_problem_chain.append(chain)
            if details is not None:
                details.append({"id": problem.id, "correct": [int(c) for c in correct],
                                **({} if chain is None else {"chain_correct": [int(c) for c in chain]}),
                                **({"responses": list(texts)} if detail_responses else {})})
            answers = [extract_last_boxed(text) for text in texts]
            majority = majority_answer(answers)
            # the majority answer is graded by the same verifier as a single response
            majority_correct.append(majority is not None and
                                    reward_fn(problem, f"\\boxed{{{majority}}}") >= correct_threshold)
    n = samples
    results = {
        "accuracy": statistics.fmean(statistics.fmean(c) for c in per_problem_correct),  # avg@k
        f"pass@{n}": statistics.fmean(pass_at_k(n, sum(c), n) for c in per_problem_correct),
        **({"chain_correct": statistics.fmean(statistics.fmean(c) for c in per_problem_chain)}
           if per_problem_chain else {}),
        "response_length": statistics.fmean(lengths),
        "response_length_median": statistics.median(lengths),
        "truncated_fraction": truncated / max(1, len(lengths)),
        "num_problems": len(problems),
        "samples": n,
    }
    if n > 1:
        results[f"maj@{n}"] = statistics.fmean(majority_correct)
        for k in sorted({1, 2, 4, 8, 16, n}):
            if k < n:
                results[f"pass@{k}"] = statistics.fmean(pass_at_k(n, sum(c), k) for c in per_problem_correct)
    return results


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """results[model][set] -> metrics; one row per (model, set)."""
    keys: list[str] = []
    for sets in results.values():
        for metrics in sets.values():
            keys += [k for k in metrics if k not in keys and k not in ("num_problems", "samples")]
    lines = ["| model | set | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for model, sets in results.items():
        for name, metrics in sets.items():
            cells = [_fmt(metrics.get(k)) for k in keys]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def summary_table(before: Optional[dict], after: dict, wall: float, steps: int) -> str:
    """The end-of-run table: accuracy, chain correctness and response length per held-out set,
    before and after."""
    sets = sorted({key.split("/")[0] for key in after if key.endswith("/accuracy")})
    lines = [f"\nkdrl: {steps} steps in {wall:.0f} s", "", "| set | accuracy before | accuracy after | "
             "chain correct before | chain correct after | length before | length after |",
             "|---|---|---|---|---|---|---|"]
    for name in sets:
        b = before or {}
        lines.append(f"| {name} | {_pct(b.get(f'{name}/accuracy'))} | {_pct(after.get(f'{name}/accuracy'))} | "
                     f"{_pct(b.get(f'{name}/chain_correct'))} | {_pct(after.get(f'{name}/chain_correct'))} | "
                     f"{_num(b.get(f'{name}/response_length'))} | {_num(after.get(f'{name}/response_length'))} |")
    return "\n".join(lines)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def paired_bootstrap(differences: list[list[float]], replicates: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean paired difference over a seeds × problems table, and its percentile bootstrap interval.

    ``differences[s][p]`` is method A's minus method B's score on problem p in seed s (each the
    mean over its samples). Seeds and problems are resampled independently, with replacement (a
    two-way bootstrap: both the training seed and the problem draw are sources of variation);
    a replicate's mean is Σ_s Σ_p c_s·q_p·d_sp / (S·P) with c, q the multinomial resample counts.
    ``seed`` fixes the resampling, so the interval is reproducible.
    """
    d = torch.tensor(differences, dtype=torch.float64)
    if d.dim() != 2 or d.numel() == 0:
        raise ValueError("paired_bootstrap needs a non-empty seeds x problems table")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    seeds, problems = d.shape
    generator = torch.Generator().manual_seed(seed)

    def counts(n: int) -> torch.Tensor:  # [replicates, n]: how often each index was drawn
        drawn = torch.randint(n, (replicates, n), generator=generator)
        return torch.zeros(replicates, n, dtype=torch.float64).scatter_add_(1, drawn, torch.ones_like(drawn,
                                                                                                      dtype=torch.float64))

    seed_counts, problem_counts = counts(seeds), counts(problems)
    means = ((seed_counts @ d) * problem_counts).sum(1) / (seeds * problems)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return float(d.mean()), low, high
