"""What a configuration needs: which inputs its objective reads, who writes its batches, and which
models and data fields must therefore be given. One rule per input, each with its one message:
config validation (``kdrl.config_rules``), the objective (``kdrl.objective.loss``) and build
(``kdrl.build``) all ask here.

A leaf: it reads the config's dataclasses by attribute only and imports no other kdrl module, so
``kdrl.config`` can use it without an import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

SELF = "self"  # model.teacher=self: the student with privileged context scores (OPSD)

# The estimators of kdrl.objective.divergences.SAMPLED_KL (the sampled token's log-probs only); every
# other kd_estimator is a VOCAB_DIVERGENCES term over the full vocabulary (a test keeps them in step).
SAMPLED_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class ObjectiveInputs:
    """For each input of the objective, the settings that read it (empty: not read). As verl's
    distillation settings declare their top-k / full / estimator needs, so a run loads only these."""

    teacher_logprobs: tuple[str, ...] = ()  # the KD term, or RLAD's ratio anchor (α < 1)
    teacher_hidden: tuple[str, ...] = ()  # a full-vocabulary KD term in the loss
    reference_logprobs: tuple[str, ...] = ()  # the reference KL, or ExOPD's reward scale λ ≠ 1
    sampler_entropy: tuple[str, ...] = ()  # TIP's token selection (the sampling policy's entropy)


def objective_inputs(objective: Any, kd_on: bool = True, pg_on: Optional[bool] = None) -> ObjectiveInputs:
    """The inputs an ``ObjectiveConfig`` reads. ``kd_on`` / ``pg_on``: whether the KD term's β and the
    policy-gradient term's coefficient are non-zero (at one step; default: as configured), since a term
    whose coefficient is 0 reads nothing (kd_then_rl after its switch step needs no teacher)."""
    o = objective
    pg_on = o.pg_coef != 0 if pg_on is None else pg_on
    kd = kd_on and o.kd_placement != "none"
    full_vocabulary = kd and o.kd_placement == "loss" and o.kd_estimator not in SAMPLED_ESTIMATORS
    return ObjectiveInputs(
        teacher_logprobs=_when((kd, f"objective.kd_placement={o.kd_placement}"),
                               (pg_on and o.ratio_anchor_alpha != 1.0,
                                f"objective.ratio_anchor_alpha={o.ratio_anchor_alpha:g}")),
        teacher_hidden=_when((full_vocabulary, f"objective.kd_estimator={o.kd_estimator}")),
        reference_logprobs=_when((o.ref_kl_coef != 0, f"objective.ref_kl_coef={o.ref_kl_coef:g}"),
                                 (kd and o.kd_placement == "advantage" and o.kd_reward_scale != 1.0,
                                  f"objective.kd_reward_scale={o.kd_reward_scale:g}")),
        sampler_entropy=_when((kd and o.kd_token_selection == "tip", "objective.kd_token_selection=tip")))


def batch_writers(rollout: Any) -> list[str]:
    """The sources ``rollout.policy`` can pick a batch from (the one rule for which engines exist)."""
    if rollout.policy != "mixed":
        return [rollout.policy]
    return ["student"] + ([rollout.off_policy_source] if rollout.on_policy_fraction < 1 else [])


def teacher_writes(config: Any) -> str:
    """The setting that makes ``model.teacher`` write responses ('' if none; a teacher cache replays
    its stored responses instead)."""
    if config.teacher_cache.path is not None or "teacher" not in batch_writers(config.rollout):
        return ""
    return "rollout.policy=teacher" if config.rollout.policy == "teacher" else "rollout.off_policy_source=teacher"


def needs_teacher_model(config: Any) -> bool:
    """``model.teacher`` is loaded: it writes responses, or it scores them and no other teacher stands
    in for it (a teacher cache, routed teachers, or the student itself)."""
    replaced = config.teacher_cache.path is not None or bool(config.teachers.routes)
    scores = bool(objective_inputs(config.objective).teacher_logprobs) and not replaced
    return config.model.teacher not in (None, SELF) and (bool(teacher_writes(config)) or scores)


def needs_reference_model(config: Any) -> bool:
    """A frozen reference model is loaded (the objective reads its log-probs)."""
    return bool(objective_inputs(config.objective).reference_logprobs)


def solution_users(config: Any) -> list[str]:
    """The settings that read each training problem's reference ``solution`` (empty: none)."""
    users = []
    if config.model.teacher == SELF and objective_inputs(config.objective).teacher_logprobs:
        users.append("model.teacher=self (privileged context)")
    if "dataset" in batch_writers(config.rollout):
        users.append(f"rollout.policy={config.rollout.policy} (dataset responses)")
    return users


