"""The range and consistency rules of a loaded config (kdrl.config.Config): each broken rule is
one ``ConfigError`` naming its key. Types are checked while the config is built (kdrl.config_io);
what types cannot express is checked here, once; what the objective and the batch writers read
(a teacher, a reference) is ruled on by ``kdrl.config_needs``.

The functions take the config's dataclasses by attribute only, so this module needs nothing from
kdrl.config (which imports it).
"""
from __future__ import annotations

import dataclasses
import string
from typing import Any

from kdrl.config_io import ConfigError
from kdrl.config_needs import input_errors

K1_IN_LOSS = ("k1 in the loss has a zero-mean gradient (E[grad log pi] = 0), so it teaches nothing; "
              "use k2 (reverse KL) or k3 in the loss, or k1 with objective.kd_placement=advantage")


def objective_errors(objective: Any) -> list[tuple[str, str]]:
    """(key, message) of each rule of the objective's own settings that is broken: checked once,
    here, by ``validate`` when a config is loaded and by ``Objective`` when one is built directly."""
    o = objective
    rules = [
        (o.kd_placement == "loss" and o.kd_estimator == "k1", "objective.kd_estimator", K1_IN_LOSS),
        (o.ref_kl_coef != 0 and o.ref_kl_estimator == "k1", "objective.ref_kl_estimator", K1_IN_LOSS),
        (o.kd_placement == "advantage" and o.kd_estimator != "k1", "objective.kd_estimator",
         "the advantage placement uses the sampled log-ratio k1 (METHODS.md §3)"),
        (o.kd_placement == "loss" and o.kd_estimator == "jsd" and o.jsd_beta in (0.0, 1.0), "objective.jsd_beta",
         f"JSD({o.jsd_beta:g}) is identically 0; use kd_estimator={'fkl' if o.jsd_beta == 0 else 'rkl'} for "
         "that limit"),
    ]
    return [(key, message) for broken, key, message in rules if broken]


