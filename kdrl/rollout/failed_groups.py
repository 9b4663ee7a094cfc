"""A group in which every response failed has zero advantage and teaches nothing (METHODS.md §1).
Two methods rescue it (METHODS.md §6):

- ``hint`` (GHPO): resample the group with the first 25%, then 50%, then 75% of the reference
  solution's characters appended to the prompt, stopping at the first level where any response
  succeeds. The hinted rows replace the group (the student sampled them: on-policy rows of the
  hinted prompt). If no level succeeds, the original group is kept (assumption: the hints are
  then no better than no hint, and the group has zero advantage either way).
- ``teacher_solutions`` (AMPO): replace ``k`` rows of the group (2 of 8) by stored teacher
  solutions (reward from the verifier, 1 for a correct one). They are off-policy rows: the
  objective's ``offpolicy_pg: shaped`` trains them with −A·p/(p+γ) (kdrl.objective.offpolicy).
  Solutions come from the problem's own ``solution`` field and/or JSONL files, one per teacher;
  one that the verifier rejects, or that is longer than rollout.max_new_tokens, is skipped.
  With fewer verified solutions than k, they are used in turn (assumption).

``action(rollouts, rewards, sampling, step) -> (rollouts, rewards, metrics)``; the rows of groups
that did not fail are never touched.

Under torchrun the student's generate and forward are FSDP collectives: every rank must make the
same calls, whether or not it has a failed group. ``any_rank(flag)`` (True on some rank) decides
each call for all ranks together; a rank with nothing to do makes the call on a stand-in and drops
the result.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from kdrl.config import Config
from kdrl.data import DataError, read_jsonl, resolve_data_path, response_token_ids
from kdrl.rollout import SamplingParams
from kdrl.rollout.rows import Row, pack, score_rewards, unpack
from kdrl.types import Problem, Rollouts

Tensor = torch.Tensor
# action(rollouts, rewards, sampling, step) -> (rollouts, rewards, metrics)
FailedGroupAction = Callable[..., tuple[Rollouts, Tensor, dict[str, float]]]
AnyRank = Callable[[bool], bool]


def this_rank_only(flag: bool) -> bool:
    """``any_rank`` of one process."""
    return flag


def all_failed_groups(rewards: Tensor, group_size: int, correct_threshold: float) -> list[int]:
    """Indices of the groups in which no response reached the correct threshold."""
    correct = (rewards >= correct_threshold).reshape(-1, group_size)
    return [int(g) for g in torch.nonzero(~correct.any(1)).flatten()]


def no_action(rollouts: Rollouts, rewards: Tensor, sampling: SamplingParams, step: int = 0):
    return rollouts, rewards, {}


# --------------------------------------------------------------------------- ghpo

def hint_text(solution: str, fraction: float, template: str = "{hint}") -> str:
    """The first ``floor(fraction · len(solution))`` characters of the solution, in the template."""
    return template.format(hint=solution[:int(len(solution) * fraction)])


class HintResampler:
    """GHPO: resample all-failed groups with a growing hint (see the module docstring)."""

    def __init__(self, engine: Any, reward_fn: Any, fractions: list[float], template: str,
                 correct_threshold: float, pad_id: int, any_rank: AnyRank = this_rank_only):
        self.engine, self.reward_fn, self.fractions = engine, reward_fn, sorted(fractions)
        self.template, self.correct_threshold, self.pad_id = template, correct_threshold, pad_id
        self.any_rank = any_rank

    def __call__(self, rollouts: Rollouts, rewards: Tensor, sampling: SamplingParams, step: int = 0):
        size = rollouts.group_size
        failed = all_failed_groups(rewards, size, self.correct_threshold)
        pending = [g for g in failed if rollouts.problems[g].solution]
        levels = [0.0] * len(rollouts.problems)  # hint fraction that rescued each group (0: none)
        rows, rewards = unpack(rollouts), rewards.clone()
        for fraction in self.fractions:
            if not self.any_rank(bool(pending)):  # the same decision on every rank
                break
            if not pending:  # another rank generates: so must this one (a stand-in group, dropped)
                self.engine.generate(rollouts.problems[:1], size, sampling, step=step)
                continue
            problems = [rollouts.problems[g] for g in pending]
            hinted = self.engine.generate(problems, size, sampling, step=step, prompt_suffixes=[
                hint_text(p.solution, fraction, self.template) for p in problems])
            hinted_rewards, hinted_rows = score_rewards(self.reward_fn, hinted), unpack(hinted)
            still = []
            for j, g in enumerate(pending):
                block = hinted_rewards[j * size:(j + 1) * size]
                if bool((block >= self.correct_threshold).any()):
                    rows[g * size:(g + 1) * size] = hinted_rows[j * size:(j + 1) * size]
                    rewards[g * size:(g + 1) * size] = block
                    levels[g] = fraction
                else:
                    still.append(g)
            pending = still
        rescued = [level for level in levels if level > 0]
        metrics = {"failed_group_fraction": len(failed) / len(levels),
                   "hint_rescued_fraction": len(rescued) / len(levels),
                   "hint_level": sum(rescued) / len(rescued) if rescued else 0.0}
        if not rescued:
            return rollouts, rewards, metrics
        return pack(rows, rollouts.problems, size, self.pad_id), rewards, metrics


# --------------------------------------------------------------------------- ampo

def load_solution_files(paths: list[str], solution_field: str = "solution") -> dict[str, list[str]]:
    """{problem id: [solution, ...]} from JSONL files of ``{"id": ..., "solution": ...}`` (one per teacher)."""
    pools: dict[str, list[str]] = {}
    for spec in paths:
        for where, _, row in read_jsonl(resolve_data_path(spec)):
            if not isinstance(row, dict) or row.get("id") is None or not isinstance(row.get(solution_field), str):
                raise DataError(f"{where}: a teacher solution needs 'id' and a string '{solution_field}'")
            pools.setdefault(str(row["id"]), []).append(row[solution_field])
    return pools


class TeacherSolutionReplacer:
    """AMPO: the last ``k`` rows of each all-failed group become verified teacher solutions."""

    def __init__(self, k: int, solution_pools: dict[str, list[str]], solutions_from_data: bool, reward_fn: Any,
                 tokenizer: Any, student_scorer: Any, correct_threshold: float, max_new_tokens: int,
                 any_rank: AnyRank = this_rank_only):
        self.any_rank = any_rank
        self.k, self.pools, self.from_data = k, solution_pools, solutions_from_data
        self.reward_fn, self.tokenizer, self.student_scorer = reward_fn, tokenizer, student_scorer
        self.correct_threshold, self.max_new_tokens = correct_threshold, max_new_tokens
        self._verified: dict[str, list[tuple[str, list[int], float]]] = {}

    def verified(self, problem: Problem) -> list[tuple[str, list[int], float]]:
        """(text, token ids + EOS, reward) of the problem's solutions the verifier accepts."""
        if problem.id not in self._verified:
            texts = ([problem.solution] if self.from_data and problem.solution else []) + self.pools.get(problem.id, [])
            kept = []
            for text in texts:
                ids = response_token_ids(self.tokenizer, text)
                reward = float(self.reward_fn(problem, text))
                if reward >= self.correct_threshold and len(ids) <= self.max_new_tokens:
                    kept.append((text, ids, reward))
            self._verified[problem.id] = kept
        return self._verified[problem.id]

    def __call__(self, rollouts: Rollouts, rewards: Tensor, sampling: Optional[SamplingParams] = None,
                 step: int = 0):
        size = rollouts.group_size
        failed = all_failed_groups(rewards, size, self.correct_threshold)
        rows, rewards, replaced = unpack(rollouts), rewards.clone(), []
        for g in failed:
            solutions = self.verified(rollouts.problems[g])
            for j in range(self.k if solutions else 0):
                text, ids, reward = solutions[j % len(solutions)]
                b = (g + 1) * size - self.k + j
                rows[b] = Row(rows[b].prompt_ids, torch.tensor(ids), torch.zeros(len(ids)), text, False,
                              "teacher_solution")
                rewards[b] = reward
                replaced.append(b)
        metrics = {"failed_group_fraction": len(failed) / len(rollouts.problems),
                   "teacher_row_fraction": len(replaced) / rollouts.num_rows}
        if not self.any_rank(bool(replaced)):  # the same decision on every rank
            return rollouts, rewards, metrics
        packed = pack(rows, rollouts.problems, size, self.tokenizer.pad_token_id)
        # log pi_old of a teacher row: the current student's (ratio 1 at the first update when
        # offpolicy_pg=none; unused by the shaped term). Every rank scores all its rows, so the
        # ranks make the same number of forward passes whoever replaced how many.
        current = self.student_scorer.score(packed).token_logprobs
        if not replaced:
            return rollouts, rewards, metrics
        index = torch.tensor(replaced)
        packed.sampler_logprobs[index] = current[index].to(packed.sampler_logprobs.dtype)
        return packed, rewards, metrics


# --------------------------------------------------------------------------- registry

def make_failed_group_action(config: Config, engine: Any, reward_fn: Any, tokenizer: Any, student_scorer: Any,
                             solution_pools: Optional[dict[str, list[str]]] = None,
                             any_rank: AnyRank = this_rank_only) -> FailedGroupAction:
    options = config.failed_groups
    threshold = config.reward.correct_threshold
    actions: dict[str, Callable[[], FailedGroupAction]] = {
        "none": lambda: no_action,
        "hint": lambda: HintResampler(engine, reward_fn, options.hint_fractions, options.hint_template, threshold,
                                      tokenizer.pad_token_id, any_rank),
        "teacher_solutions": lambda: TeacherSolutionReplacer(
            options.replace, solution_pools or {}, options.solutions_from_data, reward_fn, tokenizer,
            student_scorer, threshold, config.rollout.max_new_tokens, any_rank),
    }
    return actions[options.action]()
