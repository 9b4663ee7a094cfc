"""The on-policy distillation family of METHODS.md §6 as settings of the one objective:
exopd, opsd, scope, tip, rlad, gkd. Hand-computed weights and advantages, limiting cases, and
three training steps of each recipe on the bundled task."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from kdrl.config import BetaConfig, ConfigError, ObjectiveConfig, SelfTeacherConfig, load_config
from kdrl.objective import Objective
from kdrl.objective.loss import kd_advantage
from kdrl.objective.policy_gradient import anchored_log_denominator
from kdrl.objective.weights import ROW_WEIGHTS, TOKEN_SELECTIONS, group_softmax_weights
from kdrl.config_needs import solution_users
from kdrl.rollout.sources import DatasetResponses, RolloutSource, on_policy_at
from kdrl.teachers.self_teacher import SelfTeacher, privileged_problem
from kdrl.types import Problem, StudentOutput, TrainBatch
from test_objective import make_batch

D = torch.float64
RECIPES = Path(__file__).parent.parent / "recipes"
ONE = BetaConfig(schedule="constant", initial=1.0)


def objective(**kw) -> Objective:
    return Objective(ObjectiveConfig(beta=kw.pop("beta", ONE), chunk_size=3, **kw), total_steps=10,
                     max_response_len=6)


def loss_and_grads(obj: Objective, batch, hidden, weight):
    prepared = obj.prepare(batch, step=0)
    loss, metrics = obj.loss(prepared, StudentOutput(hidden, weight))
    return loss, torch.autograd.grad(loss, (hidden, weight)), metrics, prepared


def _train_records(config) -> list[dict]:
    from kdrl.trainer import train

    summary = train(config)
    lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def bundled_small(run_dir: Path, steps: int = 3) -> list[str]:
    """The bundled task and models at a few seconds per run: 2 prompts × 4 samples, no evaluation."""
    return [f"train.steps={steps}", "rollout.prompts_per_step=2", "rollout.group_size=4",
            "rollout.max_new_tokens=48", "eval.before=false", "data.eval=[]", "log.progress=false",
            "log.plot=false", f"log.run_dir={run_dir}"]


# --------------------------------------------------------------------------- rlad

def test_rlad_ratio_is_anchored_to_the_geometric_mixture_by_hand():
    s_old, teacher = torch.tensor([-1.0, -2.0], dtype=D), torch.tensor([-3.0, -1.0], dtype=D)
    torch.testing.assert_close(anchored_log_denominator(s_old, teacher, 0.5), torch.tensor([-2.0, -1.5], dtype=D))
    torch.testing.assert_close(anchored_log_denominator(s_old, teacher, 0.25),
                               torch.tensor([0.25 * -1 + 0.75 * -3, 0.25 * -2 + 0.75 * -1], dtype=D))
    with pytest.raises(ValueError, match="teacher"):
        anchored_log_denominator(s_old, None, 0.5)


def test_rlad_alpha_one_is_grpo_bitwise():
    """α = 1 with the teacher's log-probs present (1·s_old + 0·τ) equals GRPO without a teacher."""
    batch, hidden, weight = make_batch(rewards=(1.0, 0.0, 0.0, 1.0))
    no_teacher = dataclasses.replace(batch, teacher_logprobs=None, teacher_hidden=None, teacher_output_weight=None)
    grpo = loss_and_grads(objective(advantage="grpo", kd_placement="none"), no_teacher, hidden, weight)
    rlad = loss_and_grads(objective(advantage="grpo", kd_placement="none", ratio_anchor_alpha=1.0), batch,
                          hidden, weight)
    assert torch.equal(grpo[0], rlad[0])
    assert all(torch.equal(a, b) for a, b in zip(grpo[1], rlad[1]))
    anchored = loss_and_grads(objective(advantage="grpo", kd_placement="none", ratio_anchor_alpha=0.5), batch,
                              hidden, weight)
    assert not torch.equal(grpo[0], anchored[0])


