"""Advantages, KD masks, β schedules and loss-aggregation weights on hand-computed examples."""
import math

import pytest
import torch

from kdrl.config import BetaConfig
from kdrl.objective import ADVANTAGES, KD_MASKS, LOSS_AGGREGATIONS, beta_at


# --------------------------------------------------------------------------- advantages

def test_grpo_hand_example_uses_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased (G - 1 in the denominator)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6)
    torch.testing.assert_close(ADVANTAGES["grpo"](rewards, 4), expected)


def test_drgrpo_and_rloo_hand_examples():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(ADVANTAGES["drgrpo"](rewards, 3),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3]))
    # rloo: r_i minus the mean of the other two
    torch.testing.assert_close(ADVANTAGES["rloo"](rewards, 3),
                               torch.tensor([1.0, -0.5, -0.5, 0.5, 0.5, -1.0]))
    assert torch.equal(ADVANTAGES["none"](rewards, 3), torch.zeros(6))


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "none"])
def test_uniform_groups_get_exactly_zero(name):
    # three 0.1s: their float mean is not exactly 0.1, yet A must be exactly 0
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 0.3])
    advantages = ADVANTAGES[name](rewards, 3)
    assert torch.equal(advantages[:6], torch.zeros(6))
    if name != "none":
        assert (advantages[6:] != 0).all()


def test_group_size_one_gives_zero():
    for name in ADVANTAGES:
        assert torch.equal(ADVANTAGES[name](torch.tensor([1.0, 0.0]), 1), torch.zeros(2))


# --------------------------------------------------------------------------- KD masks

def test_kd_masks_hand_example():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    assert KD_MASKS["none"](rewards, 2, 1.0).tolist() == [1, 1, 1, 1, 1, 1]
    assert KD_MASKS["incorrect"](rewards, 2, 1.0).tolist() == [0, 1, 1, 1, 0, 0]
    assert KD_MASKS["group_all_wrong"](rewards, 2, 1.0).tolist() == [0, 0, 1, 1, 0, 0]
    # threshold: 0.7 counts as correct at threshold 0.5
    partial = torch.tensor([0.7, 0.2, 0.2, 0.3])
    assert KD_MASKS["incorrect"](partial, 2, 0.5).tolist() == [0, 1, 1, 1]
    assert KD_MASKS["group_all_wrong"](partial, 2, 0.5).tolist() == [0, 0, 1, 1]


# --------------------------------------------------------------------------- beta schedules

def test_beta_constant():
    assert beta_at(BetaConfig(schedule="constant", initial=2e-3), 123, 200) == 2e-3


def test_beta_linear_kdrl_annealing():
    cfg = BetaConfig(schedule="linear", initial=5e-3, final=1e-3, decay_per_step=5e-5)
    assert beta_at(cfg, 0, 1000) == pytest.approx(5e-3)
    assert beta_at(cfg, 40, 1000) == pytest.approx(3e-3)
    assert beta_at(cfg, 80, 1000) == pytest.approx(1e-3)
    assert beta_at(cfg, 200, 1000) == pytest.approx(1e-3)


def test_beta_cosine():
    cfg = BetaConfig(schedule="cosine", initial=1e-2, final=1e-3, cosine_steps=100)
    assert beta_at(cfg, 0, 999) == pytest.approx(1e-2)
    assert beta_at(cfg, 50, 999) == pytest.approx(5.5e-3)
    assert beta_at(cfg, 100, 999) == pytest.approx(1e-3)
    assert beta_at(cfg, 150, 999) == pytest.approx(1e-3)
    default_period = BetaConfig(schedule="cosine", initial=1e-2, final=1e-3)  # period = total_steps
    assert beta_at(default_period, 100, 200) == pytest.approx(5.5e-3)


# --------------------------------------------------------------------------- loss aggregation

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # lengths 3 and 1
TERM = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])  # padding values must not count


@pytest.mark.parametrize("name, weights, loss", [
    ("token_mean", [[1 / 4] * 3, [1 / 4, 0, 0]], (1 + 2 + 3 + 4) / 4),
    ("seq_mean_token_mean", [[1 / 6] * 3, [1 / 2, 0, 0]], (2 + 4) / 2),
    ("seq_mean_token_sum_norm", [[1 / 8] * 3, [1 / 8, 0, 0]], (6 + 4) / (4 * 2)),  # max_response_len = 4
])
def test_aggregation_weights_and_loss(name, weights, loss):
    w = LOSS_AGGREGATIONS[name](MASK, 4)
    torch.testing.assert_close(w, torch.tensor(weights))
    assert (TERM * w).sum().item() == pytest.approx(loss)


def test_aggregation_all_reduce_hook_shares_normaliser():
    def two_identical_ranks(x):
        return 2 * x
    for name in LOSS_AGGREGATIONS:
        torch.testing.assert_close(LOSS_AGGREGATIONS[name](MASK, 4, two_identical_ranks),
                                   LOSS_AGGREGATIONS[name](MASK, 4) / 2)