def validate(config: Any) -> Any:
    """Range checks that types cannot express; each error names its key."""
    checks = [
        (config.rollout.group_size >= 1, "rollout.group_size", "must be at least 1"),
        (config.rollout.group_size >= 2 or config.objective.advantage == "none" or config.objective.pg_coef == 0,
         "rollout.group_size", f"must be at least 2 for the group advantage '{config.objective.advantage}'"),
        (config.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be at least 1"),
        (0.0 < config.rollout.top_p <= 1.0, "rollout.top_p", "must lie in (0, 1]"),
        (config.rollout.temperature > 0.0, "rollout.temperature", "must be positive"),
        (config.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be at least 1"),
        (0.0 < config.rollout.vllm.gpu_memory_utilization <= 1.0, "rollout.vllm.gpu_memory_utilization",
         "must lie in (0, 1]"),
        (config.rollout.vllm.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", "must be at least 1"),
        (config.rollout.vllm.cpu_kv_cache_gib >= 1, "rollout.vllm.cpu_kv_cache_gib", "must be at least 1"),
        (config.objective.beta.initial >= 0.0, "objective.beta.initial", "must not be negative"),
        (config.objective.beta.final >= 0.0, "objective.beta.final", "must not be negative"),
        (config.objective.beta.decay_per_step >= 0.0, "objective.beta.decay_per_step", "must not be negative"),
        (config.objective.beta.controller.target is None or config.objective.beta.controller.target > 0.0,
         "objective.beta.controller.target", "must be positive (or null: target_fraction of the first KL)"),
        (config.objective.beta.controller.target_fraction > 0.0, "objective.beta.controller.target_fraction",
         "must be positive"),
        (config.objective.beta.controller.gain > 0.0, "objective.beta.controller.gain", "must be positive"),
        (0.0 < config.objective.beta.controller.error_clip < 1.0 / config.objective.beta.controller.gain,
         "objective.beta.controller.error_clip", "must lie in (0, 1/gain): beta must stay positive"),
        (0.0 < config.objective.beta.controller.min <= config.objective.beta.controller.max,
         "objective.beta.controller.min", "must lie in (0, objective.beta.controller.max]"),
        (config.objective.beta.schedule != "adaptive" or config.objective.kd_placement != "none",
         "objective.beta.schedule", "adaptive controls the KD coefficient, but objective.kd_placement=none"),
        (0.0 <= config.objective.switch_fraction <= 1.0, "objective.switch_fraction", "must lie in [0, 1]"),
        (config.objective.switch_step is None or config.objective.switch_step >= 0, "objective.switch_step",
         "must not be negative"),
        (config.objective.phases != "kd_then_rl" or config.objective.kd_placement == "loss", "objective.phases",
         "kd_then_rl switches the PG term off before the switch step, which would also switch off KD carried "
         "by the advantage; set objective.kd_placement=loss"),
        (config.objective.clip_eps_low >= 0.0 and config.objective.clip_eps_low < 1.0, "objective.clip_eps_low",
         "must lie in [0, 1)"),
        (config.objective.clip_eps_high >= 0.0, "objective.clip_eps_high", "must not be negative"),
        *[(False, key, message) for key, message in objective_errors(config.objective)],
        (0.0 <= config.objective.kd_gamma <= 1.0, "objective.kd_gamma", "must lie in [0, 1]"),
        (0.0 <= config.objective.jsd_beta <= 1.0, "objective.jsd_beta", "must lie in [0, 1]"),
        (config.objective.offpolicy_ratio_cap > 0, "objective.offpolicy_ratio_cap", "must be positive"),
        (config.objective.kd_topk >= 1, "objective.kd_topk", "must be at least 1"),
        (config.objective.chunk_size >= 1, "objective.chunk_size", "must be at least 1"),
        (config.objective.offpolicy_shaping_gamma > 0, "objective.offpolicy_shaping_gamma", "must be positive"),
        (config.failed_groups.replace >= 1, "failed_groups.replace", "must be at least 1"),
        (config.failed_groups.replace < config.rollout.group_size
         or config.failed_groups.action != "teacher_solutions", "failed_groups.replace", "must be below rollout.group_size (some rows stay the student's own)"),
        (all(0.0 < f <= 1.0 for f in config.failed_groups.hint_fractions), "failed_groups.hint_fractions",
         "must lie in (0, 1]"),
        (config.teacher_cache.num_prompts >= 1, "teacher_cache.num_prompts", "must be at least 1"),
        (not config.teachers.routes or config.teachers.route_by, "teachers.route_by",
         "must name the data field that picks a teacher when teachers.routes is set"),
        (0.0 <= config.objective.ratio_anchor_alpha <= 1.0, "objective.ratio_anchor_alpha", "must lie in [0, 1]"),
        (config.objective.kd_reward_scale == 1.0 or config.objective.kd_placement == "advantage",
         "objective.kd_reward_scale", "scales the KD reward in the advantage; set objective.kd_placement=advantage"),
        (config.objective.scope_temperature > 0, "objective.scope_temperature", "must be positive"),
        (0.0 < config.objective.tip_keep_fraction <= 1.0, "objective.tip_keep_fraction", "must lie in (0, 1]"),
        (0.0 <= config.rollout.on_policy_fraction <= 1.0, "rollout.on_policy_fraction", "must lie in [0, 1]"),
        (0.0 <= config.self_teacher.ema_decay < 1.0, "self_teacher.ema_decay", "must lie in [0, 1)"),
        (config.train.steps >= 0, "train.steps", "must not be negative"),
        (config.train.learning_rate >= 0, "train.learning_rate", "must not be negative"),
        (config.train.cpu_threads >= 0, "train.cpu_threads", "must not be negative"),
        (config.train.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1"),
        (config.train.updates_per_batch >= 1, "train.updates_per_batch", "must be at least 1"),
        (config.train.max_grad_norm > 0, "train.max_grad_norm", "must be positive"),
        (0.0 <= config.train.adam_beta1 < 1.0, "train.adam_beta1", "must lie in [0, 1) (Adam's decay rate)"),
        (0.0 <= config.train.adam_beta2 < 1.0, "train.adam_beta2", "must lie in [0, 1) (Adam's decay rate)"),
        (config.train.weight_decay >= 0, "train.weight_decay", "must not be negative"),
        (0.0 <= config.model.lora.dropout < 1.0, "model.lora.dropout", "must lie in [0, 1)"),
        (config.model.lora.r >= 1, "model.lora.r", "must be at least 1"),
        (config.rollout.generation_batch_size >= 1, "rollout.generation_batch_size", "must be at least 1"),
        (config.eval.batch_size >= 1, "eval.batch_size", "must be at least 1"),
        (config.eval.max_new_tokens is None or config.eval.max_new_tokens >= 1, "eval.max_new_tokens",
         "must be at least 1"),
        (config.objective.beta.cosine_steps is None or config.objective.beta.cosine_steps >= 1,
         "objective.beta.cosine_steps", "must be at least 1"),
        (all(route.beta >= 0 for route in config.teachers.routes), "teachers.routes", "beta must not be negative"),
        (config.objective.nll_coef >= 0, "objective.nll_coef", "must not be negative"),
        (config.objective.ref_kl_coef >= 0, "objective.ref_kl_coef", "must not be negative"),
        (config.train.max_nonfinite_skips >= 1, "train.max_nonfinite_skips", "must be at least 1"),
        (config.eval.samples >= 1, "eval.samples", "must be at least 1"),
        (config.eval.num_problems >= 1, "eval.num_problems", "must be at least 1"),
        (config.eval.temperature >= 0, "eval.temperature", "must not be negative"),
        (config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1"),
        (len(config.reward.functions) >= 1, "reward.functions", "must name at least one reward"),
        (config.reward.timeout_s > 0, "reward.timeout_s", "must be positive"),
        (config.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be at least 1"),
        *[(False, key, message) for key, message in input_errors(config)],  # after the ranges they rest on
    ]
    _check_no_negative_counts(config)
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    for key, template, names in [("data.prompt_template", config.data.prompt_template, ("prompt",)),
                                 ("self_teacher.context", config.self_teacher.context, ("solution", "prompt")),
                                 ("failed_groups.hint_template", config.failed_groups.hint_template, ("hint",))]:
        _check_template(key, template, names)
    return config


def _check_no_negative_counts(section: object, prefix: str = "") -> None:
    """Every integer setting is a count, a period or a seed: none means anything negative
    (``eval.every=-1`` evaluated every step, ``checkpoint.every=-2`` never saved)."""
    for item in dataclasses.fields(section):
        value, key = getattr(section, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            _check_no_negative_counts(value, key + ".")
        elif isinstance(value, list):
            for index, element in enumerate(value):
                if dataclasses.is_dataclass(element):
                    _check_no_negative_counts(element, f"{key}[{index}].")
        elif isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{key}: must not be negative (got {value})")


def _check_template(key: str, template: str, names: tuple[str, ...]) -> None:
    """A str.format template may name only ``names``; literal braces are written twice."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ConfigError(f"{key}: not a valid template ({error}); write a literal brace as {{{{ or }}}}") from None
    allowed = ", ".join("{" + name + "}" for name in names)
    for name in fields:
        if name not in names:
            raise ConfigError(f"{key}: names {{{name}}}, but only {allowed} can be filled in" if name else
                              f"{key}: has an empty {{}}; only {allowed} can be filled in")