def test_rlad_loss_by_hand():
    """One token, A = +1 (group (1, 0), drgrpo: ±0.5 → the first row), ε = 0.2: ρ = exp(s − (s_old + τ)/2)."""
    batch, hidden, weight = make_batch(lengths=(1, 1), rewards=(1.0, 0.0), R=1)
    obj = objective(advantage="drgrpo", kd_placement="none", ratio_anchor_alpha=0.5)
    loss, _, metrics, prepared = loss_and_grads(obj, batch, hidden, weight)
    s = torch.log_softmax(hidden.detach() @ weight.detach().T, -1).gather(-1, batch.response_ids[..., None])[:, 0, 0]
    rho = torch.exp(s - 0.5 * (batch.sampler_logprobs[:, 0] + batch.teacher_logprobs[:, 0]))
    advantage = torch.tensor([0.5, -0.5], dtype=D)
    per_row = -torch.minimum(rho * advantage, rho.clamp(0.8, 1.2) * advantage)
    torch.testing.assert_close(loss.detach(), per_row.mean())


def test_rlad_config_needs_a_teacher():
    with pytest.raises(ConfigError, match="model.teacher"):
        load_config(RECIPES / "rlad.yaml", ["model.teacher=null"])
    with pytest.raises(ConfigError, match="ratio_anchor_alpha"):
        load_config(RECIPES / "rlad.yaml", ["objective.ratio_anchor_alpha=1.5"])


# --------------------------------------------------------------------------- exopd

def test_exopd_advantage_by_hand():
    """Â = λ(τ − ℓ) − (s_old − ℓ): s_old = −1, τ = −0.5, ℓ = −2, λ = 1.25 → 1.25·1.5 − 1 = 0.875."""
    s_old, teacher, ref = (torch.tensor([[v, -1.0]], dtype=D) for v in (-1.0, -0.5, -2.0))
    mask = torch.tensor([[1.0, 0.0]], dtype=D)
    d = kd_advantage(s_old, teacher, mask, 0.0, reward_scale=1.25, reference_logprobs=ref)
    torch.testing.assert_close(-d, torch.tensor([[0.875, 0.0]], dtype=D))
    # through the objective: Â = A − β·m·D, with A = 0 (advantage none), β = 2
    batch, _, _ = make_batch(lengths=(1, 1), rewards=(1.0, 0.0), R=1)
    batch = dataclasses.replace(batch, sampler_logprobs=torch.tensor([[-1.0], [-3.0]], dtype=D),
                                teacher_logprobs=torch.tensor([[-0.5], [-1.0]], dtype=D),
                                reference_logprobs=torch.tensor([[-2.0], [-2.0]], dtype=D))
    obj = objective(advantage="none", kd_placement="advantage", kd_estimator="k1", kd_reward_scale=1.25,
                    beta=BetaConfig(initial=2.0))
    # row 2: 1.25·(−1 + 2) − (−3 + 2) = 2.25
    torch.testing.assert_close(obj.prepare(batch, 0).advantages, torch.tensor([[1.75], [4.5]], dtype=D))
    with pytest.raises(ValueError, match="reference"):
        obj.prepare(dataclasses.replace(batch, reference_logprobs=None), 0)


def test_exopd_lambda_one_is_opd_bitwise():
    batch, hidden, weight = make_batch()  # has reference log-probs ≠ the student's
    opd_batch = dataclasses.replace(batch, reference_logprobs=None)
    settings = dict(advantage="none", kd_placement="advantage", kd_estimator="k1")
    opd = loss_and_grads(objective(**settings), opd_batch, hidden, weight)
    exopd = loss_and_grads(objective(**settings, kd_reward_scale=1.0), batch, hidden, weight)
    assert torch.equal(opd[3].advantages, exopd[3].advantages)
    assert torch.equal(opd[0], exopd[0]) and all(torch.equal(a, b) for a, b in zip(opd[1], exopd[1]))
    extrapolated = objective(**settings, kd_reward_scale=1.25).prepare(batch, 0)
    assert not torch.equal(opd[3].advantages, extrapolated.advantages)


def test_exopd_config_needs_a_reference_and_the_advantage_placement():
    assert load_config(RECIPES / "exopd.yaml").model.reference == "student"
    with pytest.raises(ConfigError, match="model.reference"):
        load_config(RECIPES / "exopd.yaml", ["model.reference=null"])
    with pytest.raises(ConfigError, match="kd_reward_scale"):
        load_config(RECIPES / "kdrl.yaml", ["objective.kd_reward_scale=1.25", "model.reference=student"])


