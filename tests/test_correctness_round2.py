"""Correctness defects found by reading the code (issue 14, items 8-11; item 7 is in
test_distributed.py): each test fails on the code before its fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdrl.config import load_config
from kdrl.types import TrainBatch

RECIPES = Path(__file__).parent.parent / "recipes"


def batch_of_lengths(lengths: list[int], group_size: int = 2, prompt_width: int = 2) -> TrainBatch:
    rows, width = len(lengths), max(lengths)
    mask = torch.zeros(rows, width)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1.0
    ids = torch.full((rows, prompt_width + width), 5, dtype=torch.long)
    return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_width=prompt_width,
                      response_ids=ids[:, prompt_width:], response_mask=mask, sampler_logprobs=torch.zeros(rows, width),
                      rewards=torch.tensor([1.0, 0.0] * (rows // 2)), group_size=group_size)


# ----------------------------------------------------------------------------- 8: token_mean per minibatch

def test_token_mean_minibatches_take_full_steps(tiny_overrides, monkeypatch):
    """Lengths [10, 10, 30, 30] in two minibatches: each optimizer step's token weights sum to one
    (they were 0.5 and 1.5 of a full step: normalised by the whole batch's 80 tokens, rescaled by 2)."""
    from kdrl.build import build
    from kdrl.trainer import update

    config = load_config(RECIPES / "grpo.yaml", tiny_overrides + ["train.updates_per_batch=2", "train.max_grad_norm=1e9",
                                                                  "objective.loss_agg=token_mean"])
    run = build(config)
    probe = next(p for p in run.student.parameters() if p.requires_grad)

    def weight_sum_loss(micro, student, off_policy=False):  # d loss / d probe = the step's total token weight
        weight = (micro.token_weights * micro.response_mask).sum()
        return weight * probe.sum() + 0.0 * student.hidden_states.sum(), {"loss": weight}

    steps = []
    monkeypatch.setattr(run.objective, "loss", weight_sum_loss)
    monkeypatch.setattr(run.optimizer, "step", lambda *a, **k: steps.append(float(probe.grad.flatten()[0])))
    batch = run.objective.prepare(batch_of_lengths([10, 10, 30, 30]), 0)
    update(run, batch)
    assert steps == pytest.approx([1.0, 1.0])


def test_minibatch_keeps_sequence_mean_scales():
    from kdrl.objective import Objective

    for agg, expected in [("seq_mean_token_mean", 1.0), ("seq_mean_token_sum_norm", (10 + 10) / (30 * 2))]:
        config = load_config(None, [f"objective.loss_agg={agg}"])
        objective = Objective(config.objective, total_steps=1, max_response_len=30)
        batch = objective.prepare(batch_of_lengths([10, 10, 30, 30]), 0)
        first = objective.minibatch(batch, torch.tensor([0, 1]))
        assert float((first.token_weights * first.response_mask).sum()) == pytest.approx(expected)


# ----------------------------------------------------------------------------- 9: the teacher's output bias

def test_full_vocabulary_kd_sees_the_teacher_bias(tiny_assets):
    """A teacher whose head has a bias: the sampled log-probs and the full-vocabulary term come from
    one distribution, and the objective's rkl equals KL(student || teacher) formed with the bias."""
    from transformers import AutoModelForCausalLM

    from kdrl.objective import Objective
    from kdrl.teachers import LocalTeacher
    from kdrl.trainer import make_batch
    from kdrl.types import Rollouts, StudentOutput

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets / "teacher").eval()
    head = teacher.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_(0, 3.0)
    teacher.lm_head = biased
    teacher.config.tie_word_embeddings = False
    rows, width = 2, 4
    rollouts = Rollouts(problems=[], group_size=2, prompt_ids=torch.randint(2, 50, (rows, 3)),
                        prompt_mask=torch.ones(rows, 3, dtype=torch.long),
                        response_ids=torch.randint(2, 50, (rows, width)), response_mask=torch.ones(rows, width),
                        sampler_logprobs=torch.zeros(rows, width), response_texts=["", ""],
                        truncated=torch.zeros(rows, dtype=torch.bool), sources=["student"] * rows)
    out = LocalTeacher(teacher).score(rollouts, need_hidden=True)
    assert out.output_bias is not None
    teacher_logits = out.hidden_states @ out.output_weight.T + out.output_bias
    gathered = teacher_logits.log_softmax(-1).gather(-1, rollouts.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(gathered, out.token_logprobs, rtol=1e-4, atol=1e-4)

    config = load_config(None, ["objective.kd_estimator=rkl", "objective.pg_coef=0"])
    objective = Objective(config.objective, total_steps=1, max_response_len=width)
    batch = objective.prepare(make_batch(rollouts, torch.tensor([1.0, 0.0]), out, None), 0)
    hidden = torch.randn(rows, width, head.in_features)
    student = StudentOutput(hidden_states=hidden, output_weight=head.weight.detach())
    _, metrics = objective.loss(batch, student)
    student_logp = (hidden @ head.weight.detach().T).log_softmax(-1)
    kl = (student_logp.exp() * (student_logp - teacher_logits.log_softmax(-1))).sum(-1).mean()
    assert float(metrics["kd_value"]) == pytest.approx(float(kl), rel=1e-4)


# ----------------------------------------------------------------------------- 10: tip with ghpo / ampo

def test_repacked_rows_keep_the_sampler_entropy():
    from kdrl.rollout.rows import pack, subset, unpack
    from kdrl.types import Problem, Rollouts

    problem = Problem(id="0", prompt="p", answer="1")
    entropy = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.4, 0.5]])
    rollouts = Rollouts(problems=[problem], group_size=2, prompt_ids=torch.tensor([[3, 4], [3, 4]]),
                        prompt_mask=torch.ones(2, 2, dtype=torch.long), response_ids=torch.tensor([[5, 6, 0], [5, 6, 7]]),
                        response_mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
                        sampler_logprobs=torch.zeros(2, 3), response_texts=["a", "b"],
                        truncated=torch.zeros(2, dtype=torch.bool), sources=["student", "student"],
                        sampler_entropy=entropy)
    torch.testing.assert_close(pack(unpack(rollouts), [problem], 2, 0).sampler_entropy, entropy)
    torch.testing.assert_close(subset(rollouts, torch.tensor([1])).sampler_entropy, entropy[1:])


@pytest.mark.parametrize("recipe", ["ghpo", "ampo"])
def test_tip_with_a_failed_group_action_trains(tiny_overrides, recipe, capsys):
    from kdrl.cli import main

    code = main(["train", str(RECIPES / f"{recipe}.yaml"), *tiny_overrides, "train.steps=1", "rollout.group_size=4",
                 f"model.teacher={tiny_overrides[1].split('=', 1)[1]}", "objective.kd_placement=loss",
                 "objective.kd_estimator=k2", "objective.kd_token_selection=tip"])
    assert code == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- 11: skip together

def test_nonfinite_step_on_another_rank_skips_this_one(tiny_overrides, monkeypatch):
    from kdrl.build import build
    from kdrl.trainer import update

    run = build(load_config(RECIPES / "grpo.yaml", tiny_overrides))
    before = [p.detach().clone() for p in run.student.parameters()]
    decisions = []

    def another_rank_is_not_finite(flag: bool) -> bool:
        decisions.append(flag)
        return True

    monkeypatch.setattr(run.dist, "any_rank", another_rank_is_not_finite)
    batch = run.objective.prepare(batch_of_lengths([3, 4, 5, 6]), 0)
    metrics = update(run, batch)
    assert decisions == [False]  # this rank's own loss was finite
    assert metrics["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, run.student.parameters()))
