"""Who writes the responses and who scores them, for the on-policy distillation family (METHODS.md §6).

- ``RolloutSource``: per step, the student (on-policy), the teacher, or the dataset's reference
  solutions write the batch (``rollout.policy``); ``mixed`` is GKD's on-policy fraction λ.
- ``DatasetResponses``: a rollout engine that "samples" the problem's ``solution`` field.
- ``SelfTeacher``: OPSD's teacher, the student model itself reading the problem with privileged
  context (its reference solution), scoring the student's completion tokens.
- ``needs_*``: which models and data fields a configuration uses, checked at setup.
"""
from __future__ import annotations

import copy
import random
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from kdrl.config import Config, SelfTeacherConfig
from kdrl.objective.loss import uses_reference_logprobs, uses_teacher_logprobs
from kdrl.rollout import SamplingParams
from kdrl.teachers import LocalTeacher
from kdrl.types import Problem, Rollouts, TeacherOutput

SELF = "self"  # model.teacher=self: the student with privileged context (OPSD)


# --------------------------------------------------------------------------- what a configuration needs

# Row sources (Rollouts.sources) written by the student now: "student" from RolloutSource, "policy"
# from the student's own engine called directly (GHPO's hinted resamples). Every other source
# ("teacher", "dataset", "cache", "teacher_solution") is off-policy.
ON_POLICY_SOURCES = ("student", "policy")


def needs_teacher_model(config: Config) -> bool:
    """``model.teacher`` is loaded: it scores (KD, RLAD's anchor) or writes responses, and no other
    teacher stands in for it (a teacher cache, routed teachers, or the student itself)."""
    rollout = config.rollout
    writes = rollout.policy == "teacher" or (rollout.policy == "mixed" and rollout.off_policy_source == "teacher"
                                             and rollout.on_policy_fraction < 1)
    replaced = config.teacher_cache.path is not None or bool(config.teachers.routes)
    return config.model.teacher not in (None, SELF) and not replaced and \
        (writes or uses_teacher_logprobs(config.objective))


def needs_reference_model(config: Config) -> bool:
    """A frozen reference model is loaded (the objective reads its log-probs)."""
    return uses_reference_logprobs(config.objective)


def solution_users(config: Config) -> list[str]:
    """The settings that read each training problem's reference ``solution`` (empty: none)."""
    users = []
    if config.model.teacher == SELF and config.objective.kd_placement != "none":
        users.append("model.teacher=self (privileged context)")
    rollout = config.rollout
    if rollout.policy == "dataset" or (rollout.policy == "mixed" and rollout.off_policy_source == "dataset"
                                       and rollout.on_policy_fraction < 1):
        users.append(f"rollout.policy={rollout.policy} (dataset responses)")
    return users


# --------------------------------------------------------------------------- who writes the batch

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
        rollouts = self.engines[source].generate(problems, n, sampling, prompt_suffixes=prompt_suffixes)
        return replace(rollouts, sources=[source] * rollouts.num_rows)