# --------------------------------------------------------------------------- scope

def rows_batch(rewards, group_size, sampler_logprobs, teacher_logprobs, mask) -> TrainBatch:
    """A batch with only what the row weights and token selections read."""
    rows, width = mask.shape
    return TrainBatch(input_ids=torch.zeros(rows, width, dtype=torch.long),
                      attention_mask=torch.ones(rows, width, dtype=torch.long), prompt_width=0,
                      response_ids=torch.zeros(rows, width, dtype=torch.long), response_mask=mask,
                      sampler_logprobs=sampler_logprobs, rewards=rewards, group_size=group_size,
                      teacher_logprobs=teacher_logprobs)


def test_scope_row_weights_by_hand():
    """Group of 4, rewards (1, 0, 1, 0); mean teacher log-probs of the incorrect rows −1, −2; mean
    student log-probs of the correct rows −0.5, −1.5 (T = 1, lengths 2 and 1)."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=D)
    student = torch.tensor([[-0.25, -0.75], [0.0, 0.0], [-1.5, 9.0], [0.0, 9.0]], dtype=D)  # 9: padding
    teacher = torch.tensor([[0.0, 0.0], [-1.5, -0.5], [0.0, 9.0], [-2.0, 9.0]], dtype=D)
    kd, nll = ROW_WEIGHTS["scope"](rows_batch(rewards, 4, student, teacher, mask), 1.0, ObjectiveConfig())
    e = math.exp
    w_tea = [2 * e(-1) / (e(-1) + e(-2)), 2 * e(-2) / (e(-1) + e(-2))]
    w_stu = [2 * e(0.5) / (e(0.5) + e(1.5)), 2 * e(1.5) / (e(0.5) + e(1.5))]  # higher perplexity, more weight
    torch.testing.assert_close(kd, torch.tensor([0.0, w_tea[0], 0.0, w_tea[1]], dtype=D))
    torch.testing.assert_close(nll, torch.tensor([w_stu[0], 0.0, w_stu[1], 0.0], dtype=D))
    # T = 2 halves the scores
    kd2, _ = ROW_WEIGHTS["scope"](rows_batch(rewards, 4, student, teacher, mask), 1.0,
                                  ObjectiveConfig(scope_temperature=2.0))
    assert kd2[1].item() == pytest.approx(2 * e(-0.5) / (e(-0.5) + e(-1)))


def test_scope_empty_sets_get_weight_zero():
    members = torch.tensor([True, True, False, False])  # group 1: all in the set; group 2: none
    weights = group_softmax_weights(torch.tensor([3.0, 1.0, 5.0, 7.0], dtype=D), members, 2)
    assert weights[2:].tolist() == [0.0, 0.0]
    assert weights[:2].sum().item() == pytest.approx(2.0)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D)  # group 1 all correct, group 2 all wrong
    logprobs = torch.full((4, 2), -1.0, dtype=D)
    kd, nll = ROW_WEIGHTS["scope"](rows_batch(rewards, 2, logprobs, logprobs, torch.ones(4, 2, dtype=D)), 1.0,
                                   ObjectiveConfig())
    assert kd.tolist() == [0.0, 0.0, 1.0, 1.0] and nll.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_scope_routes_kd_and_likelihood_through_the_objective():
    batch, hidden, weight = make_batch(rewards=(1.0, 0.0, 0.0, 1.0), group_size=2)
    obj = objective(advantage="none", kd_placement="advantage", kd_estimator="k1", row_weights="scope", nll_coef=1.0)
    prepared = obj.prepare(batch, 0)
    assert prepared.kd_mask.tolist() == [0.0, 1.0, 1.0, 0.0]  # one incorrect row per group: n·softmax = 1
    assert prepared.nll_mask.tolist() == [1.0, 0.0, 0.0, 1.0]
    valid = batch.response_mask > 0
    assert torch.all(prepared.advantages[0][valid[0]] == 0) and torch.all(prepared.advantages[3][valid[3]] == 0)
    assert torch.any(prepared.advantages[1][valid[1]] != 0)


# --------------------------------------------------------------------------- tip

def test_tip_selection_by_hand():
    """Entropies (0.1, 0.2, 0.3, 0.4, 10): H_98 = 0.4 + 0.92·9.6 = 9.232 (linear quantile); the
    highest-divergence token is also the most uncertain (ĥ = 1) and is dropped."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=D)
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 10.0, 0.0]], dtype=D)
    divergence = torch.tensor([[1.0, 1.0, 1.0, 5.0, 100.0, 50.0]], dtype=D)
    ceiling = 0.4 + 0.92 * 9.6
    scores = [(1 - h / ceiling) * d for h, d in zip([0.1, 0.2, 0.3, 0.4, 10 / 10 * ceiling], [1, 1, 1, 5, 100])]
    assert scores.index(max(scores)) == 3 and scores[4] == pytest.approx(0.0)

    def select(mask, entropy, divergence, fraction, name="tip"):
        batch = dataclasses.replace(rows_batch(torch.zeros(mask.shape[0], dtype=D), 1, mask, mask, mask),
                                    sampler_entropy=entropy)
        return TOKEN_SELECTIONS[name](batch, divergence, ObjectiveConfig(tip_keep_fraction=fraction))

    assert select(mask, entropy, divergence, 0.2).tolist() == [[0, 0, 0, 5.0, 0, 0]]  # 1 of 5, scaled 5/1
    assert select(mask, entropy, divergence, 0.4).tolist() == [[2.5, 0, 0, 2.5, 0, 0]]  # then the lowest entropy
    assert torch.equal(select(mask, entropy, divergence, 0.2, "all"), mask)
    assert select(torch.ones(1, 15, dtype=D), torch.rand(1, 15, dtype=D), torch.rand(1, 15, dtype=D),
                  0.2).gt(0).sum() == 3  # ceil(0.2·15) is 3, not 4 from 3.0000000000000004
    with pytest.raises(ValueError, match="entropy"):
        select(mask, None, divergence, 0.2)


