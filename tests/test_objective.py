"""The unified Objective: prepare (advantages, masks, weights, β) and the micro-batch loss."""
import dataclasses

import pytest
import torch

from kdrl.config import BetaConfig, ObjectiveConfig
from kdrl.objective import Objective
from kdrl.objective.divergences import rkl
from kdrl.objective.policy_gradient import policy_gradient_loss
from kdrl.types import StudentOutput, TrainBatch

D = torch.float64


def make_batch(lengths=(3, 1, 4, 2), rewards=(1.0, 0.0, 0.0, 0.0), group_size=2, R=4, V=7, H=5, seed=0,
               on_policy=None):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).to(D)
    response_ids = torch.randint(V, (B, R), generator=g)
    teacher_hidden, teacher_weight = torch.randn(B, R, H, generator=g, dtype=D), torch.randn(V, H, generator=g, dtype=D)
    teacher_logprobs = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1).gather(
        -1, response_ids[..., None])[..., 0]
    hidden = torch.randn(B, R, H, generator=g, dtype=D)
    weight = torch.randn(V, H, generator=g, dtype=D)
    student_logprobs = torch.log_softmax(hidden @ weight.T, -1).gather(-1, response_ids[..., None])[..., 0]
    batch = TrainBatch(
        input_ids=torch.zeros(B, 2 + R, dtype=torch.long), attention_mask=torch.ones(B, 2 + R, dtype=torch.long),
        prompt_width=2, response_ids=response_ids, response_mask=mask,
        sampler_logprobs=student_logprobs + 0.3 * torch.randn(B, R, generator=g, dtype=D),  # π_old ≠ π_θ
        rewards=torch.tensor(rewards, dtype=D), group_size=group_size,
        teacher_logprobs=teacher_logprobs, teacher_hidden=teacher_hidden, teacher_output_weight=teacher_weight,
        reference_logprobs=student_logprobs + 0.1 * torch.randn(B, R, generator=g, dtype=D),
        on_policy=None if on_policy is None else torch.tensor(on_policy, dtype=D))
    return batch, hidden.requires_grad_(), weight.requires_grad_()


def make_objective(max_response_len=6, **kw):
    beta = kw.pop("beta", BetaConfig(schedule="constant", initial=0.5))
    return Objective(ObjectiveConfig(beta=beta, chunk_size=3, **kw), total_steps=10,
                     max_response_len=max_response_len)


# --------------------------------------------------------------------------- configuration errors

def test_k1_in_the_loss_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="zero"):
        Objective(ObjectiveConfig(kd_placement="loss", kd_estimator="k1"), 10, 8)
    with pytest.raises(ValueError, match="zero"):
        Objective(ObjectiveConfig(ref_kl_coef=0.1, ref_kl_estimator="k1"), 10, 8)


def test_jsd_endpoint_is_refused():
    with pytest.raises(ValueError, match="fkl"):
        Objective(ObjectiveConfig(kd_estimator="jsd", jsd_beta=0.0), 10, 8)


def test_needs_flags():
    assert Objective(ObjectiveConfig(kd_estimator="k2"), 1, 1).needs_teacher
    assert not Objective(ObjectiveConfig(kd_estimator="k2"), 1, 1).needs_teacher_hidden
    assert Objective(ObjectiveConfig(kd_estimator="topk"), 1, 1).needs_teacher_hidden
    assert not Objective(ObjectiveConfig(kd_placement="none", kd_estimator="topk"), 1, 1).needs_teacher
    assert not Objective(ObjectiveConfig(kd_placement="advantage", kd_estimator="k1"), 1, 1).needs_teacher_hidden


# --------------------------------------------------------------------------- prepare

def test_prepare_is_pure_and_fills_fields():
    batch, _, _ = make_batch()
    prepared = make_objective(kd_mask="incorrect").prepare(batch, step=0)
    assert batch.advantages is None and batch.token_weights is None
    assert prepared.kd_mask.tolist() == [0, 1, 1, 1]
    assert prepared.nll_mask.tolist() == [1, 1, 1, 1]
    assert prepared.beta == 0.5
    torch.testing.assert_close(prepared.token_weights.sum(), torch.tensor(1.0, dtype=prepared.token_weights.dtype))
    # grpo: group (1, 0) → ±1/(√0.5 + 1e-6); group (0, 0) → 0; padding → 0
    a = 0.5 / (0.5 ** 0.5 + 1e-6)
    expected = torch.tensor([[a, a, a, 0], [-a, 0, 0, 0], [0] * 4, [0] * 4], dtype=prepared.advantages.dtype)
    torch.testing.assert_close(prepared.advantages, expected)
    rejection = make_objective(nll_rows="correct").prepare(batch, 0)
    assert rejection.nll_mask.tolist() == [1, 0, 0, 0]
    metrics = make_objective().prepare_metrics(prepared)
    assert metrics["kd_mask_fraction"] == 0.75 and metrics["reward_mean"] == 0.25
    assert metrics["uniform_group_fraction"] == 0.5


