"""What a configuration needs (kdrl.config_needs): one rule per input, asked by config validation,
by the objective and by build, each with one message naming the key and the settings that read it."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from kdrl.config import ConfigError, ObjectiveConfig, TeacherRoute, load_config
from kdrl.config_needs import (SAMPLED_ESTIMATORS, ObjectiveInputs, needs_teacher_model, objective_inputs,
                               solution_users)
from kdrl.objective import SAMPLED_KL, VOCAB_DIVERGENCES, Objective
from kdrl.types import StudentOutput
from test_objective import make_batch

RECIPES = Path(__file__).parent.parent / "recipes"


def test_estimator_names_match_the_divergence_registries():
    estimators = typing.get_args(typing.get_type_hints(ObjectiveConfig)["kd_estimator"])
    assert set(SAMPLED_ESTIMATORS) == set(SAMPLED_KL)
    assert set(estimators) - set(SAMPLED_ESTIMATORS) == set(VOCAB_DIVERGENCES)


@pytest.mark.parametrize("recipe, overrides, message", [
    ("kdrl", ["model.teacher=null"], "model.teacher: must be set: objective.kd_placement=loss reads the teacher's "
                                     "log-probs (or set teachers.routes or teacher_cache.path)"),
    ("rlad", ["model.teacher=null"], "model.teacher: must be set: objective.ratio_anchor_alpha=0.5 reads the "
                                     "teacher's log-probs (or set teachers.routes or teacher_cache.path)"),
    ("kdrl", ["model.teacher=null", "objective.ratio_anchor_alpha=0.5"],
     "model.teacher: must be set: objective.kd_placement=loss and objective.ratio_anchor_alpha=0.5 read"),
    ("sft", ["rollout.policy=teacher", "model.teacher=null"],
     "model.teacher: must be set: with rollout.policy=teacher the teacher writes responses"),
    ("gkd", ["rollout.off_policy_source=teacher", "model.teacher=self"],
     "rollout.policy: rollout.off_policy_source=teacher, but model.teacher=self cannot write responses"),
    ("grpo", ["objective.ref_kl_coef=0.1", "model.reference=null"],
     "model.reference: must be set: objective.ref_kl_coef=0.1 reads the reference log-probs"),
    ("exopd", ["model.reference=null"],
     "model.reference: must be set: objective.kd_reward_scale=1.25 reads the reference log-probs"),
    ("multi_teacher", ["model.teacher=null"], "teachers.routes[0].teacher: not set, and model.teacher is not set"),
    ("multi_teacher", ["objective.kd_estimator=rkl", "teachers.routes=[{match: [2], teacher: a}, {teacher: b}]"],
     "objective.kd_estimator: objective.kd_estimator=rkl needs one teacher's full distribution, but teachers.routes "
     "name several"),
    ("tip", ["rollout.engine=vllm"], "objective.kd_token_selection: objective.kd_token_selection=tip needs the "
                                     "sampler's entropy, which rollout.engine=vllm (full-vocabulary log-probs"),
    ("tip", ["rollout.policy=dataset"], "objective.kd_token_selection: objective.kd_token_selection=tip needs the "
                                        "sampler's entropy, which a dataset response (rollout.policy) does not"),
    ("kdrl", ["teacher_cache.path=somewhere"],
     "objective.kd_estimator: objective.kd_estimator=rkl needs the teacher's full distribution, but a teacher "
     "cache stores sampled-token log-probs only"),
])
def test_a_missing_input_is_one_error_naming_the_key_and_its_readers(recipe, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(RECIPES / f"{recipe}.yaml", overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_a_teacher_from_routes_or_a_cache_serves_every_reader():
    """Routed teachers score the anchor's log-probs as well as the KD term's (once refused for rlad)."""
    load_config(RECIPES / "rlad.yaml", ["model.teacher=null", "teachers.route_by=steps",
                                        "teachers.routes=[{match: ['*'], teacher: t}]"])
    cached = load_config(RECIPES / "lightning_opd.yaml", ["rollout.policy=teacher", "model.teacher=null"])
    assert not needs_teacher_model(cached)  # the cache replays its responses: no teacher writes


def test_a_writing_teacher_is_loaded_beside_routed_scorers():
    config = load_config(RECIPES / "sft.yaml", ["rollout.policy=teacher"])
    routed = dataclasses.replace(config, teachers=dataclasses.replace(
        config.teachers, route_by="steps", routes=[TeacherRoute(match=["*"], teacher="t")]))
    assert needs_teacher_model(routed)


def test_a_term_off_reads_nothing():
    kd_then_rl = load_config(RECIPES / "kd_then_rl.yaml").objective
    assert objective_inputs(kd_then_rl).teacher_hidden == ("objective.kd_estimator=rkl",)
    assert objective_inputs(kd_then_rl, kd_on=False) == ObjectiveInputs()
    rlad = load_config(RECIPES / "rlad.yaml").objective
    assert objective_inputs(rlad, pg_on=False) == ObjectiveInputs()
    assert solution_users(load_config(RECIPES / "opsd.yaml")) == ["model.teacher=self (privileged context)"]


def test_the_objective_names_the_same_readers_for_a_batch_without_an_input():
    batch, hidden, weight = make_batch()
    student = StudentOutput(hidden, weight)
    objective = Objective(ObjectiveConfig(kd_placement="none", ref_kl_coef=0.1), 10, 6)
    with pytest.raises(ValueError, match=r"^objective.ref_kl_coef=0.1 reads batch.reference_logprobs, which this "
                                         r"batch lacks$"):
        objective.loss(objective.prepare(dataclasses.replace(batch, reference_logprobs=None), 0), student)
    objective = Objective(ObjectiveConfig(kd_estimator="topk"), 10, 6)
    with pytest.raises(ValueError, match=r"^objective.kd_estimator=topk reads batch.teacher_output_weight"):
        objective.loss(objective.prepare(dataclasses.replace(batch, teacher_output_weight=None), 0), student)
    objective = Objective(ObjectiveConfig(kd_placement="advantage", kd_estimator="k1"), 10, 6)
    with pytest.raises(ValueError, match=r"^objective.kd_placement=advantage reads batch.teacher_logprobs"):
        objective.prepare(dataclasses.replace(batch, teacher_logprobs=None), 0)  # prepare reads it: fails there