def test_tip_through_the_objective_keeps_kd_on_the_selected_tokens_only():
    batch, hidden, weight = make_batch(lengths=(4, 4, 4, 4), R=4)
    batch = dataclasses.replace(batch, sampler_entropy=torch.rand(4, 4, generator=torch.Generator().manual_seed(1),
                                                                  dtype=D))
    settings = dict(advantage="none", pg_coef=0.0, kd_placement="loss", kd_estimator="rkl")
    full = loss_and_grads(objective(**settings), batch, hidden, weight)
    tip = loss_and_grads(objective(**settings, kd_token_selection="tip", tip_keep_fraction=0.25), batch, hidden,
                         weight)
    selected = tip[3].kd_token_weights
    assert selected.gt(0).sum() == 4 and selected.max() == 4.0  # 4 of 16 tokens, scaled 16/4
    # the KD term is the mean of the full-vocabulary reverse KL over the kept tokens
    student = torch.log_softmax(hidden.detach() @ weight.detach().T, -1)
    teacher = torch.log_softmax(batch.teacher_hidden @ batch.teacher_output_weight.T, -1)
    per_token = (student.exp() * (student - teacher)).sum(-1)
    torch.testing.assert_close(tip[0].detach(), per_token[selected > 0].mean())
    torch.testing.assert_close(full[0].detach(), per_token.mean())
    metrics = objective(**settings, kd_token_selection="tip", tip_keep_fraction=0.25).prepare_metrics(tip[3])
    assert metrics["kd_token_fraction"] == 0.25
    assert metrics["kd_logit_memory_saved_mb_calculated"] == pytest.approx(12 * 7 * 4 * 2 / 2 ** 20)  # V = 7


# --------------------------------------------------------------------------- opsd

def test_privileged_context_by_hand():
    problem = Problem(id="p1", prompt="2+3=?\n", answer="5", solution="2+3=5 \\boxed{5}")
    assert privileged_problem(problem, "{solution}\n{prompt}").prompt == "2+3=5 \\boxed{5}\n2+3=?\n"
    assert privileged_problem(problem, "{prompt}").prompt == problem.prompt
    with pytest.raises(ValueError, match="p1"):
        privileged_problem(dataclasses.replace(problem, solution=None), "{solution}\n{prompt}")