OPD_S_OLD = [[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]]
OPD_TEACHER = [[-1.5, -1.0, -0.5], [-2.0, -0.5, -3.0]]  # D = [[0.5, -1, 0], [1, -0.5, (3: padding)]]


def _opd_batch():
    batch, _, _ = make_batch(lengths=(3, 2), rewards=(1.0, 0.0), R=3)
    return dataclasses.replace(batch, sampler_logprobs=torch.tensor(OPD_S_OLD, dtype=D),
                               teacher_logprobs=torch.tensor(OPD_TEACHER, dtype=D))


@pytest.mark.parametrize("gamma, kd_mask, expected", [
    # Â = A − β·m·D with A = ±0.5 (drgrpo), β = 0.5
    (0.0, "none", [[0.5 - 0.25, 0.5 + 0.5, 0.5], [-0.5 - 0.5, -0.5 + 0.25, 0.0]]),
    # discounted: D̃ = [[0.5 − 0.5, −1, 0], [1 − 0.25, −0.5, 0]] (padding's D = 3 must not leak)
    (0.5, "none", [[0.5, 1.0, 0.5], [-0.5 - 0.375, -0.5 + 0.25, 0.0]]),
    (0.0, "incorrect", [[0.5, 0.5, 0.5], [-0.5 - 0.5, -0.5 + 0.25, 0.0]]),  # m = (0, 1)
])
def test_opd_advantage_placement_by_hand(gamma, kd_mask, expected):
    objective = make_objective(advantage="drgrpo", kd_placement="advantage", kd_estimator="k1",
                               kd_gamma=gamma, kd_mask=kd_mask)
    prepared = objective.prepare(_opd_batch(), step=3)
    torch.testing.assert_close(prepared.advantages, torch.tensor(expected, dtype=prepared.advantages.dtype))


# --------------------------------------------------------------------------- expected gradients

def _single_token_rows(theta, teacher):
    """One row per vocabulary token o, a one-token response: hidden = 1, output weight = θ, so logits = θ."""
    v = theta.shape[0]
    s_old = torch.log_softmax(theta, -1).detach()[:, None]
    batch = TrainBatch(
        input_ids=torch.zeros(v, 2, dtype=torch.long), attention_mask=torch.ones(v, 2, dtype=torch.long),
        prompt_width=1, response_ids=torch.arange(v)[:, None], response_mask=torch.ones(v, 1, dtype=D),
        sampler_logprobs=s_old, rewards=torch.zeros(v, dtype=D), group_size=1, teacher_logprobs=teacher[:, None])
    return batch, StudentOutput(hidden_states=torch.ones(v, 1, 1, dtype=D), output_weight=theta[:, None])


