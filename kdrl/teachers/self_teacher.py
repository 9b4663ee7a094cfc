"""OPSD's teacher (METHODS.md §6 ``opsd``): the student itself, reading the problem with privileged
context (its reference solution), scoring the student's own completion tokens."""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Optional

import torch

from kdrl.config import SelfTeacherConfig
from kdrl.data import DataError
from kdrl.rollout.rows import left_pad
from kdrl.teachers.base import Teacher
from kdrl.teachers.local import LocalTeacher
from kdrl.types import Problem, Rollouts, TeacherOutput



def privileged_problem(problem: Problem, context: str) -> Problem:
    """The problem as the self-teacher reads it: ``context`` with {solution} and {prompt} filled in."""
    if not problem.solution and "{solution}" in context:
        raise ValueError(f"problem '{problem.id}' has no solution for the self-teacher's privileged context")
    return replace(problem, prompt=context.format(prompt=problem.prompt, solution=problem.solution or ""))


class SelfTeacher(Teacher):
    """The response ids are unchanged; only the prompt before them is re-encoded. ``mode``: frozen
    (the initial student, default), live (the current student, no gradient), or ema (a moving
    average of the student, updated after every step)."""

    def __init__(self, cfg: SelfTeacherConfig, student: torch.nn.Module, initial: Optional[torch.nn.Module],
                 encode: Callable[[Problem, str], list[int]], pad_id: int,
                 scorer_of: Callable[[torch.nn.Module], Teacher] = LocalTeacher):
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
        self.scorer = scorer_of(model)  # the run's micro-batch, chunk size and temperature (teachers.make_scorer)

    def check(self, problems: list[Problem], where: str) -> None:
        """Every problem has a solution and a privileged prompt that fits: fail before training."""
        for problem in problems:
            try:
                self.encode(privileged_problem(problem, self.cfg.context), "")
            except (ValueError, KeyError, IndexError) as error:
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
            out = replace(out, output_weight=out.output_weight.detach().clone(),
                          output_bias=None if out.output_bias is None else out.output_bias.detach().clone())
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
        """The EMA weights (nothing in the other modes: they are the student or its initial copy)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()} \
            if self.cfg.mode == "ema" else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.cfg.mode == "ema" and state:
            self.model.load_state_dict(state)