def test_ema_self_teacher_follows_the_student():
    student = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
    teacher = SelfTeacher(SelfTeacherConfig(mode="ema", ema_decay=0.75), student, None, lambda p, s: [], 0)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[5.0, -2.0]]))
    teacher.after_update()
    torch.testing.assert_close(teacher.model.weight, torch.tensor([[0.75 * 1 + 0.25 * 5, 0.75 * 2 - 0.25 * 2]]))
    saved = teacher.state_dict()
    fresh = SelfTeacher(SelfTeacherConfig(mode="ema", ema_decay=0.75), student, None, lambda p, s: [], 0)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.model.weight, teacher.model.weight)
    live = SelfTeacher(SelfTeacherConfig(mode="live"), student, None, lambda p, s: [], 0)
    assert live.model is student and live.state_dict() == {}


def test_opsd_without_privileged_context_has_zero_kd_signal_at_the_start(tmp_path):
    """The frozen self-teacher is the initial student: with the context removed it reads exactly the
    student's input, so JSD = 0 on the first step; with the solution in its prompt it is not."""
    base = bundled_small(tmp_path / "run", steps=1)
    removed = _train_records(load_config(RECIPES / "opsd.yaml", base + ['self_teacher.context="{prompt}"']))
    assert removed[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)  # float32 rounding of the same forward
    assert removed[0]["kl_sampled"] == pytest.approx(0.0, abs=1e-6)
    run_dir = [o for o in base if o.startswith("log.run_dir")][0] + "-privileged"
    privileged = _train_records(load_config(RECIPES / "opsd.yaml", base + [run_dir]))
    assert privileged[0]["kd_loss"] > 1e-2
    advantage_form = _train_records(load_config(RECIPES / "opsd.yaml", base + [
        'self_teacher.context="{prompt}"', "objective.kd_placement=advantage", "objective.kd_estimator=k1",
        "objective.pg_coef=1.0", run_dir + "-advantage"]))
    assert advantage_form[0]["advantage_mean"] == pytest.approx(0.0, abs=1e-5)  # s_old − τ: generate vs forward


def test_opsd_without_solutions_is_an_error_naming_the_problem(tiny_overrides, tmp_path):
    from kdrl.data import DataError
    from kdrl.build import build

    data = tmp_path / "no_solution.jsonl"
    data.write_text('{"id": "a", "prompt": "1+1=?\\n", "answer": "2", "solution": "1+1=2 \\\\boxed{2}"}\n'
                    '{"id": "b7", "prompt": "2+2=?\\n", "answer": "4"}\n')
    overrides = [o for o in tiny_overrides if not o.startswith(("model.teacher", "data.train"))]
    config = load_config(RECIPES / "opsd.yaml", overrides + [f"data.train={data}"])
    assert solution_users(config) == ["model.teacher=self (privileged context)"]
    with pytest.raises(DataError, match=r"no_solution.jsonl:2: .*'b7'.*model.teacher=self"):
        build(config)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- gkd

def test_gkd_batch_choice_is_a_function_of_seed_and_step():
    choices = [on_policy_at(0, step, 0.5) for step in range(400)]
    assert choices == [on_policy_at(0, step, 0.5) for step in range(400)]  # same on resume
    assert 160 < sum(choices) < 240
    assert choices != [on_policy_at(1, step, 0.5) for step in range(400)]
    assert all(on_policy_at(0, s, 1.0) for s in range(20)) and not any(on_policy_at(0, s, 0.0) for s in range(20))
    source = RolloutSource("mixed", {}, seed=0, on_policy_fraction=0.5, off_policy_source="dataset")
    assert [source.source_at(s) for s in range(400)] == ["student" if c else "dataset" for c in choices]