def _expected_loss_grad(objective, theta, teacher):
    """∇θ E_{o~π_θ}[loss(o)]: the token weights are replaced by the sampling probabilities π_θ(o)."""
    batch, student = _single_token_rows(theta, teacher)
    batch = objective.prepare(batch, step=0)
    batch = dataclasses.replace(batch, token_weights=torch.softmax(theta, -1).detach()[:, None])
    loss, _ = objective.loss(batch, student)
    return torch.autograd.grad(loss, theta)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_opd_advantage_and_k2_loss_have_the_same_expected_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(5, generator=g, dtype=D).requires_grad_()
    teacher = torch.log_softmax(torch.randn(5, generator=g, dtype=D), -1)
    beta = BetaConfig(schedule="constant", initial=1.0)
    opd = Objective(ObjectiveConfig(advantage="none", kd_placement="advantage", kd_estimator="k1", beta=beta), 1, 1)
    kdrl = Objective(ObjectiveConfig(advantage="none", kd_placement="loss", kd_estimator="k2", beta=beta), 1, 1)
    exact = torch.autograd.grad(rkl(torch.log_softmax(theta, -1), teacher), theta)[0]  # ∇ KL(π_θ‖π_T)
    # minimising L_pg with Â = −(s_old − τ) descends ∇KL, i.e. ∇J_pg = −E[∇k2]
    torch.testing.assert_close(_expected_loss_grad(opd, theta, teacher), exact, atol=1e-10, rtol=0)
    torch.testing.assert_close(_expected_loss_grad(kdrl, theta, teacher), exact, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- PPO clipping

@pytest.mark.parametrize("advantage, ratio, zero", [(2.0, 1.5, True), (-2.0, 0.5, True), (2.0, 1.1, False),
                                                     (-2.0, 0.9, False), (2.0, 0.5, False), (-2.0, 1.5, False)])
def test_ppo_clipping_gradient(advantage, ratio, zero):
    s_old = torch.tensor([-1.0], dtype=D)
    s = (s_old + torch.log(torch.tensor([ratio], dtype=D))).requires_grad_()
    weight = 0.25
    loss = (policy_gradient_loss(torch.exp(s - s_old), torch.tensor([advantage], dtype=D), 0.2, 0.2) * weight).sum()
    grad = torch.autograd.grad(loss, s)[0].item()
    assert grad == 0.0 if zero else grad == pytest.approx(-advantage * ratio * weight)


def test_ppo_clipping_through_the_objective():
    """Logits = hidden (identity output weight), so ∂loss/∂hidden = ∂loss/∂s · (onehot − p)."""
    v, ratios, advantages = 4, [1.5, 0.5, 1.1, 0.5], [1.0, -1.0, 1.0, 1.0]
    hidden = torch.randn(4, 1, v, dtype=D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ids = torch.tensor([[0], [1], [2], [3]])
    s = torch.log_softmax(hidden.detach(), -1).gather(-1, ids[..., None])[..., 0]
    batch = TrainBatch(input_ids=torch.zeros(4, 2, dtype=torch.long), attention_mask=torch.ones(4, 2, dtype=torch.long),
                       prompt_width=1, response_ids=ids, response_mask=torch.ones(4, 1, dtype=D),
                       sampler_logprobs=s - torch.log(torch.tensor(ratios, dtype=D))[:, None],
                       rewards=torch.zeros(4, dtype=D), group_size=1)
    objective = Objective(ObjectiveConfig(kd_placement="none", advantage="drgrpo"), 1, 1)
    batch = dataclasses.replace(objective.prepare(batch, 0), advantages=torch.tensor(advantages, dtype=D)[:, None])
    loss, metrics = objective.loss(batch, StudentOutput(hidden_states=hidden, output_weight=torch.eye(v, dtype=D)))
    grad = torch.autograd.grad(loss, hidden)[0][:, 0]
    p = torch.softmax(hidden.detach()[:, 0], -1)
    for row in range(4):
        ds = -advantages[row] * ratios[row] * 0.25 if row >= 2 else 0.0
        torch.testing.assert_close(grad[row], ds * (torch.eye(v, dtype=D)[row] - p[row]))
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- micro-batching

@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("estimator", ["k2", "k3", "rkl", "jsd", "topk"])
def test_micro_batches_add_up_to_the_batch(loss_agg, estimator):
    objective = make_objective(loss_agg=loss_agg, kd_estimator=estimator, kd_topk=3, kd_mask="incorrect",
                               nll_coef=0.3, ref_kl_coef=0.2, ref_kl_estimator="k2", entropy_coef=0.01)
    batch, hidden, weight = make_batch(rewards=(1.0, 0.0, 0.5, 0.0))
    batch = objective.prepare(batch, step=2)
    full, full_metrics = objective.loss(batch, StudentOutput(hidden, weight))
    full_grads = torch.autograd.grad(full, (hidden, weight))
    total, grads, metrics = 0.0, [torch.zeros_like(hidden), torch.zeros_like(weight)], {}
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        h = hidden.detach()[rows].requires_grad_()
        w = weight.detach().requires_grad_()
        part, part_metrics = objective.loss(batch.rows(rows), StudentOutput(h, w))
        g_h, g_w = torch.autograd.grad(part, (h, w))
        grads[0][rows] += g_h
        grads[1] += g_w
        total = total + part.detach()
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    torch.testing.assert_close(total, full.detach())
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b)
    assert metrics.keys() == full_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], full_metrics[key])


# --------------------------------------------------------------------------- the loss, term by term

def _manual_terms(batch, hidden, weight):
    valid = batch.response_mask > 0
    logp = torch.log_softmax(hidden @ weight.T, -1)
    s = logp.gather(-1, batch.response_ids[..., None])[..., 0]
    return valid, s