def input_errors(config: Any) -> list[tuple[str, str]]:
    """(key, message) of each input the configuration reads but does not provide."""
    inputs = objective_inputs(config.objective)
    teacher, writes = config.model.teacher, teacher_writes(config)
    scored_elsewhere = bool(config.teachers.routes) or config.teacher_cache.path is not None
    rules = [
        (bool(inputs.teacher_logprobs) and teacher is None and not scored_elsewhere, "model.teacher",
         f"must be set: {_read(inputs.teacher_logprobs)} the teacher's log-probs (or set teachers.routes or "
         "teacher_cache.path)"),
        (bool(writes) and teacher is None, "model.teacher", f"must be set: with {writes} the teacher writes "
                                                             "responses"),
        (bool(writes) and teacher == SELF, "rollout.policy",
         f"{writes}, but model.teacher=self cannot write responses (it needs the student's completion to score)"),
        (bool(inputs.teacher_hidden) and config.teacher_cache.path is not None, "objective.kd_estimator",
         f"{_read(inputs.teacher_hidden, 'needs', 'need')} the teacher's full distribution, but a teacher cache stores "
         "sampled-token log-probs only; use k1 (advantage), k2 or k3 with teacher_cache.path"),
        (bool(inputs.reference_logprobs) and config.model.reference is None, "model.reference",
         f"must be set: {_read(inputs.reference_logprobs)} the reference log-probs ('student' for the "
         "initial student, or a path)"),
    ]
    route_teachers = [route.teacher or teacher for route in config.teachers.routes]
    rules += [(name is None, f"teachers.routes[{index}].teacher", "not set, and model.teacher is not set either")
              for index, name in enumerate(route_teachers)]
    rules.append((bool(inputs.teacher_hidden) and len(set(route_teachers)) > 1, "objective.kd_estimator",
                  f"{_read(inputs.teacher_hidden, 'needs', 'need')} one teacher's full distribution, but "
                  "teachers.routes name several; use a sampled estimator (k2, k3)"))
    no_entropy = _without_entropy(config)
    rules.append((bool(inputs.sampler_entropy) and bool(no_entropy),
                  "objective.kd_token_selection", f"{_read(inputs.sampler_entropy, 'needs', 'need')} the sampler's "
                  f"entropy, which {no_entropy} does not return; use rollout.engine=hf with the student or the "
                  "teacher sampling"))
    return [(key, message) for broken, key, message in rules if broken]


def _without_entropy(config: Any) -> str:
    """The batch writer that returns no sampler entropy ('' if every one does: the hf engine's)."""
    if config.teacher_cache.path is not None:
        return "a teacher cache"
    if config.rollout.engine == "vllm":
        return "rollout.engine=vllm (full-vocabulary log-probs from vLLM are slow)"
    return "a dataset response (rollout.policy)" if "dataset" in batch_writers(config.rollout) else ""


def missing_batch_input(batch: Any, inputs: ObjectiveInputs) -> Optional[str]:
    """The message for the first input ``inputs`` reads that ``batch`` (a TrainBatch) lacks, else None."""
    for name, batch_fields in (("teacher_logprobs", ("teacher_logprobs",)),
                               ("teacher_hidden", ("teacher_hidden", "teacher_output_weight")),
                               ("reference_logprobs", ("reference_logprobs",)),
                               ("sampler_entropy", ("sampler_entropy",))):
        users = getattr(inputs, name)
        missing = [field for field in batch_fields if getattr(batch, field) is None]
        if users and missing:
            return f"{_read(users)} batch.{missing[0]}, which this batch lacks"
    return None


def _when(*pairs: tuple[bool, str]) -> tuple[str, ...]:
    return tuple(setting for used, setting in pairs if used)


def _read(settings: tuple[str, ...], one: str = "reads", several: str = "read") -> str:
    """'A reads' / 'A and B read': the settings as the subject of a sentence."""
    return f"{' and '.join(settings)} {one if len(settings) == 1 else several}"
