"""Pieces of the methods of METHODS.md §6 that act around the objective rather than inside it.

- ``teacher_cache``: Lightning OPD's offline teacher (``kdrl cache-teacher``; training with no
  teacher model loaded).
- ``failed_groups``: what happens to a group in which every response failed: GHPO's growing
  hints, AMPO's stored teacher solutions.
- ``routing``: several teachers, one per problem chosen by a data field, each with its own β.
- ``rows``: taking rollouts apart into rows and putting them back together (re-padded).

The trainer calls ``load_method_inputs`` while it checks the run (before the run directory is
written) and ``attach`` once the run exists; the step stays sample, reward, teach, prepare, update.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from kdrl.types import Problem


@dataclass
class MethodInputs:
    train_problems: list[Problem]  # the cached prompts when training from a teacher cache
    cache: Optional[Any] = None  # teacher_cache.TeacherCache
    routed: Optional[Any] = None  # routing.RoutedTeacher
    solution_pools: dict[str, list[str]] = field(default_factory=dict)  # problem id -> teacher solutions


def load_method_inputs(config: Any, train_problems: list[Problem], tokenizer: Any, student: Any, device: Any,
                       objective: Any) -> MethodInputs:
    """Read and check what the recipe's extras need; every error is a one-line user error."""
    from kdrl.config import ConfigError
    from kdrl.methods.failed_groups import load_solution_files
    from kdrl.methods.routing import load_routed_teachers
    from kdrl.methods.teacher_cache import load_teacher_cache

    inputs = MethodInputs(train_problems)
    if config.teacher_cache.path is not None:
        if objective.needs_teacher_hidden:
            raise ConfigError(f"objective.kd_estimator={config.objective.kd_estimator}: a teacher cache stores "
                              "sampled-token log-probs only; use k1 (advantage), k2 or k3 with teacher_cache.path")
        inputs.cache = load_teacher_cache(config, train_problems, tokenizer)
        inputs.train_problems = inputs.cache.problems
    inputs.routed = load_routed_teachers(config, tokenizer, student, inputs.train_problems, device,
                                         objective.needs_teacher_hidden)
    inputs.solution_pools = load_solution_files(config.failed_groups.solution_files, config.data.solution_field)
    return inputs


def attach(run: Any, inputs: MethodInputs) -> None:
    """Swap in the cache replay engine and teacher or the routed teachers; set the failed-group action."""
    from kdrl.methods.failed_groups import make_failed_group_action
    from kdrl.methods.teacher_cache import CachedRolloutEngine, CachedTeacher
    from kdrl.teachers import LocalTeacher

    config = run.config
    student_scorer = LocalTeacher(run.student, config.train.micro_batch_size, config.objective.chunk_size,
                                  config.rollout.temperature)
    if inputs.cache is not None:
        run.sampling_engine = CachedRolloutEngine(inputs.cache, student_scorer if inputs.cache.recompute_old else None)
        run.teacher_scorer = CachedTeacher(inputs.cache)
    if inputs.routed is not None:
        run.teacher_scorer = inputs.routed
    run.failed_groups = make_failed_group_action(config, run.student_engine, run.reward_fn, run.tokenizer,
                                                 student_scorer, inputs.solution_pools)