def test_loss_terms_by_hand():
    objective = make_objective(kd_estimator="k2", kd_mask="incorrect", nll_coef=0.3, ref_kl_coef=0.2,
                               ref_kl_estimator="k3", loss_agg="seq_mean_token_mean")
    batch, hidden, weight = make_batch()
    batch = objective.prepare(batch, 0)
    loss, metrics = objective.loss(batch, StudentOutput(hidden, weight))
    valid, s = _manual_terms(batch, hidden, weight)
    w, m = batch.token_weights, batch.kd_mask[:, None]
    ratio = torch.exp(s - batch.sampler_logprobs)
    pg = -torch.minimum(ratio * batch.advantages, ratio.clamp(0.8, 1.2) * batch.advantages)
    delta = s - batch.teacher_logprobs
    kd = 0.5 * m * 0.5 * delta ** 2
    ref = torch.expm1(-(s - batch.reference_logprobs)) + (s - batch.reference_logprobs)
    expected = ((pg + kd + 0.2 * ref + 0.3 * -s) * w)[valid].sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["kd_loss"], (kd * w)[valid].sum().detach())
    torch.testing.assert_close(metrics["kd_value"], (0.5 * delta ** 2 * w)[valid].sum().detach())
    torch.testing.assert_close(metrics["kl_sampled"], (delta * w)[valid].sum().detach())
    torch.testing.assert_close(metrics["logprob_gap"], ((s - batch.sampler_logprobs).abs() * w)[valid].sum().detach())
    torch.testing.assert_close(metrics["ratio_mean"], (ratio * w)[valid].sum().detach())


@pytest.mark.parametrize("how", ["flag", "rows"])
def test_offpolicy_k2_is_weighted_by_capped_ratio(how):
    objective = make_objective(kd_estimator="k2", advantage="none", kd_mask="none", offpolicy_ratio_cap=1.1)
    on_policy = None if how == "flag" else [0.0, 0.0, 0.0, 0.0]
    batch, hidden, weight = make_batch(on_policy=on_policy)
    batch = objective.prepare(batch, 0)
    loss, _ = objective.loss(batch, StudentOutput(hidden, weight), off_policy=(how == "flag"))
    valid, s = _manual_terms(batch, hidden, weight)
    cap = torch.exp(s - batch.sampler_logprobs).detach().clamp(max=1.1)
    expected = (0.5 * cap * 0.5 * (s - batch.teacher_logprobs) ** 2 * batch.token_weights)[valid].sum()
    torch.testing.assert_close(loss, expected)
    on, _ = objective.loss(batch if how == "flag" else dataclasses.replace(batch, on_policy=None),
                           StudentOutput(hidden, weight))
    assert not torch.allclose(on, loss)


def test_loss_runs_in_float32_on_an_empty_micro_batch():
    objective = make_objective(kd_estimator="rkl")
    batch, hidden, weight = make_batch(lengths=(0, 0, 2, 1))
    batch = objective.prepare(batch, 0)
    loss, metrics = objective.loss(batch.rows(slice(0, 2)), StudentOutput(hidden[:2], weight))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in metrics.values())


def test_prepare_requires_teacher_for_advantage_placement():
    batch, _, _ = make_batch()
    with pytest.raises(ValueError, match="teacher_logprobs"):
        make_objective(kd_placement="advantage", kd_estimator="k1").prepare(
            dataclasses.replace(batch, teacher_logprobs=None), 0)


@pytest.mark.parametrize("overrides", [["objective.kd_estimator=k1"], ["objective.kd_placement=advantage"],
                                       ["objective.ref_kl_coef=0.1", "objective.ref_kl_estimator=k1",
                                        "model.reference=student"],
                                       ["objective.kd_estimator=jsd", "objective.jsd_beta=1.0"]])
def test_objective_rules_are_checked_once(overrides):
    """load_config and a directly built Objective refuse with the same words: one rule, one place."""
    from kdrl.config import ConfigError, Config, apply_override, load_config

    with pytest.raises(ConfigError) as loaded:
        load_config(None, overrides)
    config = Config()
    for override in overrides:
        apply_override(config, override)
    with pytest.raises(ConfigError) as built:
        Objective(config.objective, 10, 8)
    assert str(built.value) == str(loaded.value)


def test_pg_loss_and_kd_loss_are_their_terms_parts_of_the_loss():
    """pg_loss carries pg_coef_t as kd_loss carries β: the logged parts add up to the optimised loss,
    and a switched-off PG term (pg_coef = 0) logs 0, not its unscaled surrogate."""
    batch, hidden, weight = make_batch()
    parts = {}
    for coef in (1.0, 0.5, 0.0):
        objective = make_objective(kd_estimator="k2", pg_coef=coef)
        loss, metrics = objective.loss(objective.prepare(batch, 0), StudentOutput(hidden, weight))
        torch.testing.assert_close(metrics["pg_loss"] + metrics["kd_loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        parts[coef] = metrics
    assert parts[1.0]["pg_loss"] != 0 and parts[0.0]["pg_loss"] == 0
    torch.testing.assert_close(parts[0.5]["pg_loss"], 0.5 * parts[1.0]["pg_loss"])
    assert parts[0.0]["kd_loss"] == parts[1.0]["kd_loss"] != 0
