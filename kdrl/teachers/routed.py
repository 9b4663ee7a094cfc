"""Several teachers (METHODS.md §6, last row of the issue's list): each problem is distilled from
the teacher of the first route whose ``match`` holds the problem's ``teachers.route_by`` value
("*" matches anything), with that route's β multiplying ``objective.beta`` for its rows.

A problem that no route matches is an error when the data is loaded, naming the problem.
Routes that name the same model share one loaded copy.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from kdrl.config import Config, ConfigError, TeacherRoute
from kdrl.models import check_tokenizers_compatible, load_model, load_tokenizer
from kdrl.rollout.rows import subset
from kdrl.teachers.base import Teacher
from kdrl.teachers.local import make_scorer
from kdrl.types import Problem, Rollouts, TeacherOutput

CATCH_ALL = "*"


def route_value(problem: Problem, field: str) -> Any:
    """The routing value: a top-level field of the problem, else a metadata key (None if absent)."""
    if field in ("id", "prompt", "answer", "solution"):
        return getattr(problem, field)
    return problem.metadata.get(field)


def pick_route(problem: Problem, field: str, routes: list[TeacherRoute]) -> int:
    """Index of the first matching route; ConfigError naming the problem if none matches."""
    value = route_value(problem, field)
    for index, route in enumerate(routes):
        if CATCH_ALL in route.match or (value is not None and str(value) in route.match):
            return index
    raise ConfigError(f"teachers.routes: problem '{problem.id}' ({field}={value!r}) matches no route and there is "
                      f"no '{CATCH_ALL}' route")


class RoutedTeacher(Teacher):
    """Scores each row with its problem's teacher; ``kd_coef_of`` gives the objective each row's β."""

    def __init__(self, scorers: dict[str, Any], route_teacher: list[str], route_beta: list[float], field: str,
                 routes: list[TeacherRoute]):
        self.scorers, self.route_teacher, self.route_beta = scorers, route_teacher, route_beta
        self.field, self.routes = field, routes

    def kd_coef_of(self, problems: list[Problem]) -> torch.Tensor:
        """[B] the β multiplier of each row's route (``Objective(kd_coef_of=...)``)."""
        return torch.tensor([self.route_beta[pick_route(problem, self.field, self.routes)] for problem in problems])

    def score(self, rollouts: Rollouts, need_hidden: bool = False) -> TeacherOutput:
        names = [self.route_teacher[pick_route(problem, self.field, self.routes)]
                 for problem in rollouts.row_problems()]
        if need_hidden and len(set(names)) > 1:
            raise ValueError("full-vocabulary KD with several teachers: their hidden states need one output layer")
        logprobs = torch.zeros_like(rollouts.sampler_logprobs)
        hidden, weight, bias = None, None, None
        for name in sorted(set(names)):
            rows = torch.tensor([b for b, n in enumerate(names) if n == name])
            out = self.scorers[name].score(subset(rollouts, rows), need_hidden=need_hidden)
            logprobs[rows] = out.token_logprobs.to(logprobs.dtype)
            # one teacher when needed (checked above)
            hidden, weight, bias = out.hidden_states, out.output_weight, out.output_bias
        return TeacherOutput(token_logprobs=logprobs, hidden_states=hidden, output_weight=weight, output_bias=bias)


def load_routed_teachers(config: Config, tokenizer: Any, student: torch.nn.Module, problems: list[Problem],
                         device: torch.device) -> Optional[RoutedTeacher]:
    """The routed teachers of ``teachers.routes`` (None when no routes are set), checked on ``problems``."""
    options = config.teachers
    if not options.routes:
        return None
    names = [route.teacher or config.model.teacher for route in options.routes]  # set (kdrl.config_needs)
    for problem in problems:  # every problem must have a teacher before anything is loaded
        pick_route(problem, options.route_by, options.routes)
    scorers = {}
    for name in dict.fromkeys(names):
        model = load_model(name, config.model, device, trainable=False)
        check_tokenizers_compatible(tokenizer, load_tokenizer(name, config.model.trust_remote_code),
                                    f"teacher '{name}'", student, model)
        scorers[name] = make_scorer(model, config)
    return RoutedTeacher(scorers, names, [route.beta for route in options.routes], options.route_by, options.routes)