class DatasetResponses:
    """Rollouts read from the dataset: each problem's ``solution`` + EOS, ONE row per problem
    (``n`` is ignored: G copies of one response add nothing under a token mean).

    A dataset has no behaviour policy, so ``sampler_logprobs`` are the scoring model's (the
    student's, at collection time): the off-policy ratio then measures only staleness, and no
    importance correction toward π_θ is attempted (a choice). Responses are cut at
    ``max_new_tokens`` (then marked truncated, without EOS).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, encode: Callable[[Problem, str], list[int]],
                 micro_batch_size: int = 64, chunk_size: int = 1024, temperature: float = 1.0):
        self.tokenizer = tokenizer
        self.encode = encode
        self.scorer = LocalTeacher(model, micro_batch_size, chunk_size, temperature)

    @torch.no_grad()
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        suffixes = prompt_suffixes or [""] * len(problems)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        prompts, responses, truncated = [], [], []
        for problem, suffix in zip(problems, suffixes):
            if not problem.solution:
                raise ValueError(f"problem '{problem.id}' has no solution to train on (rollout.policy)")
            ids = self.tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [eos]
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


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]), left padded to the longest."""
    width = max(len(ids) for ids in prompts)
    ids_out = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        ids_out[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return ids_out, mask


# --------------------------------------------------------------------------- OPSD's self-teacher

def privileged_problem(problem: Problem, context: str) -> Problem:
    """The problem as the self-teacher reads it: ``context`` with {solution} and {prompt} filled in."""
    if not problem.solution and "{solution}" in context:
        raise ValueError(f"problem '{problem.id}' has no solution for the self-teacher's privileged context")
    return replace(problem, prompt=context.format(prompt=problem.prompt, solution=problem.solution or ""))


class SelfTeacher:
    """OPSD (METHODS.md §6): the teacher is the student model with privileged context in its prompt,
    scoring the student's own completion tokens (the response ids are unchanged; only the prompt
    before them is re-encoded). ``mode``: frozen (the initial student, default), live (the current
    student, no gradient), or ema (a moving average of the student, updated after every step)."""

    def __init__(self, cfg: SelfTeacherConfig, student: torch.nn.Module, initial: Optional[torch.nn.Module],
                 encode: Callable[[Problem, str], list[int]], pad_id: int, micro_batch_size: int = 64,
                 chunk_size: int = 1024, temperature: float = 1.0):
        self.cfg = cfg
        self.student = student
        self.encode = encode
        self.pad_id = pad_id
        if cfg.mode == "frozen":
            if initial is None:
                raise ValueError("self_teacher.mode=frozen needs the initial student")
            model = initial
        elif cfg.mode == "live":
            model = student
        else:  # ema: starts as the student, follows it
            model = copy.deepcopy(student).eval().requires_grad_(False)
        self.model = model
        self.scorer = LocalTeacher(model, micro_batch_size, chunk_size, temperature)

    def check(self, problems: list[Problem], where: str) -> None:
        """Every problem has a solution and a privileged prompt that fits: fail before training."""
        for problem in problems:
            try:
                self.encode(privileged_problem(problem, self.cfg.context), "")
            except (ValueError, KeyError, IndexError) as error:
                from kdrl.data import DataError

                raise DataError(f"{where}: {error} (self_teacher.context)") from None

    def privileged(self, rollouts: Rollouts) -> Rollouts:
        """The same response tokens after the privileged prompt of each row's problem."""
        prompts = [self.encode(privileged_problem(problem, self.cfg.context), "") for problem in rollouts.problems]
        prompt_ids, prompt_mask = left_pad([ids for ids in prompts for _ in range(rollouts.group_size)], self.pad_id)
        return replace(rollouts, prompt_ids=prompt_ids, prompt_mask=prompt_mask)

    def score(self, rollouts: Rollouts, need_hidden: bool = False) -> TeacherOutput:
        out = self.scorer.score(self.privileged(rollouts), need_hidden)
        if out.output_weight is not None and self.cfg.mode != "frozen":
            # the live / EMA weight changes with training: keep the one that scored this batch
            out = replace(out, output_weight=out.output_weight.detach().clone())
        return out

    @torch.no_grad()
    def after_update(self) -> None:
        """EMA: θ_T ← d·θ_T + (1 − d)·θ (every floating tensor, buffers included)."""
        if self.cfg.mode != "ema":
            return
        decay = self.cfg.ema_decay
        for (name, teacher), (_, student) in zip(self.model.state_dict().items(), self.student.state_dict().items()):
            if teacher.is_floating_point():
                teacher.mul_(decay).add_(student.detach().to(teacher.dtype), alpha=1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep to resume exactly: the EMA weights (nothing otherwise)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()} \
            if self.cfg.mode == "ema" else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.cfg.mode == "ema" and state:
            self.model.load_state_dict(state)
