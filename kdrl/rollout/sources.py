"""Who writes each training batch (METHODS.md §6): rollout sources behind the engine protocol.

- the student's engine (on-policy), the teacher's engine, ``DatasetResponses`` (the problems'
  reference solutions) or ``CachedRollouts`` (Lightning OPD's stored responses);
- ``RolloutSource``: picks one of them per step by ``rollout.policy``; ``mixed`` is GKD's
  on-policy fraction λ. Every row is tagged with its source (``Rollouts.sources``).
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from kdrl.data import response_token_ids
from kdrl.rollout import SamplingParams
from kdrl.rollout.rows import left_pad
from kdrl.types import Problem, Rollouts

# Row sources written by the student now: "student" from RolloutSource, "policy" from the
# student's own engine called directly (GHPO's hinted resamples). Every other source
# ("teacher", "dataset", "cache", "teacher_solution") is off-policy.
ON_POLICY_SOURCES = ("student", "policy")


def on_policy_at(seed: int, step: int, fraction: float) -> bool:
    """GKD's per-batch choice: on-policy with probability ``fraction``, a pure function of (seed, step)
    so a resumed run makes the same choices (no generator state involved)."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    return random.Random(seed * 1_000_003 + step).random() < fraction


class RolloutSource:
    """The engine that writes step ``step``'s responses (``rollout.policy``); rows are tagged with
    their source ("student", "teacher", "dataset"), and only "student" rows count as on-policy."""

    def __init__(self, policy: str, engines: dict[str, Any], seed: int = 0, on_policy_fraction: float = 1.0,
                 off_policy_source: str = "dataset"):
        self.policy = policy
        self.engines = engines
        self.seed = seed
        self.on_policy_fraction = on_policy_fraction
        self.off_policy_source = off_policy_source

    def source_at(self, step: int) -> str:
        if self.policy != "mixed":
            return self.policy
        return "student" if on_policy_at(self.seed, step, self.on_policy_fraction) else self.off_policy_source

    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams, step: int = 0,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        source = self.source_at(step)
        if self.engines.get(source) is None:
            raise ValueError(f"rollout.policy={self.policy}: no engine for the '{source}' source")
        rollouts = self.engines[source].generate(problems, n, sampling, step=step, prompt_suffixes=prompt_suffixes)
        return replace(rollouts, sources=[source] * rollouts.num_rows)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The student's engine follows the student; the others read fixed weights or data."""
        student = self.engines.get("student")
        if student is not None:
            student.sync_weights(model)


class DatasetResponses:
    """Rollouts read from the dataset: each problem's ``solution`` + EOS, ONE row per problem
    (``n`` is ignored: G copies of one response add nothing under a token mean).

    A dataset has no behaviour policy, so ``sampler_logprobs`` are the scoring model's (the
    student's, at collection time, ``scorer``): the off-policy ratio then measures only
    staleness, and no importance correction toward π_θ is attempted (a choice). Responses are cut
    at ``max_new_tokens`` (then marked truncated, without EOS).
    """

    def __init__(self, tokenizer: Any, encode: Callable[[Problem, str], list[int]], scorer: Any):
        self.tokenizer = tokenizer
        self.encode = encode
        self.scorer = scorer

    @torch.no_grad()
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams, step: int = 0,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        suffixes = prompt_suffixes or [""] * len(problems)
        pad = self.tokenizer.pad_token_id
        prompts, responses, truncated = [], [], []
        for problem, suffix in zip(problems, suffixes):
            if not problem.solution:
                raise ValueError(f"problem '{problem.id}' has no solution to train on (rollout.policy)")
            ids = response_token_ids(self.tokenizer, problem.solution)
            truncated.append(len(ids) > sampling.max_new_tokens)
            responses.append(ids[:sampling.max_new_tokens])
            prompts.append(self.encode(problem, suffix))
        prompt_ids, prompt_mask = left_pad(prompts, pad)
        length = max(len(ids) for ids in responses)
        response_ids = torch.full((len(responses), length), pad, dtype=torch.long)
        response_mask = torch.zeros((len(responses), length))
        for row, ids in enumerate(responses):
            response_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[row, :len(ids)] = 1.0
        texts = self.tokenizer.batch_decode([ids for ids in responses], skip_special_tokens=True)
        rollouts = Rollouts(problems=list(problems), group_size=1, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                            response_ids=response_ids, response_mask=response_mask,
                            sampler_logprobs=torch.zeros_like(response_mask), response_texts=texts,
                            truncated=torch.tensor(truncated), sources=["dataset"] * len(responses))
        return replace(rollouts, sampler_logprobs=self.scorer.score(rollouts).token_logprobs)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The scorer reads the live student: nothing to copy."""


class CachedRollouts:
    """Replays a teacher cache's responses of the asked problems (their groups, in cache order).

    ``cache``: a ``kdrl.teachers.cache.TeacherCache``. ``old_scorer``: recompute log pi_old with
    the current student (``old_logprobs=recompute``); None keeps the initial student's stored
    log-probs.
    """

    def __init__(self, cache: Any, old_scorer: Optional[Any] = None):
        self.cache, self.old_scorer = cache, old_scorer

    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams, step: int = 0,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        if n != self.cache.group_size or any(prompt_suffixes or []):
            raise ValueError("the teacher cache replays its own groups: no other group size, no prompt suffix")
        rows = self.cache.rows_of(problems)
        t = {name: value[rows] for name, value in self.cache.tensors.items()}
        prompt_width = int(t["prompt_mask"].sum(1).max())
        length = max(1, int(t["response_mask"].sum(1).max()))
        rollouts = Rollouts(problems=list(problems), group_size=n, prompt_ids=t["prompt_ids"][:, -prompt_width:],
                            prompt_mask=t["prompt_mask"][:, -prompt_width:],
                            response_ids=t["response_ids"][:, :length], response_mask=t["response_mask"][:, :length],
                            sampler_logprobs=t["sampler_logprobs"][:, :length],
                            response_texts=[self.cache.texts[b] for b in rows.tolist()], truncated=t["truncated"],
                            sources=["cache"] * len(rows))
        if self.old_scorer is not None:
            rollouts.sampler_logprobs = self.old_scorer.score(rollouts).token_logprobs
        return rollouts

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Stored responses: nothing follows the student (the old-log-prob scorer reads it live)."""