def test_dataset_responses_are_the_solutions_and_marked_off_policy(tiny_assets):
    from kdrl.config import ModelConfig
    from kdrl.models import load_model, load_tokenizer
    from kdrl.rollout import SamplingParams
    from kdrl.teachers import LocalTeacher
    from kdrl.trainer import make_batch as trainer_make_batch

    tokenizer = load_tokenizer(str(tiny_assets / "student"))
    model = load_model(str(tiny_assets / "student"), ModelConfig(), torch.device("cpu"), trainable=False)
    encode = lambda problem, suffix="": tokenizer(problem.prompt + suffix)["input_ids"]  # noqa: E731
    problems = [Problem(id="a", prompt="1+1=?\n", answer="2", solution="1+1=2 \\boxed{2}"),
                Problem(id="b", prompt="3*3=?\n", answer="9", solution="3*3=9 \\boxed{9}")]
    engine = DatasetResponses(tokenizer, encode, LocalTeacher(model))
    source = RolloutSource("dataset", {"dataset": engine})
    rollouts = source.generate(problems, 4, SamplingParams(max_new_tokens=64))
    assert rollouts.group_size == 1 and rollouts.num_rows == 2 and rollouts.sources == ["dataset", "dataset"]
    expected = tokenizer("1+1=2 \\boxed{2}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rollouts.response_ids[0, :len(expected)].tolist() == expected
    assert rollouts.response_mask[0].sum() == len(expected) and not rollouts.truncated.any()
    assert rollouts.response_texts == ["1+1=2 \\boxed{2}", "3*3=9 \\boxed{9}"]
    assert torch.all(rollouts.sampler_logprobs[rollouts.response_mask > 0] < 0)  # the student's scores
    short = engine.generate(problems, 1, SamplingParams(max_new_tokens=5))
    assert short.truncated.all() and short.response_ids.shape[1] == 5
    batch = trainer_make_batch(rollouts, torch.ones(2), None, None)
    assert batch.on_policy.tolist() == [0.0, 0.0]  # off-policy: the ratio cap applies


def test_gkd_needs_solutions_only_with_dataset_batches():
    assert solution_users(load_config(RECIPES / "gkd.yaml")) == ["rollout.policy=mixed (dataset responses)"]
    assert solution_users(load_config(RECIPES / "gkd.yaml", ["rollout.off_policy_source=teacher"])) == []
    assert solution_users(load_config(RECIPES / "gkd.yaml", ["rollout.on_policy_fraction=1.0"])) == []
    assert solution_users(load_config(RECIPES / "kdrl.yaml")) == []


# --------------------------------------------------------------------------- three steps on the bundled task

FAMILY = ["exopd", "opsd", "scope", "tip", "rlad", "gkd"]


@pytest.mark.parametrize("recipe", FAMILY)
def test_three_steps_on_the_bundled_task(recipe, tmp_path):
    config = load_config(RECIPES / f"{recipe}.yaml", bundled_small(tmp_path / "run"))
    records = _train_records(config)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert math.isfinite(record["loss"]) and record["skipped"] == 0.0, record
    first = records[0]
    if recipe == "tip":
        assert 0.2 <= first["kd_token_fraction"] < 0.25 and first["kd_logit_memory_saved_mb_calculated"] > 0
    if recipe == "gkd":  # seed 0: steps 0 and 2 are dataset batches (all correct), step 1 is on-policy
        assert [r["on_policy_rows"] for r in records] == [float(on_policy_at(0, s, 0.5)) for s in range(3)]
    if recipe in ("opsd", "tip", "gkd"):
        assert first["kd_loss"] > 0
    if recipe in ("exopd", "scope", "rlad"):  # rlad: zero while both groups' rewards are uniform
        assert any(r["pg_loss"] != 0 for r in records)


@pytest.mark.parametrize("recipe, extra", [("gkd", []), ("opsd", ["self_teacher.mode=ema"])])
def test_resume_is_exact(recipe, extra, tmp_path, capsys):
    """gkd's per-step source choice and opsd's EMA teacher survive a resume: steps 3-4 and the final
    weights match an uninterrupted run."""
    import shutil

    from kdrl import checkpoint as ckpt
    from kdrl.cli import main
    from test_reliability import comparable, same_weights

    full = tmp_path / "full"
    overrides = bundled_small(full, steps=4) + ["checkpoint.every=2", "log.sample_every=0"] + extra
    assert main(["train", str(RECIPES / f"{recipe}.yaml"), *overrides]) == 0
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted, symlinks=True)
    shutil.rmtree(ckpt.checkpoint_dir(interrupted) / ckpt.step_name(4))  # as if killed before step 4's save
    assert main(["train", "--resume", str(interrupted)]) == 0
    capsys.readouterr()
    got, want = comparable(interrupted), comparable(full)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got[2:], want[2:]):
        for key in ("loss", "kd_loss", "reward", "response_length", "on_policy_rows"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), (a["step"], key, a[key], b[key])
    assert same_weights(interrupted / "final", full / "final")
