"""The two scheduled settings of the one objective: kd_then_rl's phases (distillation alone, then
GRPO alone) and kdrl_auto's β controller, on hand-made examples, in the loss, and across a resume."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kdrl.config import BetaConfig, BetaControllerConfig, ConfigError, ObjectiveConfig, load_config
from kdrl.objective import Objective
from kdrl.objective.controllers import KLTargetController, measured_kl
from kdrl.objective.schedules import PHASES, beta_at, switch_step
from kdrl.types import StudentOutput
from test_objective import make_batch

RECIPES = Path(__file__).parent.parent / "recipes"


# --------------------------------------------------------------------------- kd_then_rl

def test_kd_then_rl_coefficients_switch_at_s():
    objective = Objective(ObjectiveConfig(phases="kd_then_rl", switch_fraction=0.3,
                                          beta=BetaConfig(schedule="constant", initial=0.7)), total_steps=10,
                          max_response_len=4)
    assert objective.switch_step == 3
    assert [objective.coefficients(t) for t in range(6)] == [(0.7, 0.0)] * 3 + [(0.0, 1.0)] * 3
    assert PHASES["joint"](0, 0) == PHASES["joint"](99, 0) == (1.0, 1.0)


def test_switch_step_explicit_beats_fraction():
    assert switch_step(0.5, None, 301) == 150  # round(150.5) is the even 150
    assert switch_step(0.5, 7, 301) == 7
    assert switch_step(0.0, None, 10) == 0 and switch_step(1.0, None, 10) == 10


def _grads(objective: Objective, step: int, **batch_kw) -> tuple[torch.Tensor, dict]:
    batch, hidden, weight = make_batch(**batch_kw)
    prepared = objective.prepare(batch, step)
    loss, metrics = objective.loss(prepared, StudentOutput(hidden_states=hidden, output_weight=weight))
    loss.backward()
    return torch.cat([hidden.grad.flatten(), weight.grad.flatten()]), {**metrics, **objective.prepare_metrics(prepared)}


def test_kd_then_rl_is_kd_rkl_before_s_and_grpo_after():
    """Before S the gradient is exactly kd_rkl's (reverse KL alone), from S on exactly GRPO's."""
    kw = dict(beta=BetaConfig(schedule="constant", initial=0.5), chunk_size=3, kd_estimator="rkl")
    sequential = Objective(ObjectiveConfig(phases="kd_then_rl", switch_step=2, **kw), 10, 6)
    kd_only = Objective(ObjectiveConfig(advantage="none", pg_coef=0.0, **kw), 10, 6)
    grpo = Objective(ObjectiveConfig(kd_placement="none", **kw), 10, 6)
    joint = Objective(ObjectiveConfig(**kw), 10, 6)
    for step, reference in ((0, kd_only), (1, kd_only), (2, grpo), (9, grpo)):
        got, metrics = _grads(sequential, step)
        want, _ = _grads(reference, step)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), step
        assert metrics["pg_coef"] == (0.0 if step < 2 else 1.0) and metrics["beta"] == (0.5 if step < 2 else 0.0)
    assert not torch.allclose(_grads(joint, 0)[0], _grads(kd_only, 0)[0])  # the two terms do differ


def test_kd_then_rl_reads_no_teacher_after_the_switch():
    """From S on β_t = 0: the objective asks for no teacher input, and a batch without one gives the
    same loss and gradient as one with it (GRPO's)."""
    kw = dict(beta=BetaConfig(schedule="constant", initial=0.5), chunk_size=3, kd_estimator="rkl")
    sequential = Objective(ObjectiveConfig(phases="kd_then_rl", switch_step=2, **kw), 10, 6)
    assert sequential.inputs_at(1).teacher_hidden and not sequential.inputs_at(2).teacher_logprobs
    with_teacher, metrics = _grads(sequential, 2)
    batch, hidden, weight = make_batch()
    bare = dataclasses.replace(batch, teacher_logprobs=None, teacher_hidden=None, teacher_output_weight=None)
    loss, bare_metrics = sequential.loss(sequential.prepare(bare, 2), StudentOutput(hidden, weight))
    loss.backward()
    assert torch.equal(torch.cat([hidden.grad.flatten(), weight.grad.flatten()]), with_teacher)
    assert bare_metrics["kd_loss"] == metrics["kd_loss"] == 0 and "kl_sampled" not in bare_metrics
    with pytest.raises(ValueError, match="objective.kd_placement=loss reads batch.teacher_logprobs"):
        sequential.loss(sequential.prepare(bare, 1), StudentOutput(hidden, weight))


def test_kd_then_rl_run_scores_with_the_teacher_only_before_the_switch(tiny_overrides):
    from kdrl.build import build
    from kdrl.trainer import training_step

    run = build(load_config(RECIPES / "kd_then_rl.yaml", tiny_overrides + ["train.steps=4"]))
    calls, score = [], run.teacher_scorer.score
    run.teacher_scorer.score = lambda rollouts, **kw: calls.append(run.step) or score(rollouts, **kw)
    metrics = [training_step(run) for _ in range(4)]
    assert calls == [0, 1]  # S = round(0.5 · 4) = 2
    assert [m["beta"] for m in metrics] == [1.0, 1.0, 0.0, 0.0]
    assert ["kl_sampled" in m for m in metrics] == [True, True, False, False]
    run.logger.close()


def test_kd_then_rl_needs_kd_in_the_loss():
    with pytest.raises(ConfigError, match="objective.phases"):
        load_config(RECIPES / "kd_then_rl.yaml", ["objective.kd_placement=advantage", "objective.kd_estimator=k1"])
    with pytest.raises(ConfigError, match="objective.switch_fraction"):
        load_config(RECIPES / "kd_then_rl.yaml", ["objective.switch_fraction=1.5"])


# --------------------------------------------------------------------------- kdrl_auto's controller

def test_kl_target_controller_on_a_hand_made_sequence():
    """target 0.5, gain 0.5, error clip 0.2, bounds [0.8, 1.2], β_0 = 1: each β by hand."""
    controller = KLTargetController(beta=1.0, target=0.5, target_fraction=9.0, gain=0.5, error_clip=0.2,
                                    low=0.8, high=1.2)  # an absolute target: the fraction is not used
    steps = [  # (measured KL, β after it)
        (1.0, 1.1),                # twice the target: error +1, clipped to +0.2: β × 1.1
        (0.5, 1.1),                # on target: unchanged
        (0.45, 1.045),             # error 0.45/0.5 − 1 = −0.1: β × 0.95
        (math.nan, 1.045),         # no measurement: unchanged
        (0.0, 0.9405),             # error −1, clipped to −0.2: β × 0.9
        (0.0, 0.84645),
        (0.0, 0.8),                # 0.84645 × 0.9 = 0.7618 is below the lower bound
        (10.0, 0.88),              # error +19, clipped: β × 1.1
        (0.55, 0.924),             # error +0.1: β × 1.05
        (10.0, 1.0164), (10.0, 1.11804), (10.0, 1.2),  # 1.11804 × 1.1 = 1.2298 is above the upper bound
    ]
    got = [controller.update(kl) for kl, _ in steps]
    assert got == pytest.approx([beta for _, beta in steps], rel=1e-12, abs=0)
    assert controller.updates == len(steps) - 1  # the NaN was not a measurement


def test_relative_target_is_a_fraction_of_the_first_kl():
    """target None, fraction 0.5: the first KL (0.8) sets the target to 0.4."""
    controller = KLTargetController(beta=1.0, target=None, target_fraction=0.5, gain=0.2, error_clip=0.2,
                                    low=0.1, high=10.0)
    steps = [  # (measured KL, β after it)
        (math.nan, 1.0),           # no measurement: no scale yet either
        (0.8, 1.04),               # 0.8 / 0.4 − 1 = 1, clipped to 0.2: β × (1 + 0.2·0.2)
        (0.42, 1.04 * 1.01),       # 0.42 / 0.4 − 1 = 0.05: β × 1.01
        (0.4, 1.0504),             # on target
        (0.2, 1.0504 * 0.96),      # −0.5, clipped to −0.2: β × 0.96
    ]
    got = [controller.update(kl) for kl, _ in steps]
    assert got == pytest.approx([beta for _, beta in steps], rel=1e-12, abs=0)
    assert controller.first_kl == 0.8


def test_controller_measures_the_exact_kl_for_rkl_and_k1_otherwise():
    metrics = {"kd_value": 0.9, "kl_sampled": 0.4}
    assert measured_kl(metrics, "rkl") == 0.9 and measured_kl(metrics, "k3") == 0.9
    assert measured_kl(metrics, "k2") == 0.4 and measured_kl(metrics, "topk") == 0.4
    assert math.isnan(measured_kl({}, "rkl"))


def _auto(initial=1.0, **controller) -> Objective:
    beta = BetaConfig(schedule="adaptive", initial=initial,
                      controller=BetaControllerConfig(**{"target": 0.5, "gain": 0.5, "error_clip": 0.2, **controller}))
    assert beta.controller.target_fraction == 0.7  # the default, unused with an absolute target
    return Objective(ObjectiveConfig(beta=beta, chunk_size=3), 10, 6)


def test_objective_uses_the_controllers_beta_and_skips_skipped_updates():
    objective = _auto()
    assert objective.coefficients(0) == (1.0, 1.0)
    objective.after_update({"kd_value": 1.0, "skipped": 0.0})
    assert objective.coefficients(1) == (pytest.approx(1.1), 1.0)
    objective.after_update({"kd_value": 1.0, "skipped": 1.0})  # no optimizer step: no measurement
    assert objective.coefficients(2)[0] == pytest.approx(1.1)
    _, metrics = _grads(objective, 2)
    assert metrics["beta"] == pytest.approx(1.1)
    # the start is clipped into the bounds; the schedule cannot be read off the step
    assert _auto(initial=9.0, max=2.0).coefficients(0)[0] == 2.0
    with pytest.raises(ValueError, match="controller"):
        beta_at(BetaConfig(schedule="adaptive"), 0, 10)


def test_controller_state_round_trips_and_is_required_on_resume():
    objective = _auto(target=None)
    for kl in (1.0, 0.9, 0.2):
        objective.after_update({"kd_value": kl})
    state = json.loads(json.dumps(objective.state_dict()))  # plain data
    resumed = _auto(target=None)
    resumed.load_state_dict(state)
    assert resumed.coefficients(5) == objective.coefficients(5) and resumed.beta_controller.updates == 3
    assert resumed.beta_controller.first_kl == 1.0  # the relative target's scale resumes too
    for kl in (0.5, 0.9):
        assert resumed.beta_controller.update(kl) == objective.beta_controller.update(kl)
    with pytest.raises(ValueError, match="beta controller"):
        _auto().load_state_dict({})
    plain = Objective(ObjectiveConfig(), 10, 6)
    assert plain.state_dict() == {}
    plain.load_state_dict({})  # nothing to restore


def test_controller_settings_are_checked():
    with pytest.raises(ConfigError, match="objective.beta.controller.target"):
        load_config(RECIPES / "kdrl_auto.yaml", ["objective.beta.controller.target=0"])
    with pytest.raises(ConfigError, match="objective.beta.controller.error_clip"):
        load_config(RECIPES / "kdrl_auto.yaml", ["objective.beta.controller.error_clip=5"])  # 1 − 0.2·5 = 0
    with pytest.raises(ConfigError, match="objective.beta.controller.target_fraction"):
        load_config(RECIPES / "kdrl_auto.yaml", ["objective.beta.controller.target_fraction=0"])
    with pytest.raises(ConfigError, match="objective.beta.controller.min"):
        load_config(RECIPES / "kdrl_auto.yaml", ["objective.beta.controller.min=6"])
    with pytest.raises(ConfigError, match="objective.beta.schedule"):
        load_config(RECIPES / "kdrl_auto.yaml", ["objective.kd_placement=none"])


# --------------------------------------------------------------------------- training and resume

def test_kdrl_auto_resumes_its_beta_exactly(tiny_overrides, tmp_path, capsys):
    """The controller's β survives a resume: steps 3-4 (their β) and the final weights match an
    uninterrupted run. Without the state in the checkpoint β would restart at 1.0 at step 3."""
    from kdrl import checkpoint as ckpt
    from kdrl.cli import main
    from test_reliability import comparable, same_weights

    full = tmp_path / "full"
    overrides = [o for o in tiny_overrides if not o.startswith("log.run_dir")] + [
        "train.steps=4", "checkpoint.every=2", "log.sample_every=0", f"log.run_dir={full}",
        "reward.functions=[kdrl_test_rewards:char_parity]"]
    assert main(["train", str(RECIPES / "kdrl_auto.yaml"), *overrides]) == 0
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted, symlinks=True)
    shutil.rmtree(ckpt.checkpoint_dir(interrupted) / ckpt.step_name(4))
    assert main(["train", "--resume", str(interrupted)]) == 0
    capsys.readouterr()
    got = [r for r in comparable(interrupted) if r["kind"] == "train"]
    want = [r for r in comparable(full) if r["kind"] == "train"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    betas = [r["beta"] for r in want]
    assert betas[0] == 1.0 and len(set(betas)) == 4  # the random teacher is far away: β moves every step
    for a, b in zip(got, want):
        for key in ("beta", "loss", "kd_loss", "kd_value"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), (a["step"], key, a[key], b[key])
    assert same_weights(interrupted / "final", full / "final")
